"""Linear probe: logistic regression on cached frozen features at label fractions × seeds."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, constant_class_flags,
                                       label_samples, macro_auc, mean_recipe)
from medvlp.benchmarks.kit.splits import fraction_rows
from medvlp.registry import register_benchmark


def fit_predict_multilabel(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 1.0,
                           max_iter: int = 2000) -> np.ndarray:
    """One logistic regression per class on standardised features; returns test probabilities.

    A class whose training labels are all one value (small fractions) gets that constant score, which
    yields AUC 0.5 for it: the honest outcome of having no signal.
    """
    scaler = StandardScaler().fit(x_train)
    xtr, xte = scaler.transform(x_train), scaler.transform(x_test)
    scores = np.zeros((x_test.shape[0], y_train.shape[1]), np.float64)
    for k in range(y_train.shape[1]):
        ok = ~np.isnan(y_train[:, k])
        yk = y_train[ok, k]
        if len(np.unique(yk)) < 2:
            scores[:, k] = float(yk[0]) if len(yk) else 0.5
            continue
        clf = LogisticRegression(C=c, max_iter=max_iter)
        clf.fit(xtr[ok], yk.astype(int))
        scores[:, k] = clf.predict_proba(xte)[:, 1]
    return scores


def is_one_hot(labels: np.ndarray) -> bool:
    """True for multi-class one-hot label matrices (K > 1, each row has exactly one 1)."""
    return labels.shape[1] > 1 and not np.isnan(labels).any() and bool(np.all(labels.sum(1) == 1))


@register_benchmark("linear_probe")
class LinearProbe(Protocol):
    """Frozen backbone features (``image_representation``) → per-class logistic regression.

    Training subset: ``fraction`` of the train split chosen by :func:`fraction_ids` for ``seed``
    (hash recorded). Features are extracted once per checkpoint and split and reused for every
    fraction and seed (MGCA instead re-encodes images every epoch). Metric: macro ROC-AUC on the test
    split. Params: ``C`` (inverse L2 strength, default 1.0).
    """

    parameters = {
        "C": "inverse L2 strength of the logistic regression (1.0)",
    }

    name = "linear_probe"
    uses_fractions = True
    deterministic = True  # lbfgs on fixed features: the training seed cannot change the result
    primary_metric = "auc"
    needs_labels = True

    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        train = ctx.features.get(ctx.model, ctx.datamodule, "train", ctx.device)
        test = ctx.features.get(ctx.model, ctx.datamodule, "test", ctx.device)
        subset_seed = ctx.subset_seed_for(seed)
        rows, subset_hash = fraction_rows(train.ids, fraction, subset_seed)
        scores = fit_predict_multilabel(train.representation[rows], train.labels[rows], test.representation,
                                        c=float(ctx.params.get("C", 1.0)))
        auc, _ = macro_auc(test.labels, scores)
        how = (f"logistic regression on frozen backbone features, trained on {len(rows)} train samples "
               f"({fraction:g} of {len(train.ids)}, subset seed {subset_seed})")
        values = [MetricValue("auc", auc, f"macro ROC-AUC on test (N={len(test.ids)}); {how}")]
        if is_one_hot(test.labels):  # multi-class (e.g. COVIDx, reported as ACC by MGCA/ASG/UniMedI)
            acc = float((scores.argmax(1) == test.labels.argmax(1)).mean())
            values.append(MetricValue("acc", acc, f"accuracy of the arg-max class on test (N={len(test.ids)}); {how}"))
        names = list(ctx.datamodule.label_names)
        samples = label_samples(test.ids, scores, test.labels, names)
        recipes = {"auc": auc_recipe()}
        if is_one_hot(test.labels):
            samples["correct"] = (scores.argmax(1) == test.labels.argmax(1)).astype(np.float32)
            recipes["acc"] = mean_recipe("correct", 1.0 / test.labels.shape[1])
        flags = probe_flags(train.labels[rows], names) + constant_class_flags(test.labels, names, "the test split")
        return ProtocolResult(values, subset_hash, samples=samples, recipes=recipes, flags=flags)


def probe_flags(y_train: np.ndarray, names: list[str], min_samples: int = 10) -> list[str]:
    """Flags of a probe's training subset: ``degenerate`` below ``min_samples`` samples or when more than
    half of the classes have a single label value (constant score); ``note`` when fewer do."""
    flags = constant_class_flags(y_train, names, "the training subset")
    n_const = sum(len(np.unique(y_train[~np.isnan(y_train[:, k]), k])) < 2 for k in range(y_train.shape[1]))
    if len(y_train) < min_samples or n_const > y_train.shape[1] / 2:
        return [f"degenerate: probe trained on {len(y_train)} samples, {n_const} of {y_train.shape[1]} classes "
                "with a single label value (constant score)"]
    return flags
