"""Image↔text retrieval on the test split: pair recall (``retrieval``) and category retrieval
(``category_retrieval``, GLoRIA's whole-set or BenchX's within-batch convention)."""
from __future__ import annotations

import numpy as np
import torch

from medvlp.benchmarks.kit.features import Features
from medvlp.benchmarks.kit.fidelity import Element, documented, fidelity
from medvlp.benchmarks.kit.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, mean_recipe, recall_recipe
from medvlp.registry import register_benchmark


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries (rows) whose paired item (same index) ranks in the top K columns.

    Ties are broken pessimistically (an item with an equal score counts as ranked above).
    """
    rank = pair_ranks(sim)
    return {k: float((rank < k).mean()) for k in ks}


def pair_ranks(sim: np.ndarray) -> np.ndarray:
    """Per query (row), the 0-based rank of its paired item (same index); ties count against."""
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval needs a square similarity matrix, got {sim.shape}")
    return (sim >= np.diag(sim)[:, None]).sum(1) - 1


def label_precision_at_k(sim: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> tuple[dict[int, float], float]:
    """Mean of :func:`label_precision_per_query` over queries, and the chance level."""
    per_query, chance = label_precision_per_query(sim, labels, ks)
    return {k: float(v.mean()) for k, v in per_query.items()}, chance


def label_precision_per_query(sim: np.ndarray, labels: np.ndarray,
                              ks: tuple[int, ...] = (1, 5, 10)) -> tuple[dict[int, np.ndarray], float]:
    """Per query, the fraction of the top-K retrieved items whose label set equals the query's
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
        out[k] = same.mean(1)
    _, counts = np.unique([str(k) for k in keys[known]], return_counts=True)
    chance = float(((counts / len(labels)) ** 2).sum())
    return out, chance


def text_reason(ctx: EvalContext) -> str | None:
    """``None`` when the test split has paired text, else why a retrieval protocol cannot run."""
    ds = ctx.datamodule.dataset("test", augment=False)
    if len(ds) == 0:
        return "test split is empty"
    for i in range(min(len(ds), 8)):
        sample = ds[i]
        if sample is not None:
            return None if sample.get("text") else "dataset has no paired text (reports)"
    return "no readable test sample among the first 8"


def paired(ctx: EvalContext) -> tuple[Features, str]:
    """Test features restricted to samples with paired text, and a note when some had none.

    Raises:
        ValueError: when fewer than 2 test samples have text.
    """
    feats = ctx.features.get(ctx.model, ctx.datamodule, "test", ctx.device)
    ok = ~np.isnan(feats.text_embedding).any(1)
    if ok.sum() < 2:
        raise ValueError(f"retrieval needs paired text: only {int(ok.sum())} of {len(ok)} test samples have a report")
    if ok.all():
        return feats, ""
    keep = np.flatnonzero(ok)
    sub = Features(feats.representation[keep], feats.image_embedding[keep], feats.text_embedding[keep],
                   feats.labels[keep], [feats.ids[i] for i in keep], [feats.texts[i] for i in keep])
    return sub, f"; {len(keep)} of {len(ok)} test samples have a report (the others are left out)"


