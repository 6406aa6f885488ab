"""The protocol contract: a benchmark takes an encoder (the method's API) and a datamodule and returns
metric values with their definitions."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from medvlp.benchmarks.features import FeatureCache


@dataclass
class MetricValue:
    """One measured number and the sentence that defines it."""

    metric: str
    value: float
    definition: str


@dataclass
class EvalContext:
    """What a protocol gets: the model (encoder API), the datamodule, the feature cache and params."""

    model: Any
    datamodule: Any
    features: FeatureCache
    params: dict[str, Any] = field(default_factory=dict)
    device: str | torch.device = "cpu"
    work_dir: Path | None = None


@dataclass
class ProtocolResult:
    """Metric values of one (fraction, seed) run plus the split hash of the training subset used."""

    values: list[MetricValue]
    split_hash: str = ""
    #: what makes this number comparable with another (protocol variant, fraction source …), merged
    #: with the runner's fields into the result row's ``comparability`` (see :mod:`.paper_view`)
    comparability: dict[str, Any] = field(default_factory=dict)


class Protocol:
    """Base class of benchmark protocols.

    Attributes:
        name: registry name.
        uses_fractions: runs per label fraction × seed (linear probe, fine-tune, segmentation);
            otherwise once (fraction 1, seed 0).
        parameters: the suite parameters it reads, described (``medvlp list protocol=NAME``).
    """

    name: ClassVar[str] = "protocol"
    #: protocol variant recorded with every result (``fast`` = medvlp's quick protocol; reference
    #: variants name their source, e.g. ``mgca_linear``)
    variant: ClassVar[str] = "fast"
    uses_fractions: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    needs_mask: ClassVar[bool] = False
    #: suite parameters the protocol reads (name → "description (default)"); suites are validated against
    #: them (plus ``fractions``, ``seeds``, ``protocol``). ``None``: undeclared, not checked.
    parameters: ClassVar[dict[str, str] | None] = None

    def applicable(self, ctx: EvalContext) -> str | None:
        """``None`` when the protocol can run on this datamodule, else the reason it cannot."""
        return None

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        """Evaluate and return metric values."""
        raise NotImplementedError


def random_batches(rows: Sequence[int], batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """``epochs · ceil(len(rows) / batch_size)`` batches of rows drawn with replacement (seeded)."""
    g = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(rows))
    for _ in range(epochs * max(1, math.ceil(len(rows) / batch_size))):
        yield [rows[i] for i in torch.randint(len(rows), (size,), generator=g).tolist()]


def macro_auc(y: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """Mean ROC-AUC over classes that have both a positive and a negative (NaN labels ignored)."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for k in range(y.shape[1]):
        ok = ~np.isnan(y[:, k])
        yk = y[ok, k]
        if len(np.unique(yk)) < 2:
            continue
        aucs.append(float(roc_auc_score(yk, scores[ok, k])))
    if not aucs:
        raise ValueError("no class has both positive and negative test labels: AUC undefined")
    return float(np.mean(aucs)), aucs
