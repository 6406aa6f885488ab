"""Zero-shot classification from prompts: medvlp's ``zero_shot`` and the GLoRIA/MGCA/BenchX arg-max
protocol ``zero_shot_argmax``."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medvlp.benchmarks.kit.fidelity import Element, documented, fidelity
from medvlp.benchmarks.protocols.linear_probe import is_one_hot
from medvlp.benchmarks.kit.protocol import (EvalContext, MetricValue, Protocol, ProtocolResult, auc_recipe, constant_class_flags,
                                       label_samples, macro_auc, mean_recipe, per_class)
from medvlp.registry import register_benchmark
import yaml
import random


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
    from sklearn.metrics import precision_recall_curve  # lazy: heavy import (scikit-learn), only this path needs it

    def best_f1(yk: np.ndarray, sk: np.ndarray) -> float:
        prec, rec, _ = precision_recall_curve(yk, sk)
        return float((2 * prec * rec / np.clip(prec + rec, 1e-12, None)).max())

    return float(np.mean(per_class(y, scores, best_f1, "F1")))


BENCHX = "yangzhou12/BenchX @ b874fa6"


def _argmax_elements() -> list[Element]:
    zs, zm = "bin/test_zeroshot.py", "unifier/blocks/zeroshot/zeroshot_model.py"
    return [
        Element("class score", "max cosine over the class's prompts", f"{BENCHX} {zm} L72-92 (L78 max)",
                "prompt_pool max (mean offered)", param="prompt_pool", value="max"),
        Element("standardisation", "z-score per class over the images of each batch (numpy std, ddof 0); GLoRIA: "
                "over the whole test set", f"{zm} L84-87", "convention benchx: per batch; gloria: whole set",
                param="convention", value="benchx"),
        Element("prompts", "generate_chexpert_class_prompts(n=5): 5 random.sample'd prompts per class, once per run",
                f"{zs} L77; unifier/blocks/zeroshot/prompts.py L131-149", "convention benchx: 5 prompts per class "
                "drawn (seeded) from the datamodule's prompts", "BenchX samples from its CheXpert severity × "
                "subtype × location templates; medvlp from the datamodule's (or prompts_file's) prompts"),
        Element("batches", "RandomSampler without replacement, the config's batch size, metrics averaged over batches",
                f"{zs} L85-115", "convention benchx: seeded random batches of batch_size (64), mean over batches",
                "BenchX ships no zero-shot config (batch size is the user's); medvlp's default is 64"),
        Element("metrics", "mean over classes of max F1 over the PR curve; arg-max accuracy", f"{zm} L106-134",
                "max_f1 and acc (GLoRIA convention adds f1_macro and auc over the set)"),
        Element("similarity", "global cosine (GLoRIA models: (local + global) / 2)", f"{zm} L44-70",
                "global embeddings of every method", "medvlp has no method-independent local similarity"),
    ]


@register_benchmark("zero_shot_argmax")
@documented(_argmax_elements)
class ZeroShotArgmax(ZeroShot):
    """Zero-shot classification as GLoRIA/MGCA (``convention: gloria``, default) and BenchX
    (``convention: benchx``) report it on 5x200 sets.

    Every prompt of class ``k`` is embedded; the class similarity of an image is the maximum cosine over
    the class's prompts (``prompt_pool: max``; ``mean`` averages instead); each class column is
    standardised (z-score) and the predicted class is the arg-max. No negated prompts.

    * ``gloria``: all of the datamodule's prompts; z-scores over the whole test set; metrics over the
      set: ``acc`` (one-hot sets), ``f1_macro``, ``max_f1``, ``auc``.
    * ``benchx``: ``n_prompts`` (5) prompts per class drawn once (seeded) as BenchX's
      ``generate_chexpert_class_prompts(n=5)``; the test set in seeded random batches of ``batch_size``
      (64); z-scores per batch; ``acc`` and ``max_f1`` per batch, averaged over batches (BenchX's
      numbers; batch statistics, so no per-sample recipes).
    """

    parameters = {
        "prompts_file": "YAML {class: {positive: [...]}} replacing the datamodule's prompts",
        "prompt_pool": "max | mean over a class's prompts (max)",
        "convention": "gloria (whole-set z-score, all prompts) | benchx (per-batch z-score, 5 prompts) (gloria)",
        "batch_size": "benchx convention: images per batch (64)",
        "n_prompts": "benchx convention: prompts sampled per class (5)",
    }

    name = "zero_shot_argmax"
    variant = "gloria_argmax"

    def applicable(self, ctx: EvalContext) -> str | None:
        return Protocol.applicable(self, ctx)  # labels only: the arg-max protocol has no learned-prompt mode

    @staticmethod
    def zscore(sim: np.ndarray) -> np.ndarray:
        """Per-class z-score over the rows (numpy std, ddof 0); one row is left as it is."""
        return (sim - sim.mean(0)) / np.clip(sim.std(0), 1e-12, None) if sim.shape[0] > 1 else sim

    @torch.no_grad()
    def run(self, ctx: EvalContext, fraction: float = 1.0, seed: int = 0) -> ProtocolResult:

        from sklearn.metrics import f1_score  # lazy: heavy import (scikit-learn), only this path needs it

        dm, model = ctx.datamodule, ctx.model
        feats = ctx.features.get(model, dm, "test", ctx.device)
        img = F.normalize(torch.from_numpy(feats.image_embedding).float(), dim=-1)
        if ctx.params.get("prompts_file"):

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
        convention = ctx.params.get("convention", "gloria")
        if convention not in ("gloria", "benchx"):
            raise ValueError(f"convention must be gloria|benchx, got {convention!r}")
        if convention == "benchx":
            n_prompts, rng = int(ctx.params.get("n_prompts", 5)), random.Random(seed)
            prompts = {n: (rng.sample(list(prompts[n]), n_prompts) if len(prompts[n]) > n_prompts else list(prompts[n]))
                       for n in dm.label_names}
        cols = []
        for name in dm.label_names:
            t = F.normalize(model.encode_text(list(prompts[name])).float().cpu(), dim=-1)
            sims = img @ t.t()
            cols.append(sims.max(1).values if pool == "max" else sims.mean(1))
        raw = torch.stack(cols, 1).numpy()
        y = feats.labels
        n = len(feats.ids)
        names = list(dm.label_names)
        comp = {"protocol_variant": f"{convention}_argmax"}
        if convention == "benchx":
            return self._benchx(ctx, raw, y, names, pool, seed, comp, list(feats.ids))
        sim = self.zscore(raw)
        how = f"{pool} cosine over each class's prompts, z-scored per class over N={n} test images, no negated prompts"
        values = []
        if is_one_hot(y):
            pred, true = sim.argmax(1), y.argmax(1)
            values.append(MetricValue("acc", float((pred == true).mean()), f"arg-max accuracy; {how}"))
            values.append(MetricValue("f1_macro", float(f1_score(true, pred, average="macro")),
                                      f"macro F1 of the arg-max class; {how}"))
        values.append(MetricValue("max_f1", max_f1(y, sim), f"per-class max F1 over thresholds, mean over classes; {how}"))
        values.append(MetricValue("auc", macro_auc(y, sim)[0], f"macro ROC-AUC of the class scores; {how}"))
        samples = label_samples(feats.ids, sim, y, names)
        recipes = {"auc": auc_recipe()}
        if is_one_hot(y):
            samples["correct"] = (sim.argmax(1) == y.argmax(1)).astype("float32")
            recipes["acc"] = mean_recipe("correct", 1.0 / y.shape[1])
        comp["fidelity"] = fidelity(self.fidelity_elements, ctx.params, ["convention gloria (GLoRIA's whole-set z-score)"])
        return ProtocolResult(values, comparability=comp, samples=samples, recipes=recipes,
                              flags=constant_class_flags(y, names, "the test split"))

    def _benchx(self, ctx: EvalContext, raw: np.ndarray, y: np.ndarray, names: list[str], pool: str, seed: int,
                comp: dict, ids: list) -> ProtocolResult:
        """BenchX's per-batch evaluation: random batches, z-score per batch, metrics averaged over batches."""
        bs = int(ctx.params.get("batch_size", 64))
        order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed)).numpy()
        accs, f1s = [], []
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            sim, yb = self.zscore(raw[idx]), y[idx]
            accs.append(float((sim.argmax(1) == np.nan_to_num(yb).argmax(1)).mean()))
            try:
                f1s.append(max_f1(yb, sim))
            except ValueError:
                pass  # no class with both labels in this batch
        how = (f"BenchX convention: {pool} cosine over {ctx.params.get('n_prompts', 5)} sampled prompts per class, "
               f"z-scored per class within each of {len(accs)} random batches of {bs}, mean over batches")
        values = [MetricValue("acc", float(np.mean(accs)), f"arg-max accuracy (BenchX base_acc); {how}")]
        if f1s:
            values.append(MetricValue("max_f1", float(np.mean(f1s)), f"per-class max F1 over thresholds; {how}"))
        comp["fidelity"] = fidelity(self.fidelity_elements, ctx.params)
        return ProtocolResult(values, comparability=comp, samples={"ids": np.asarray([str(i) for i in ids])},
                              flags=constant_class_flags(y, names, "the test split"))
