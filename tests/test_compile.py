"""``compile_encoders=true`` without a recompile storm: the image encoder and the text transformer are
compiled (tokenisation stays outside the graph), and the number of compiled graphs stays bounded over
several training steps with new reports and shapes. Slow: compiling on CPU takes minutes."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import build_tiny

#: graphs per method: one per (module, input path); recompiles for a new shape are bounded by dynamic dims
MAX_GRAPHS = {"clip": 4, "unimedi": 12}


def _steps(method: str, n: int) -> list[int]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, dm = build_tiny(method, "method.init_args.compile_encoders=true")
    model.setup("fit")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    graphs: list[int] = []
    batches: Any = iter(dm.train_dataloader())
    for _ in range(n):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        batch = batch[0] if isinstance(batch, tuple) else batch
        loss = model._total(model._losses(batch), "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        graphs.append(int(counters["stats"]["unique_graphs"]))
    return graphs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clip", "unimedi"])
def test_compiled_encoders_compile_a_bounded_number_of_graphs(method: str) -> None:
    graphs = _steps(method, 5)
    assert graphs[-1] <= MAX_GRAPHS[method], graphs
    assert graphs[-1] == graphs[2], graphs  # nothing new is compiled after the first steps
