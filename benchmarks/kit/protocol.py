"""The protocol contract: a benchmark takes an encoder (the method's API) and a datamodule and returns
metric values with their definitions."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch

from medvlp.benchmarks.kit.features import FeatureCache


#: keys of a suite's protocol entry that the runner reads itself (which protocol, and the units it runs:
#: label fractions, training seeds, subset seeds); every other key is the protocol's own parameter
RUNNER_KEYS = ("protocol", "fractions", "seeds", "subset_seeds")


def split_protocol_entry(key: str, params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(protocol name, runner keys, the protocol's own parameters)`` of a suite's protocol entry ``key``."""
    params = dict(params or {})
    name = str(params.get("protocol", key))
    runner = {k: params[k] for k in RUNNER_KEYS if k in params and k != "protocol"}
    own = {k: v for k, v in params.items() if k not in RUNNER_KEYS}
    return name, runner, own


@dataclass
class MetricValue:
    """One measured number and the sentence that defines it."""

    metric: str
    value: float
    definition: str


@dataclass
class EvalContext:
    """What a protocol gets: the model (encoder API), the datamodule, the feature cache and params.

    ``subset_seed`` picks the label-fraction subset; ``None`` means the training seed does (one seed
    drives both, as before subset and training seeds were separated).
    """

    model: Any
    datamodule: Any
    features: FeatureCache
    params: dict[str, Any] = field(default_factory=dict)
    device: str | torch.device = "cpu"
    work_dir: Path | None = None
    subset_seed: int | None = None

    def subset_seed_for(self, seed: int) -> int:
        """The seed that draws the label-fraction subset of a run with training seed ``seed``."""
        return seed if self.subset_seed is None else int(self.subset_seed)


def auc_recipe(scores: str = "scores", labels: str = "labels") -> dict[str, Any]:
    """How a macro ROC-AUC is recomputed from stored per-sample arrays (see :mod:`medvlp.benchmarks.metrics.stats`)."""
    return {"kind": "macro_auc", "scores": scores, "labels": labels, "chance": 0.5, "higher_is_better": True}


def mean_recipe(values: str, chance: float | None = None, higher_is_better: bool = True) -> dict[str, Any]:
    """A metric that is the mean over samples of ``values`` (2-D: NaN-mean over samples, then mean over columns)."""
    return {"kind": "mean", "values": values, "chance": chance, "higher_is_better": higher_is_better}


def recall_recipe(ranks: str, k: int, n: int) -> dict[str, Any]:
    """Recall@K recomputed from per-query ranks of the paired item (0 = best)."""
    return {"kind": "recall", "ranks": ranks, "k": int(k), "chance": min(1.0, k / max(n, 1)), "higher_is_better": True}


@dataclass
class ProtocolResult:
    """Metric values of one (fraction, seed) run plus the split hash of the training subset used.

    Attributes:
        values: the metrics.
        split_hash: hash of the training subset (fraction protocols).
        samples: per-test-sample arrays (``ids`` plus scores/labels, ranks, per-image scores) stored
            compressed beside ``results.csv`` so any statistic can be recomputed without re-running.
        recipes: metric name → how it is recomputed from ``samples`` (:func:`auc_recipe`,
            :func:`mean_recipe`, :func:`recall_recipe`); bootstrap CIs and paired tests use them.
        flags: ``"degenerate: ..."`` (the cell is not a result: shown withheld in reports) or
            ``"note: ..."`` (shown as a footnote).
    """

    values: list[MetricValue]
    split_hash: str = ""
    #: what makes this number comparable with another (protocol variant, fraction source …), merged
    #: with the runner's fields into the result row's ``comparability`` (see :mod:`.paper_view`)
    comparability: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