def hit_at_k(sim: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[int, float]:
    """Share of queries with at least one item of the same label set among the top K (Hit@K)."""
    return {k: float(v.mean()) for k, v in hit_per_query(sim, labels, ks).items()}


def hit_per_query(sim: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Per query (row), 1 when an item of its label set is among the top K, else 0 (rows with NaN labels: 0)."""
    known = ~np.isnan(labels).any(1)
    keys = [r.tobytes() if ok else None for r, ok in zip(labels, known)]
    order = np.argsort(-sim, axis=1, kind="stable")
    return {k: np.array([keys[i] is not None and any(keys[j] == keys[i] for j in row[:k]) for i, row in enumerate(order)],
                        np.float32) for k in ks}


@register_benchmark("retrieval")
class Retrieval(Protocol):
    """Image→text and text→image retrieval among the N test pairs (cosine similarity of the joint
    embeddings); metrics ``i2t_R@K`` and ``t2i_R@K`` for K in ``ks`` (default 1, 5, 10); chance is K/N.
    With labels, also ``i2t_P@K``/``t2i_P@K``: label-set precision@K (ConVIRT-style category retrieval),
    which stays meaningful when many reports are paraphrases of one another."""

    parameters = {
        "ks": "Recall@k cut-offs ([1, 5, 10])",
    }

    name = "retrieval"
    needs_text = True
    primary_metric = "i2t_R@10"

    def applicable(self, ctx: EvalContext) -> str | None:
        return text_reason(ctx)

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        feats, note = paired(ctx)
        sim = feats.image_embedding @ feats.text_embedding.T
        ks = tuple(ctx.params.get("ks", (1, 5, 10)))
        n = sim.shape[0]
        out = []
        samples = {"ids": np.asarray([str(i) for i in feats.ids])}
        recipes = {}
        for direction, s in (("i2t", sim), ("t2i", sim.T)):
            samples[f"{direction}_rank"] = pair_ranks(s).astype(np.int32)
            recipes.update({f"{direction}_R@{k}": recall_recipe(f"{direction}_rank", k, n) for k in ks})
            for k, v in recall_at_k(s, ks).items():
                out.append(MetricValue(f"{direction}_R@{k}", v,
                                       f"{direction} recall@{k} among N={n} test pairs (chance {k / n:.3f}); "
                                       f"ties ranked pessimistically{note}"))
        if not np.isnan(feats.labels).all() and feats.labels.size:
            for direction, s in (("i2t", sim), ("t2i", sim.T)):
                prec, chance = label_precision_per_query(s, feats.labels, ks)
                for k, per_query in prec.items():
                    samples[f"{direction}_P@{k}"] = per_query.astype(np.float32)
                    recipes[f"{direction}_P@{k}"] = mean_recipe(f"{direction}_P@{k}", chance)
                    out.append(MetricValue(f"{direction}_P@{k}", float(per_query.mean()),
                                           f"{direction} label-set precision@{k}: share of the top {k} of N={n} whose "
                                           f"label set equals the query's (chance {chance:.3f}){note}"))
        return ProtocolResult(out, samples=samples, recipes=recipes)


def benchx_batch_retrieval(sim: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> tuple[dict[int, float], dict[int, float]]:
    """BenchX ``evaluate`` (``unifier/blocks/zeroshot/zeroshot_model.py`` L136-166 @ b874fa6) on one batch's
    image → report similarity: per image query, the top-``k`` reports (``argsort`` descending, all of them
    when ``k`` exceeds the batch) count a match when their label vector equals the query's; ``Hit@k`` =
    share of queries with a match, ``P@k`` = matches / (n · k) (the denominator keeps ``k`` even when
    ``k > n``). Rows with NaN labels never match."""
    n = sim.shape[0]
    known = ~np.isnan(labels).any(1)
    order = np.argsort(-sim, axis=1, kind="stable")
    hit, prec = {}, {}
    for k in ks:
        matches = np.array([[known[i] and known[j] and np.array_equal(labels[j], labels[i]) for j in row[:k]]
                            for i, row in enumerate(order)])
        hit[k] = float(matches.any(1).mean())
        prec[k] = float(matches.sum() / (n * k))
    return hit, prec


def _category_elements() -> list[Element]:
    zm = "unifier/blocks/zeroshot/zeroshot_model.py"
    return [
        Element("ranking", "image → report within each batch (forward_reports: similarity, argsort descending)",
                f"yangzhou12/BenchX @ b874fa6 {zm} L94-97", "convention benchx: the same; gloria: both directions "
                "over the whole test set", param="convention", value="benchx"),
        Element("relevance", "torch.equal(targets[idx], targets[i]): same label vector", f"{zm} L136-166", "the same"),
        Element("metrics", "Hit@k and Precision@k = matches / (n·k), k in (1, 5, 10), mean over batches",
                f"{zm} L136-166; bin/test_zeroshot.py L115", "convention benchx: the same", param="ks", value=[1, 5, 10]),
        Element("batches", "RandomSampler, batch_size 8 (develop config/retrieval/MIMIC_5x200/mgca_vit.yml L11)",
                "bin/test_zeroshot.py L85-98; BenchX develop @ e5f5c24", "seeded random batches of batch_size (8)",
                param="batch_size", value=8),
        Element("similarity", "global cosine (similarity_type global)", "develop config/retrieval/MIMIC_5x200/mgca_vit.yml L6",
                "cosine of the joint embeddings"),
    ]


@register_benchmark("category_retrieval")
@documented(_category_elements)
class CategoryRetrieval(Protocol):
    """Category-level image↔report retrieval on CheXpert 5x200 / MIMIC 5x200: a retrieved item is
    relevant when its class (label set) equals the query's.

    ``convention: gloria`` (default; GLoRIA, ConVIRT): per direction (``i2t``: image query over the test
    reports; ``t2i``: report query over the test images) over the whole test set, ``P@K`` = mean share
    of relevant items among the top K (K up to 100) and ``Hit@K`` = share of queries with a relevant item
    in the top K; stable sort; ``ks`` default ``[1, 5, 10, 50, 100]``, capped at N.

    ``convention: benchx``: image → report only, within seeded random batches of ``batch_size`` (8),
    :func:`benchx_batch_retrieval` per batch (``ks`` default ``[1, 5, 10]``), averaged over batches
    (batch statistics: no per-sample recipes).
    """

    parameters = {"ks": "cut-offs K for P@K and Hit@K ([1, 5, 10, 50, 100]; benchx [1, 5, 10])",
                  "convention": "gloria (whole set, both directions) | benchx (image → report within batches) (gloria)",
                  "batch_size": "benchx convention: pairs per batch (8)"}

    name = "category_retrieval"
    variant = "gloria_category"
    needs_text = True
    needs_labels = True

    def applicable(self, ctx: EvalContext) -> str | None:
        return text_reason(ctx) or super().applicable(ctx)

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        feats, note = paired(ctx)
        if np.isnan(feats.labels).all():
            raise ValueError("category retrieval needs test labels")
        convention = ctx.params.get("convention", "gloria")
        if convention not in ("gloria", "benchx"):
            raise ValueError(f"convention must be gloria|benchx, got {convention!r}")
        sim = feats.image_embedding @ feats.text_embedding.T
        n = sim.shape[0]
        if convention == "benchx":
            return self._benchx(ctx, sim, feats, note, seed)
        ks = tuple(sorted({min(int(k), n) for k in ctx.params.get("ks", (1, 5, 10, 50, 100))}))
        out = []
        # per query (query i of either direction is test sample i), so the report bootstraps over queries
        samples, recipes = {"ids": np.asarray([str(i) for i in feats.ids])}, {}
        for direction, s in (("i2t", sim), ("t2i", sim.T)):
            prec, chance = label_precision_per_query(s, feats.labels, ks)
            for k, v in prec.items():
                name = f"{direction}_P@{k}"
                samples[name], recipes[name] = v.astype(np.float32), mean_recipe(name, chance)
                out.append(MetricValue(name, float(v.mean()), f"{direction} category precision@{k} among N={n} "
                                       f"(same class as the query; chance {chance:.3f}){note}"))
            for k, v in hit_per_query(s, feats.labels, ks).items():
                name = f"{direction}_Hit@{k}"
                samples[name], recipes[name] = v, mean_recipe(name)
                out.append(MetricValue(name, float(v.mean()), f"{direction} share of queries with a same-class "
                                       f"item in the top {k} of N={n}{note}"))
        comp = {"protocol_variant": self.variant,
                "fidelity": fidelity(self.fidelity_elements, ctx.params, ["convention gloria (GLoRIA's whole-set ranking)"])}
        return ProtocolResult(out, comparability=comp, samples=samples, recipes=recipes)

    def _benchx(self, ctx: EvalContext, sim: np.ndarray, feats: Features, note: str, seed: int) -> ProtocolResult:
        """BenchX's within-batch image → report retrieval, averaged over batches."""
        bs = int(ctx.params.get("batch_size", 8))
        ks = tuple(int(k) for k in ctx.params.get("ks", (1, 5, 10)))
        order = torch.randperm(len(sim), generator=torch.Generator().manual_seed(seed)).numpy()
        hits: dict[int, list[float]] = {k: [] for k in ks}
        precs: dict[int, list[float]] = {k: [] for k in ks}
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            h, p = benchx_batch_retrieval(sim[np.ix_(idx, idx)], feats.labels[idx], ks)
            for k in ks:
                hits[k].append(h[k])
                precs[k].append(p[k])
        nb = len(hits[ks[0]])
        how = f"BenchX convention: image → report within {nb} random batches of {bs}, mean over batches{note}"
        out = [MetricValue(f"i2t_Hit@{k}", float(np.mean(hits[k])), f"share of image queries with a same-label report "
                           f"in the top {k} of its batch; {how}") for k in ks]
        out += [MetricValue(f"i2t_P@{k}", float(np.mean(precs[k])), f"same-label reports in the top {k} / (n·{k}) per "
                            f"batch; {how}") for k in ks]
        comp = {"protocol_variant": "benchx_category", "fidelity": fidelity(self.fidelity_elements, ctx.params)}
        return ProtocolResult(out, comparability=comp, samples={"ids": np.asarray([str(i) for i in feats.ids])})
