"""Zero-shot multi-label classification from prompts."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.benchmarks.protocols.linear_probe import is_one_hot
from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, constant_class_flags,
                                       label_samples, macro_auc, mean_recipe)
from medvlp.registry import register_benchmark


@register_benchmark("zero_shot")
class ZeroShot(Protocol):
    """Zero-shot classification on the test split.

    Each class ``k`` gets positive prompts (``datamodule.class_prompts()``) and, when the datamodule
    offers them, negated prompts (``negative_prompts()``). The score of class ``k`` is
    ``cos(img, t_k^+) − cos(img, t_k^-)`` (a binary softmax logit, as CheXzero); without negated
    prompts it is the softmax over classes of ``cos(img, t_k)/0.07``. Class embeddings are the mean of
    the normalised prompt embeddings (CLIP recipe) from :meth:`zero_shot_classifier`, which a method may
    override (UMCL's learned prompts). Metric: macro ROC-AUC over classes with both labels present.

    Prompts come from the datamodule (its packaged ``datamodules/prompts/<name>.yaml`` when present) or
    from ``prompts_file`` (YAML ``{class: {positive: [...], negative: [...]}}``). With one-hot labels
    (multi-class sets such as CheXpert 5x200, COVIDx) the arg-max accuracy is reported too (GLoRIA's
    5x200 zero-shot protocol).

    Params: ``prompts`` = ``"handcrafted"`` (default) or ``"learned"`` (methods exposing
    ``learned_zero_shot_classifier``); ``prompts_file``; ``negatives`` (default true: use negated
    prompts when offered; false: the softmax-over-classes score, as CLIP). The GLoRIA/MGCA arg-max
    protocol is the separate variant ``zero_shot_argmax`` (:class:`ZeroShotArgmax`).
    """

    parameters = {
        "prompts": "handcrafted | learned (handcrafted)",
        "prompts_file": "YAML {class: {positive: [...], negative: [...]}} replacing the packaged prompts",
        "negatives": "score cos(positive) - cos(negated) (true)",
    }

    name = "zero_shot"
    needs_text = True
    needs_labels = True
    primary_metric = "auc"

    def applicable(self, ctx: EvalContext) -> str | None:
        reason = super().applicable(ctx)
        if reason is None and ctx.params.get("prompts", "handcrafted") == "learned" \
                and not hasattr(ctx.model, "learned_zero_shot_classifier"):
            return "method has no learned prompts"
        return reason

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        dm, model = ctx.datamodule, ctx.model
        feats = ctx.features.get(model, dm, "test", ctx.device)
        img = torch.from_numpy(feats.image_embedding)
        mode = ctx.params.get("prompts", "handcrafted")
        if mode == "learned":
            pos, neg = model.learned_zero_shot_classifier(dm.label_names)
        elif ctx.params.get("prompts_file"):
            import yaml

            table = yaml.safe_load(open(ctx.params["prompts_file"], encoding="utf-8"))
            missing = [n for n in dm.label_names if n not in table]
            if missing:
                raise KeyError(f"{ctx.params['prompts_file']}: no prompts for classes {missing}")
            pos = model.zero_shot_classifier({n: table[n]["positive"] for n in dm.label_names})
            neg = (model.zero_shot_classifier({n: table[n]["negative"] for n in dm.label_names})
                   if ctx.params.get("negatives", True) else None)
        else:
            pos = model.zero_shot_classifier(dm.class_prompts())
            use_neg = bool(ctx.params.get("negatives", True))
            negatives = dm.negative_prompts() if use_neg and hasattr(dm, "negative_prompts") else {}
            neg = model.zero_shot_classifier(negatives) if negatives else None
        pos = F.normalize(pos.float().cpu(), dim=-1)
        if neg is not None:
            scores = img @ pos.t() - img @ F.normalize(neg.float().cpu(), dim=-1).t()
            how = "cos(img, positive prompt) − cos(img, negated prompt)"
        else:
            scores = torch.softmax(img @ pos.t() / 0.07, dim=1)
            how = "softmax over class prompts"
        auc, _ = macro_auc(feats.labels, scores.numpy())
        definition = (f"macro ROC-AUC over classes with both labels in the test split (N={len(feats.ids)}); "
                      f"score = {how}; {mode} prompts")
        values = [MetricValue("auc", auc, definition)]
        names = list(dm.label_names)
        samples = label_samples(feats.ids, scores.numpy(), feats.labels, names)
        recipes = {"auc": auc_recipe()}
        if is_one_hot(feats.labels):
            samples["correct"] = (scores.numpy().argmax(1) == feats.labels.argmax(1)).astype("float32")
            recipes["acc"] = mean_recipe("correct", 1.0 / feats.labels.shape[1])
            acc = float((scores.numpy().argmax(1) == feats.labels.argmax(1)).mean())
            values.append(MetricValue("acc", acc, f"multi-class accuracy of the arg-max class score (N={len(feats.ids)}); "
                                                  f"{mode} prompts"))
        return ProtocolResult(values, samples=samples, recipes=recipes,
                              flags=constant_class_flags(feats.labels, names, "the test split"))


def max_f1(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes (with both labels) of the best F1 over all score thresholds, one-vs-rest
    (BenchX's zero-shot F1)."""
    from sklearn.metrics import precision_recall_curve

    out = []
    for k in range(y.shape[1]):
        ok = ~np.isnan(y[:, k])
        yk = y[ok, k]
        if len(np.unique(yk)) < 2:
            continue
        prec, rec, _ = precision_recall_curve(yk, scores[ok, k])
        f1 = 2 * prec * rec / np.clip(prec + rec, 1e-12, None)
        out.append(float(f1.max()))
    if not out:
        raise ValueError("no class has both positive and negative test labels: F1 undefined")
    return float(np.mean(out))


@register_benchmark("zero_shot_argmax")
class ZeroShotArgmax(ZeroShot):
    """Zero-shot classification as GLoRIA/MGCA report it on CheXpert 5x200 (and BenchX on 5x200 sets).

    GLoRIA ``zero_shot_classification`` / BenchX ``bin/zeroshot.py``: every prompt of class ``k`` is
    embedded; the class similarity of an image is the maximum cosine over the class's prompts
    (``prompt_pool: max``; ``mean`` averages instead); each class column is standardised over the test
    images (z-score, as GLoRIA); the predicted class is the arg-max. No negated prompts.

    Metrics: ``acc`` (arg-max accuracy, one-hot label sets only), ``f1_macro`` (macro F1 of the arg-max
    predictions, one-hot sets), ``max_f1`` (per class best F1 over thresholds of the standardised score,
    mean over classes; BenchX) and ``auc`` (macro ROC-AUC of the same scores).

    Deviations: GLoRIA also adds a local (word–region) similarity for GLoRIA models; medvlp uses the
    global embeddings of every method. BenchX samples 10 prompts per class from its templates; the
    prompts here are the datamodule's (or ``prompts_file``'s) positive prompts.
    """

    parameters = {
        "prompts_file": "YAML {class: {positive: [...]}} replacing the datamodule's prompts",
        "prompt_pool": "max | mean over a class's prompts (max)",
    }

    name = "zero_shot_argmax"
    variant = "gloria_argmax"

    def applicable(self, ctx: EvalContext) -> str | None:
        return Protocol.applicable(self, ctx)  # labels only: the arg-max protocol has no learned-prompt mode

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:
        from sklearn.metrics import f1_score

        dm, model = ctx.datamodule, ctx.model
        feats = ctx.features.get(model, dm, "test", ctx.device)
        img = F.normalize(torch.from_numpy(feats.image_embedding).float(), dim=-1)
        if ctx.params.get("prompts_file"):
            import yaml

            table = yaml.safe_load(open(ctx.params["prompts_file"], encoding="utf-8"))
            missing = [n for n in dm.label_names if n not in table]
            if missing:
                raise KeyError(f"{ctx.params['prompts_file']}: no prompts for classes {missing}")
            prompts = {n: table[n]["positive"] for n in dm.label_names}
        else:
            prompts = dm.class_prompts()
        pool = ctx.params.get("prompt_pool", "max")
        if pool not in ("max", "mean"):
            raise ValueError(f"prompt_pool must be max|mean, got {pool!r}")
        cols = []
        for name in dm.label_names:
            t = F.normalize(model.encode_text(list(prompts[name])).float().cpu(), dim=-1)
            sims = img @ t.t()
            cols.append(sims.max(1).values if pool == "max" else sims.mean(1))
        sim = torch.stack(cols, 1).numpy()
        if sim.shape[0] > 1:
            sim = (sim - sim.mean(0)) / np.clip(sim.std(0), 1e-12, None)
        y = feats.labels
        n = len(feats.ids)
        how = f"{pool} cosine over each class's prompts, z-scored per class over N={n} test images, no negated prompts"
        values = []
        if is_one_hot(y):
            pred, true = sim.argmax(1), y.argmax(1)
            values.append(MetricValue("acc", float((pred == true).mean()), f"arg-max accuracy; {how}"))
            values.append(MetricValue("f1_macro", float(f1_score(true, pred, average="macro")),
                                      f"macro F1 of the arg-max class; {how}"))
        values.append(MetricValue("max_f1", max_f1(y, sim), f"per-class max F1 over thresholds, mean over classes; {how}"))
        values.append(MetricValue("auc", macro_auc(y, sim)[0], f"macro ROC-AUC of the class scores; {how}"))
        names = list(dm.label_names)
        samples = label_samples(feats.ids, sim, y, names)
        recipes = {"auc": auc_recipe()}
        if is_one_hot(y):
            samples["correct"] = (sim.argmax(1) == y.argmax(1)).astype("float32")
            recipes["acc"] = mean_recipe("correct", 1.0 / y.shape[1])
        return ProtocolResult(values, comparability={"protocol_variant": self.variant}, samples=samples,
                              recipes=recipes, flags=constant_class_flags(y, names, "the test split"))
