"""Zero-shot multi-label classification from prompts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from medvlp.benchmarks.linear_probe import is_one_hot
from medvlp.benchmarks.protocol import EvalContext, MetricValue, Protocol, ProtocolResult, macro_auc
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
    ``learned_zero_shot_classifier``); ``prompts_file``.
    """

    name = "zero_shot"
    needs_text = True

    def applicable(self, ctx: EvalContext) -> str | None:
        if not ctx.datamodule.label_names:
            return "dataset has no labels"
        if ctx.params.get("prompts", "handcrafted") == "learned" and not hasattr(ctx.model, "learned_zero_shot_classifier"):
            return "method has no learned prompts"
        return None

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
            neg = model.zero_shot_classifier({n: table[n]["negative"] for n in dm.label_names})
        else:
            pos = model.zero_shot_classifier(dm.class_prompts())
            negatives = dm.negative_prompts() if hasattr(dm, "negative_prompts") else {}
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
        if is_one_hot(feats.labels):
            acc = float((scores.numpy().argmax(1) == feats.labels.argmax(1)).mean())
            values.append(MetricValue("acc", acc, f"multi-class accuracy of the arg-max class score (N={len(feats.ids)}); "
                                                  f"{mode} prompts"))
        return ProtocolResult(values)
