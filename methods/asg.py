"""ASG: anatomical structure-guided medical vision-language pretraining (Li et al., MICCAI 2024)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.encoders import ProjectionHead
from medvlp.encoders.vit import tokens_to_map
from medvlp.losses import clip_loss, region_sentence_alignment_loss, symmetric_kl_contrastive_loss
from medvlp.method import VLPMethod
from medvlp.registry import register_method
from medvlp.reports import TripletParser, split_sentences
from medvlp.roi import roi_align


class ASGAnnotator:
    """Derived-annotation builder: report → tag vector and, per anatomical region, the character spans
    of the sentences that describe it. Results are cached per report text (sha1)."""

    def __init__(self, parser: TripletParser, cache_size: int = 100_000) -> None:
        self.parser = parser
        self._cached = lru_cache(maxsize=cache_size)(self._annotate)

    def _annotate(self, digest: str, text: str) -> tuple[tuple[float, ...], tuple[tuple[tuple[int, int], ...], ...]]:
        sentences = split_sentences(text)
        triplets = self.parser.parse(text)
        spans: list[list[tuple[int, int]]] = [[] for _ in self.parser.region_names]
        index = {r: i for i, r in enumerate(self.parser.region_names)}
        for s, e, sentence in sentences:  # ImaGenome-style: a sentence is linked to every region it names
            for region in self.parser.sentence_regions(sentence):
                spans[index[region]].append((s, e))
        return tuple(self.parser.tag_vector(triplets)), tuple(tuple(x) for x in spans)

    def __call__(self, text: str) -> tuple[tuple[float, ...], tuple[tuple[tuple[int, int], ...], ...]]:
        return self._cached(hashlib.sha1(text.encode()).hexdigest(), text)


class TagDecoder(nn.Module):
    """ASG's image-tag recognition decoder (``IRLModel``): tag queries attend to patch tokens.

    Pre-norm transformer decoder; queries are frozen text-encoder embeddings of the tag names.
    """

    def __init__(self, query_dim: int, dim: int, layers: int = 4, heads: int = 4, ffn: int = 1024) -> None:
        super().__init__()
        self.query_proj = nn.Linear(query_dim, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, ffn, dropout=0.1, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.classifier = nn.Linear(dim, 1)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``queries`` (T, Dq), ``tokens`` (B, N, D) → logits (B, T)."""
        q = self.query_proj(queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.classifier(self.decoder(q, tokens)).squeeze(-1)


@register_method("asg")
class ASG(VLPMethod):
    """ASG (arXiv 2403.09294; official code ``ASGMVLP/ASGMVLP_CODE``, built on MGCA).

    ``L = L_IRA + L_ARSA + 5·L_IRL + L_ERL`` (official ``main.py``):

    * **IRA** (image–report alignment): symmetric InfoNCE on global embeddings, τ = 0.07.
    * **ARSA** (anatomical region–sentence alignment, §2.2): region features by RoI Align on the patch
      grid; sentence features = mean of word features of the sentence(s) that describe the region;
      bidirectional CE over the regions of one image, absent regions masked with −inf
      (:func:`~medvlp.losses.region_sentence_alignment_loss`).
    * **IRL** (image-tag recognition, §2.3): a 4-layer, 4-head pre-norm transformer decoder (FFN 1024)
      whose queries are frozen text embeddings of the tag names and whose keys/values are patch
      tokens; BCE with uncertain (−1) mapped to 0.
    * **ERL** (soft-label contrastive, §2.3): ``soft_ij = cos(tag_i, tag_j)``;
      target = ``L1norm(0.8·I + 0.2·soft)``; symmetric KL on i2t and t2i logits.

    Required batch keys: ``image``, ``text``, ``regions`` (boxes in the parser's region order; the
    phantom X-ray data provides them; Chest ImaGenome provides them for MIMIC-CXR).

    Deviations (the official ``labels.pickle`` with ImaGenome boxes, 40 tags and sentence indices is
    not released):

    * Tags and region–sentence links come from :class:`~medvlp.reports.TripletParser`
      (rule-based, configurable vocabularies) through :class:`ASGAnnotator`, not from the official
      re-labelled data; the default tag list has 20 tags, not 40.
    * Tag vectors get one extra "no finding" dimension (1 when no tag is positive) so the cosine is
      defined for normal reports (the official code normalises all-zero vectors).
    * Sentence features pool the report's token features by character span (fast tokenizer offsets)
      instead of ``sent_indexs`` over MGCA word-piece aggregation.
    * RoI Align is implemented with ``grid_sample`` (no torchvision); 2×2 samples, 1×1 output.
    * Tag queries: pooled output of the (shared) text encoder at first use, then frozen in a buffer.

    Args:
        local_dim: width of the region/sentence local embeddings (official: 128).
        local_temperature: τ of ARSA.
        decoder_layers: IRL decoder depth. decoder_heads: its heads. decoder_ffn: its FFN width.
        soft_label_weight: weight of the soft term in the ERL target (0.2).
        regions: region name → surface forms (default Chest ImaGenome-style lung zones).
        tags: tag → surface forms.
        use_regions: set False for data without boxes (drops ARSA; a documented ablation).
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "asg"

    def __init__(self, local_dim: int = 128, local_temperature: float = 0.1, decoder_layers: int = 4,
                 decoder_heads: int = 4, decoder_ffn: int = 1024, soft_label_weight: float = 0.2,
                 regions: Mapping[str, Sequence[str]] | None = None, tags: Mapping[str, Sequence[str]] | None = None,
                 use_regions: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parser = TripletParser(regions, tags)
        self.annotator = ASGAnnotator(self.parser)
        self.required_keys = frozenset({"image", "text", "regions"} if use_regions else {"image", "text"})  # type: ignore[misc]
        self.use_regions = use_regions
        d_img, d_txt = self.image_encoder.embed_dim, self.text_encoder.embed_dim
        self.region_proj = ProjectionHead(d_img, local_dim, None, 2, "bn")
        self.sentence_proj = ProjectionHead(d_txt, local_dim, None, 2, "bn")
        self.local_temperature = local_temperature
        heads = decoder_heads if d_img % decoder_heads == 0 else 1
        self.tag_decoder = TagDecoder(d_txt, d_img, decoder_layers, heads, decoder_ffn)
        self.register_buffer("tag_queries", torch.zeros(len(self.parser.tag_names), d_txt))
        self.register_buffer("tag_queries_ready", torch.zeros((), dtype=torch.bool))
        self.soft_label_weight = soft_label_weight

    def _tag_queries(self) -> torch.Tensor:
        if not bool(self.tag_queries_ready):
            with torch.no_grad():
                was = self.text_encoder.training
                self.text_encoder.eval()
                self.tag_queries.copy_(self.text_encoder(self.parser.tag_names)["pooled"])
                self.text_encoder.train(was)
            self.tag_queries_ready.fill_(True)
        return self.tag_queries

    def _annotations(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, list[Any]]:
        tags, spans = zip(*[self.annotator(t) for t in texts])
        return torch.tensor(tags, dtype=torch.float32, device=device), list(spans)

    @staticmethod
    def sentence_pooling_weights(offsets: torch.Tensor, attention: torch.Tensor, spans: list[Any]) -> torch.Tensor:
        """``(B, R, L)`` weights averaging the tokens inside each region's sentence spans."""
        b, length, _ = offsets.shape
        r = len(spans[0])
        w = torch.zeros(b, r, length)
        starts, ends = offsets[..., 0].cpu(), offsets[..., 1].cpu()
        valid = (ends > starts) & attention.bool().cpu()
        for i in range(b):
            for k, region_spans in enumerate(spans[i]):
                for s, e in region_spans:
                    w[i, k] += ((starts[i] >= s) & (ends[i] <= e) & valid[i]).float()
        w = w.clamp(max=1.0)
        return w / w.sum(-1, keepdim=True).clamp_min(1.0)

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        feats = self.image_features(image)
        text = self.text_encoder(list(batch["text"]))
        img_emb = self.image_proj(feats["pooled"])
        txt_emb = self.text_proj(text["pooled"])
        out: dict[str, torch.Tensor] = {"ira_loss": clip_loss(img_emb, txt_emb, self.temperature, self.gather_negatives)}
        tags, spans = self._annotations(batch["text"], image.device)
        # IRL: tag recognition, uncertain (-1) → 0
        logits = self.tag_decoder(self._tag_queries(), feats["tokens"])
        out["irl_loss"] = F.binary_cross_entropy_with_logits(logits, (tags == 1).float())
        # ERL: soft-label contrastive
        pos = (tags == 1).float()
        vec = torch.cat([pos, (pos.sum(1, keepdim=True) == 0).float()], 1)
        soft = F.normalize(vec, dim=1) @ F.normalize(vec, dim=1).t()
        target = (1 - self.soft_label_weight) * torch.eye(len(vec), device=vec.device) + self.soft_label_weight * soft
        target = target / target.sum(1, keepdim=True)
        out["erl_loss"] = symmetric_kl_contrastive_loss(img_emb, txt_emb, target, self.temperature)
        if self.use_regions:
            fmap = tokens_to_map(feats["tokens"], feats["grid"])
            region = self.region_proj(roi_align(fmap, batch["regions"], tuple(image.shape[-2:])))
            weights = self.sentence_pooling_weights(text["offsets"], text["attention_mask"], spans).to(image.device)
            sentence = self.sentence_proj(torch.einsum("brl,bld->brd", weights.to(text["tokens"].dtype), text["tokens"]))
            present = weights.sum(-1) > 0
            if "region_present" in batch:
                present = present & batch["region_present"].bool()
            out["arsa_loss"] = region_sentence_alignment_loss(region, sentence, present, self.local_temperature)
            out["regions_per_image"] = present.float().sum(1).mean()
        return out
