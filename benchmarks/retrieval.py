"""Image↔text retrieval R@K on the test split."""
from __future__ import annotations

import numpy as np
import torch

from medvlp.benchmarks.protocol import EvalContext, MetricValue, Protocol, ProtocolResult
from medvlp.registry import register_benchmark


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries (rows) whose paired item (same index) ranks in the top K columns.

    Ties are broken pessimistically (an item with an equal score counts as ranked above).
    """
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval needs a square similarity matrix, got {sim.shape}")
    pos = np.diag(sim)[:, None]
    rank = (sim >= pos).sum(1) - 1  # 0 = best; ties count against
    return {k: float((rank < k).mean()) for k in ks}


def label_precision_at_k(sim: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> tuple[dict[int, float], float]:
    """Mean fraction of the top-K retrieved items (excluding none) whose label set equals the query's
    (ConVIRT's category precision@K), and the chance level Σ_c p_c² over label-set frequencies.

    Rows of ``labels`` with NaN never match.
    """
    known = ~np.isnan(labels).any(1)
    keys = np.array([hash(r.tobytes()) if ok else None for r, ok in zip(labels, known)], dtype=object)
    order = np.argsort(-sim, axis=1, kind="stable")
    out = {}
    for k in ks:
        top = order[:, :k]
        same = np.array([[keys[i] is not None and keys[i] == keys[j] for j in row] for i, row in enumerate(top)])
        out[k] = float(same.mean())
    _, counts = np.unique([str(k) for k in keys[known]], return_counts=True)
    chance = float(((counts / len(labels)) ** 2).sum())
    return out, chance


@register_benchmark("retrieval")
class Retrieval(Protocol):
    """Image→text and text→image retrieval among the N test pairs (cosine similarity of the joint
    embeddings); metrics ``i2t_R@K`` and ``t2i_R@K`` for K in ``ks`` (default 1, 5, 10); chance is K/N.
    With labels, also ``i2t_P@K``/``t2i_P@K``: label-set precision@K (ConVIRT-style category retrieval),
    which stays meaningful when many reports are paraphrases of one another."""

    name = "retrieval"
    needs_text = True

    def applicable(self, ctx: EvalContext) -> str | None:
        return None

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        feats = ctx.features.get(ctx.model, ctx.datamodule, "test", ctx.device)
        if np.isnan(feats.text_embedding).any():
            raise ValueError("retrieval needs paired text for every test sample")
        sim = feats.image_embedding @ feats.text_embedding.T
        ks = tuple(ctx.params.get("ks", (1, 5, 10)))
        n = sim.shape[0]
        out = []
        for direction, s in (("i2t", sim), ("t2i", sim.T)):
            for k, v in recall_at_k(s, ks).items():
                out.append(MetricValue(f"{direction}_R@{k}", v,
                                       f"{direction} recall@{k} among N={n} test pairs (chance {k / n:.3f}); "
                                       "ties ranked pessimistically"))
        if not np.isnan(feats.labels).all() and feats.labels.size:
            for direction, s in (("i2t", sim), ("t2i", sim.T)):
                prec, chance = label_precision_at_k(s, feats.labels, ks)
                for k, v in prec.items():
                    out.append(MetricValue(f"{direction}_P@{k}", v,
                                           f"{direction} label-set precision@{k}: share of the top {k} of N={n} whose "
                                           f"label set equals the query's (chance {chance:.3f})"))
        return ProtocolResult(out)