class Protocol:
    """Base class of benchmark protocols.

    Attributes:
        name: registry name.
        uses_fractions: runs per label fraction × seed (linear probe, fine-tune, segmentation);
            otherwise once (fraction 1, seed 0).
        parameters: the suite parameters it reads, described (``medvlp list protocol=NAME``).
        deterministic: the result depends on (weights, data, training subset) only, so repeats with
            other training seeds on the same subset are not run.
        primary_metric: the metric shown in the headline table.
    """

    name: ClassVar[str] = "protocol"
    #: protocol variant recorded with every result (``fast`` = medvlp's quick protocol; reference
    #: variants name their source, e.g. ``mgca_linear``)
    variant: ClassVar[str] = "fast"
    uses_fractions: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False  # result independent of the training seed (e.g. lbfgs probe)
    primary_metric: ClassVar[str | None] = None  # headline metric (default: the first one reported)
    needs_text: ClassVar[bool] = False
    needs_mask: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    #: how a protocol that trains picks its checkpoint (e.g. "MGCA selects on validation loss"); it then
    #: needs a non-empty validation split
    selection: ClassVar[str | None] = None
    #: suite parameters the protocol reads (name → "description (default)"); suites are validated against
    #: them and :attr:`defaults` (plus :data:`RUNNER_KEYS`). ``None`` and no defaults: undeclared, not checked.
    parameters: ClassVar[dict[str, str] | None] = None

    #: fixed settings of a reference protocol (its source's hyperparameters); :meth:`params` merges the
    #: suite's params over them. Empty for protocols that read ``ctx.params`` directly.
    defaults: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def known_parameters(cls) -> set[str] | None:
        """The protocol's own parameter names (:attr:`parameters` and :attr:`defaults`); ``None`` when it
        declares neither (its parameters are not checked)."""
        if cls.parameters is None and not cls.defaults:
            return None
        return set(cls.parameters or {}) | set(cls.defaults)

    @classmethod
    def unknown_parameters(cls, own: Mapping[str, Any]) -> list[str]:
        """Keys of ``own`` (a suite entry less :data:`RUNNER_KEYS`) the protocol does not know; the one
        check that suite validation and :meth:`params` share."""
        known = cls.known_parameters()
        return [] if known is None else sorted(k for k in own if k not in known and k not in RUNNER_KEYS)

    def params(self, ctx: EvalContext) -> dict[str, Any]:
        """:attr:`defaults` overridden by the suite's params.

        Raises:
            ValueError: naming an unknown parameter and the known ones.
        """
        own = {k: v for k, v in ctx.params.items() if k not in RUNNER_KEYS}
        unknown = self.unknown_parameters(own)
        if unknown:
            raise ValueError(f"{self.name}: unknown params {unknown}; known: {sorted(self.known_parameters() or ())}")
        return {**self.defaults, **own}

    def applicable(self, ctx: EvalContext) -> str | None:
        """``None`` when the protocol can run on this datamodule, else the reason it cannot.

        The base checks what the class declares: labels (:attr:`needs_labels`), masks (:attr:`needs_mask`)
        and a validation split when the protocol selects on it (:attr:`selection`). Subclasses add their own
        checks and then call this.
        """
        dm = ctx.datamodule
        if self.needs_labels and not dm.label_names:
            return "dataset has no labels"
        if self.needs_mask:
            sample = dm.dataset("test", augment=False)[0]
            if sample is None or "mask" not in sample:
                return "dataset has no masks"
        if self.selection and len(dm.dataset("val", augment=False)) == 0:
            return f"dataset has no validation split ({self.selection})"
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


def constant_class_flags(y: np.ndarray, names: Sequence[str], where: str) -> list[str]:
    """``note:`` flags naming classes whose known labels in ``y`` are all one value (AUC undefined)."""
    bad = [str(names[k]) if k < len(names) else str(k) for k in range(y.shape[1])
           if len(np.unique(y[~np.isnan(y[:, k]), k])) < 2]
    return [f"note: {len(bad)} of {y.shape[1]} classes without both labels in {where} ({', '.join(bad)})"] if bad else []


def label_samples(ids: Sequence[str], scores: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-sample arrays of a classification protocol (for :class:`ProtocolResult`)."""
    return {"ids": np.asarray([str(i) for i in ids]), "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels, np.float32), "class_names": np.asarray([str(n) for n in names])}


def per_class(y: np.ndarray, scores: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
              name: str) -> list[float]:
    """``metric(labels, scores)`` of each class that has both a positive and a negative (NaN labels ignored).

    Raises:
        ValueError: no class has both labels (``name`` is then undefined).
    """
    out = []
    for k in range(y.shape[1]):
        ok = ~np.isnan(y[:, k])
        yk = y[ok, k]
        if len(np.unique(yk)) >= 2:
            out.append(float(metric(yk, scores[ok, k])))
    if not out:
        raise ValueError(f"no class has both positive and negative test labels: {name} undefined")
    return out


def macro_auc(y: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    """Mean ROC-AUC over classes that have both a positive and a negative (NaN labels ignored)."""
    from sklearn.metrics import roc_auc_score  # lazy: heavy import (scikit-learn), only scoring needs it

    aucs = per_class(y, scores, roc_auc_score, "AUC")
    return float(np.mean(aucs)), aucs
