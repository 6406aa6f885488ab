"""ASG: anatomical structure-guided medical vision-language pretraining (Li et al., MICCAI 2024)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medvlp.encoders import ProjectionHead
from medvlp.encoders.vit import tokens_to_map
from medvlp.losses import (
    asg_soft_targets,
    contrastive_logits,
    gather_global,
    region_sentence_alignment_loss,
    symmetric_kl_contrastive_loss,
)
from medvlp.method import VLPMethod
from medvlp.registry import register_method
from medvlp.reports import TripletParser, split_sentences
from medvlp.roi import roi_align
import yaml


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


def load_tag_vocabulary(tags: Mapping[str, Sequence[str]] | str | None) -> dict[str, list[str]]:
    """ASG's tag vocabulary: tag name → surface forms.

    Args:
        tags: a mapping, a YAML file path, or ``None`` for the packaged ``asg_tags.yaml`` (the 40 official
            tag names in official order; surface forms reconstructed, see that file's header).

    Raises:
        ValueError: naming the source when an entry is not ``name: [form, ...]``.
    """

    if tags is None:
        source = "medvlp.methods/asg_tags.yaml"
        raw = yaml.safe_load(resources.files("medvlp.methods").joinpath("asg_tags.yaml").read_text())
    elif isinstance(tags, (str, Path)):
        source = str(tags)
        raw = yaml.safe_load(Path(tags).read_text())
    else:
        source, raw = "tags argument", dict(tags)
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{source}: expected a non-empty mapping tag -> [surface forms], got {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    for name, forms in raw.items():
        if isinstance(forms, str):
            forms = [forms]
        if not isinstance(name, str) or not isinstance(forms, Sequence) or not forms \
                or not all(isinstance(f, str) and f.strip() for f in forms):
            raise ValueError(f"{source}: tag {name!r} must map to a non-empty list of strings, got {forms!r}")
        out[name] = [f.lower() for f in forms]
    return out


class TagDecoder(nn.Module):
    """ASG's image-tag recognition decoder (official ``models/irl_model.py``, ``IRLModel``).

    Tag queries attend to the raw patch tokens through a 4-layer, 4-head pre-norm transformer decoder
    (FFN 1024, ReLU, dropout 0.1) closed by a final LayerNorm, then dropout and ``Linear(D, 1)``; Linear
    and attention weights are initialised with N(0, 0.02). Queries enter the decoder as they are (768-d
    BERT embeddings against 768-d ViT tokens in the official setting); only when the text and image widths
    differ (small test encoders) a ``Linear`` maps the queries to the image width.
    """

    def __init__(self, query_dim: int, dim: int, layers: int = 4, heads: int = 4, ffn: int = 1024,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.query_proj: nn.Module = nn.Identity() if query_dim == dim else nn.Linear(query_dim, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, ffn, dropout=dropout, activation="relu", batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02)
                nn.init.normal_(m.out_proj.weight, std=0.02)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``queries`` (T, Dq), ``tokens`` (B, N, D) → logits (B, T)."""
        q = self.query_proj(queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.classifier(self.dropout(self.decoder(q, tokens))).squeeze(-1)


def asg_losses(img_emb: torch.Tensor, txt_emb: torch.Tensor, tags: torch.Tensor, tag_logits: torch.Tensor,
               temperature: float | torch.Tensor = 0.07, soft_label_weight: float = 0.2,
               patch_emb: torch.Tensor | None = None, grid: Sequence[int] | None = None,
               boxes: torch.Tensor | None = None, spatial_scale: float | Sequence[float] = 1.0,
               word_emb: torch.Tensor | None = None, word_weights: torch.Tensor | None = None,
               present: torch.Tensor | None = None, local_temperature: float | torch.Tensor = 0.07,
               gather: bool = False) -> dict[str, torch.Tensor]:
    """The four ASG terms from projected features, in the official order of operations (``main.py``).

    * ``ira_loss`` = ``CE(i2t) + CE(t2i)`` on L2-normalised global embeddings / τ (a **sum**).
    * ``irl_loss`` = BCE(tag logits, tags) with uncertain (−1) mapped to 0, mean over B×T.
    * ``erl_loss`` = :func:`~medvlp.losses.symmetric_kl_contrastive_loss` (four KL terms / 4) against
      :func:`~medvlp.losses.asg_soft_targets` of the positive-tag vectors, on the IRA logits.
    * ``arsa_loss`` (when the local inputs are given): every patch and word embedding is L2-normalised
      first, then regions are RoI-aligned on the patch map and sentences averaged over their words;
      logits are plain dot products / τ_local, both directions summed
      (:func:`~medvlp.losses.region_sentence_alignment_loss`).

    Args:
        img_emb, txt_emb: ``(B, E)`` projected global embeddings.
        tags: ``(B, T)`` in {1, 0, −1}. tag_logits: ``(B, T)``.
        temperature: τ of IRA/ERL. soft_label_weight: ERL's ``w``.
        patch_emb: ``(B, N, E_l)`` projected patch embeddings; grid: their token grid ``(h, w)``.
        boxes: ``(B, R, 4)`` pixel boxes; spatial_scale: feature cells per pixel (``(sx, sy)`` or one).
        word_emb: ``(B, L, E_l)`` projected word embeddings; word_weights: ``(B, R, L)`` 0/1 membership of
            word ``l`` in the sentence(s) of region ``r``.
        present: ``(B, R)`` bool, regions that have a box and a sentence.
        local_temperature: τ of ARSA (official: the same 0.07).
        gather: global negatives across ranks for IRA and ERL (ERL's soft targets built on the gathered
            tags); official: per device.
    """
    li2t, lt2i, target = contrastive_logits(img_emb, txt_emb, temperature, gather)
    out = {"ira_loss": F.cross_entropy(li2t, target) + F.cross_entropy(lt2i, target)}
    pos = (tags == 1).to(tag_logits.dtype)
    out["irl_loss"] = F.binary_cross_entropy_with_logits(tag_logits, pos)
    if gather:  # global negatives: ERL on the gathered batch, its soft targets from the gathered tags
        img_g, txt_g = gather_global(img_emb, txt_emb)
        (pos_g,) = gather_global(pos, grad=False)
    else:
        img_g, txt_g, pos_g = img_emb, txt_emb, pos
    out["erl_loss"] = symmetric_kl_contrastive_loss(img_g, txt_g, asg_soft_targets(pos_g, soft_label_weight),
                                                    temperature)
    if patch_emb is not None:
        if grid is None or boxes is None or word_emb is None or word_weights is None or present is None:
            raise ValueError("ARSA needs patch_emb, grid, boxes, word_emb, word_weights and present together")
        fmap = tokens_to_map(F.normalize(patch_emb, dim=-1), grid)
        region = roi_align(fmap, boxes, spatial_scale)
        w = word_weights.to(word_emb.dtype)
        sentence = torch.einsum("brl,bld->brd", w, F.normalize(word_emb, dim=-1)) / w.sum(-1, keepdim=True).clamp_min(1)
        out["arsa_loss"] = region_sentence_alignment_loss(region, sentence, present, local_temperature)
    return out


def _span_lists(spans: Any) -> list[Any]:
    """Per sample, per region, ``(start, end)`` lists from a ``(B, R, S, 2)`` −1-padded tensor or lists."""
    if isinstance(spans, torch.Tensor):
        return [[[(s, e) for s, e in region if s >= 0] for region in sample] for sample in spans.tolist()]
    return list(spans)


@register_method("asg")
class ASG(VLPMethod):
    """ASG (arXiv 2403.09294; official code ``ASGMVLP/ASGMVLP_CODE``, built on MGCA).

    ``L = L_IRA + L_ARSA + 5·L_IRL + L_ERL`` (official ``main.py``; weights in ``asg.yaml``), terms as
    :func:`asg_losses` computes them:

    * **IRA** (image–report alignment): symmetric InfoNCE on global embeddings, τ = 0.07, the two
      directions summed.
    * **ARSA** (anatomical region–sentence alignment, §2.2): a local head (Linear 768→2048, BN, ReLU,
      Linear 2048→128, BN) projects and L2-normalises every patch token and every word token; regions
      are RoI-aligned (torchvision semantics, :func:`~medvlp.roi.roi_align`) on the projected patch map,
      sentences are the mean of their word embeddings; bidirectional CE (summed) over the regions of one
      image, τ = 0.07, absent regions masked.
    * **IRL** (image-tag recognition, §2.3): :class:`TagDecoder` (official ``IRLModel``) with queries =
      text-encoder CLS embeddings of the 40 official tag names; BCE with uncertain (−1) mapped to 0.
    * **ERL** (soft-label contrastive, §2.3): target ``L1norm(0.8·I + 0.2·S + 1e-6)``, ``S`` = cosine of
      the positive-tag vectors (zero rows for reports without tags); symmetric KL on i2t and t2i logits,
      the four KL terms / 4.
    * Global heads 768→2048→128 with BN (``proj_hidden_dim: 2048`` in ``asg.yaml``).

    Region–sentence links: a batch may carry ``region_spans`` (per sample, per region, character spans
    into ``text``, as a ``(B, R, S, 2)`` −1-padded tensor; ``mimic_cxr`` with ``region_source:
    chest_imagenome`` provides them with ``regions`` and ``region_present``, up to 23 pairs per image as
    ASG); otherwise :class:`ASGAnnotator` derives them from the report.

    Required batch keys: ``image``, ``text``, ``regions`` (pixel boxes in region order).

    Deviations from the official code (everything else follows it):

    * Tag *labels* come from :class:`~medvlp.reports.TripletParser` with the surface forms in
      ``asg_tags.yaml`` (reconstructed; the official ``labels.pickle`` and its labelling rules are not
      released). The tag names and order are official.
    * Without ``region_spans`` in the batch, region–sentence links come from the rule-based parser, not
      from Chest ImaGenome.
    * Words are word-piece tokens of the configured tokenizer, sentences pooled by character span
      (official: word pieces summed into words, ``sent_indexs``); BN statistics of the local text head
      run over the batch's padded length instead of ``max_length`` 112.
    * Tag queries: the shared text encoder's CLS output at first use, frozen in a buffer (official: a
      separate frozen 12-layer Bio_ClinicalBERT run every step in train mode, i.e. with dropout).
    * A batch without any present region gives ARSA = 0 (the official mean over no rows is NaN).
    * Box pooling: medvlp RoI-aligns each image's boxes on that image's own feature map. The official
      collate (``datasets/pretrain_dataset.py`` L143-187 @ 088e896) writes the batch index into column 0
      of ``regions`` *before* sorting the batch by caption length, and ``main.py`` L87-90 then pools with
      those pre-sort indices on the sorted feature maps, so whenever the sort permutes the batch a
      sample's boxes are pooled on another image's map (its sentence and region labels stay with it).
      medvlp does not reproduce that mismatch.
    * Optimizer: as the official ``main.py`` L229-235, one AdamW group decays every parameter (biases and
      norms included): ``decay_all: true`` in ``asg.yaml`` and ``asg.paper.yaml``.
    * Images: ``preset=paper`` sets the official pipeline on the X-ray datamodules (gray replicated to
      RGB, longest side → 256 + zero padding, random 224 crop in training / centre crop otherwise, boxes
      shifted and clipped with the crop, ImageNet mean/std); the region box of a region cropped out entirely
      is dropped as albumentations drops it. Without the preset the datamodule defaults apply (one channel,
      no crop, ``(x − 0.5) / 0.25``, ±10 % intensity jitter; ``init_from`` then sums DeiT-B's RGB patch
      kernels for the single channel). The readers min-max scale each image to [0, 1] (official: ``/ 255``
      of the 8-bit image; equal for images spanning 0..255).

    The official training setup (4 GPUs × 72, 50 epochs, early stopping on the validation loss with
    patience 5, DeiT-B init, Bio_ClinicalBERT cut to 6 layers, Chest ImaGenome regions) is
    ``methods/asg.paper.yaml``, applied with ``preset=paper``.

    Args:
        local_dim: width of the patch/word embeddings (official 128).
        local_hidden_dim: hidden width of the local heads (official 2048).
        local_temperature: τ of ARSA (official 0.07).
        decoder_layers: IRL decoder depth. decoder_heads: its heads. decoder_ffn: its FFN width.
        soft_label_weight: weight of the soft term in the ERL target (0.2).
        regions: region name → surface forms (parser-derived links; default Chest ImaGenome-style zones).
        tags: tag vocabulary: mapping, YAML path, or ``None`` for the packaged ``asg_tags.yaml``.
        use_regions: set False for data without boxes (drops ARSA; a documented ablation).
        **kwargs: :class:`~medvlp.method.VLPMethod` arguments.
    """

    name: ClassVar[str] = "asg"
    #: every term ASG can produce; ``arsa_loss`` is absent with ``use_regions: false`` (its weight then unused)
    loss_terms: ClassVar[tuple[str, ...]] = ("ira_loss", "arsa_loss", "irl_loss", "erl_loss")

    def __init__(self, local_dim: int = 128, local_hidden_dim: int | None = 2048, local_temperature: float = 0.07,
                 decoder_layers: int = 4, decoder_heads: int = 4, decoder_ffn: int = 1024,
                 soft_label_weight: float = 0.2, regions: Mapping[str, Sequence[str]] | None = None,
                 tags: Mapping[str, Sequence[str]] | str | None = None, use_regions: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parser = TripletParser(regions, load_tag_vocabulary(tags))
        self.annotator = ASGAnnotator(self.parser)
        self.required_keys = frozenset({"image", "text", "regions"} if use_regions else {"image", "text"})  # type: ignore[misc]
        self.use_regions = use_regions
        d_img, d_txt = self.image_encoder.embed_dim, self.text_encoder.embed_dim
        self.region_proj = ProjectionHead(d_img, local_dim, local_hidden_dim, 2, "bn")
        self.sentence_proj = ProjectionHead(d_txt, local_dim, local_hidden_dim, 2, "bn")
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
    def sentence_membership(offsets: torch.Tensor, attention: torch.Tensor, spans: list[Any]) -> torch.Tensor:
        """``(B, R, L)`` 0/1: token ``l`` lies inside one of region ``r``'s sentence spans."""
        b, length, _ = offsets.shape
        r = max((len(x) for x in spans), default=0)
        w = torch.zeros(b, r, length)
        starts, ends = offsets[..., 0].cpu(), offsets[..., 1].cpu()
        valid = (ends > starts) & attention.bool().cpu()
        for i in range(b):
            for k, region_spans in enumerate(spans[i]):
                for s, e in region_spans:
                    w[i, k] += ((starts[i] >= s) & (ends[i] <= e) & valid[i]).float()
        return w.clamp(max=1.0)

    def dense_text_similarity(self, image: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """``(B, h, w)`` similarity of text ``i`` with every patch cell of image ``i``: the map ARSA trains.

        With ``use_regions``: cosine of the L2-normalised :attr:`region_proj` patch embeddings with the
        sentence embedding, pooled as ARSA pools a sentence (mean of the L2-normalised :attr:`sentence_proj`
        word-piece embeddings, CLS and padding excluded, the whole text being one sentence), L2-normalised
        (its norm does not change the arg-max). Without ``use_regions`` the local heads are untrained, so
        the base class's dense global-projection map is used.
        """
        if not self.use_regions:
            return super().dense_text_similarity(image, texts)
        feats = self.dense_image_features(image, texts)
        grid = feats["grid"]
        patches = F.normalize(self.region_proj(feats["tokens"]), dim=-1)
        text = self.text_encoder(list(texts))
        offsets = text["offsets"].to(image.device)
        words = (offsets[..., 1] > offsets[..., 0]) & text["attention_mask"].to(image.device).bool()
        w = words[:, 1:].to(patches.dtype)
        word_emb = F.normalize(self.sentence_proj(text["tokens"][:, 1:]), dim=-1).to(patches.dtype)
        sentence = F.normalize((word_emb * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1), dim=-1)
        return torch.einsum("bne,be->bn", patches, sentence).reshape(image.shape[0], *grid)

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        feats = self.image_features(image)
        text = self.text_encoder(list(batch["text"]))
        img_emb = self.image_proj(feats["pooled"])
        txt_emb = self.text_proj(text["pooled"])
        tags, spans = self._annotations(batch["text"], image.device)
        logits = self.tag_decoder(self._tag_queries(), feats["tokens"])
        local: dict[str, Any] = {}
        if self.use_regions:
            if "region_spans" in batch:
                spans = _span_lists(batch["region_spans"])
            weights = self.sentence_membership(text["offsets"], text["attention_mask"], spans).to(image.device)
            boxes = batch["regions"]
            if weights.shape[1] != boxes.shape[1]:
                raise ValueError(f"ASG: {boxes.shape[1]} region boxes but {weights.shape[1]} region sentence lists")
            present = weights.sum(-1) > 0
            if "region_present" in batch:
                present = present & batch["region_present"].bool()
            grid = feats["grid"]
            local = {
                "patch_emb": self.region_proj(feats["tokens"]), "grid": grid, "boxes": boxes,
                "spatial_scale": (grid[1] / image.shape[-1], grid[0] / image.shape[-2]),
                # CLS excluded, as the official word features (all_feat[:, 1:])
                "word_emb": self.sentence_proj(text["tokens"][:, 1:]), "word_weights": weights[..., 1:],
                "present": present, "local_temperature": self.local_temperature,
            }
        out = asg_losses(img_emb, txt_emb, tags, logits, self.temperature, self.soft_label_weight,
                         gather=self.gather_negatives, **local)
        if self.use_regions:
            out["regions_per_image"] = local["present"].float().sum(1).mean()
        return out
