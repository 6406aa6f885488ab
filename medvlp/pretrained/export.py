"""Portable export of a trained method and loading it back without this repository.

An export folder holds:

* ``config.json`` — ``format`` (``medvlp-export/1``), registered ``method`` and ``class_path``,
  ``hparams`` (the text encoder pointing at ``text/``, ``init_from`` removed), ``preprocess`` (a
  :class:`~medvlp.pretrained.preprocess.Preprocess`: image size, normalisation or HU window,
  ``spatial_dims``, text max length) and ``versions`` of the libraries that wrote it;
* ``model.safetensors`` — every parameter and buffer (no optimizer state, no pickle);
* ``text/`` — the text model and its tokenizer via ``save_pretrained``;
* ``README.md`` — the model card ``huggingface_hub`` writes.

:class:`MedVLPExport` is a ``huggingface_hub.ModelHubMixin``, so ``push_to_hub`` and loading by hub id work
when the user is online; offline, a folder path is enough.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from huggingface_hub import ModelHubMixin

from medvlp.noise import quiet_transformers
from medvlp.pretrained.preprocess import IMAGENET_MEAN, IMAGENET_STD, MEDVLP_INPUT, Preprocess
from medvlp.version import __version__
from medvlp.pretrained.surgery import load_state_file
from medvlp.registry import METHODS
from medvlp.io import safe_load
from medvlp.method import load_method
from medvlp.config import load_yaml, to_container
from medvlp.encoders.vit import ViTEncoder
from medvlp.io import atomic_target, atomic_write_text
from medvlp.pretrained.vit import encoder_to_timm

log = logging.getLogger(__name__)
EXPORT_FORMAT = "medvlp-export/1"


def _versions() -> dict[str, str]:
    import huggingface_hub  # lazy: hub access only when the user asks for it
    import safetensors  # lazy: only export/import paths need it
    import transformers  # lazy: heavy optional import (transformers)


    return {"medvlp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__}


def _encoder_args(spec: Any) -> dict[str, Any]:
    """The init args dict inside an encoder spec (bare mapping or ``{class_path, init_args}``)."""
    if isinstance(spec, dict) and "class_path" in spec:
        return spec.setdefault("init_args", {})
    return spec


def preprocess_for_method(model: Any, run_config: Mapping[str, Any] | None = None) -> Preprocess:
    """The preprocessing a medvlp-trained model expects: 1 channel (or the encoder's channels), the
    datamodule normalisation ``(x − 0.5)/0.25`` (ImageNet mean/std under ``normalize: imagenet``), the
    encoder's reference size (``image_size`` then a centre ``crop_size`` crop when the run cropped); the HU
    window comes from the training run's data config when known."""
    enc = model.image_encoder
    dims = tuple(getattr(enc, "spatial_dims", (2,)))
    sd = dims[0]
    hp = _encoder_args(copy.deepcopy(dict(model.hparams.get("image_encoder") or {})))
    size: Any = hp.get("img_size_2d", 224) if sd == 2 else hp.get("img_size_3d", [32, 128, 128])
    data = dict((run_config or {}).get("data", {}).get("init_args", {}) or {})
    resize = None
    if sd == 2 and "image_size" in data:
        size = data["image_size"]
        if data.get("crop_size"):  # X-ray crop_size: resize + pad to image_size, then the (centre) crop
            size, resize = data["crop_size"], data["image_size"]
    channels = int(getattr(enc, "in_channels", 1))
    mean, std = (MEDVLP_INPUT[0],) * channels, (MEDVLP_INPUT[1],) * channels
    if data.get("normalize") == "imagenet":  # X-ray normalize=imagenet (channels=3)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Preprocess(spatial_dims=sd, image_size=size, channels=channels, mean=mean, std=std, resize=resize,
                      window=data.get("window"),
                      text_max_length=int(getattr(model.text_encoder, "max_length", 128)),
                      extra={"supported_spatial_dims": list(dims)})


class MedVLPExport(ModelHubMixin):
    """A trained model plus its preprocessing, saved and loaded as an export folder (or hub repo).

    Args:
        vlp_model: the method (a :class:`~medvlp.method.VLPMethod`).
        image_preprocess: its :class:`Preprocess`.
        meta: ``method``/``class_path``/``hparams`` as stored in the training checkpoint.
    """

    def __init__(self, vlp_model: Any = None, image_preprocess: Preprocess | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.vlp_model = vlp_model
        self.image_preprocess = image_preprocess
        self.meta = dict(meta or {})

    def export_config(self) -> dict[str, Any]:
        """The ``config.json`` content."""
        hparams = copy.deepcopy(dict(self.meta["hparams"]))
        text = _encoder_args(hparams.setdefault("text_encoder", {}))
        text["model"] = "text"  # relative to the export folder
        text["local_files_only"] = True
        img = _encoder_args(hparams.setdefault("image_encoder", {}))
        img.pop("init_from", None)
        img.pop("init_allow_download", None)
        return {"format": EXPORT_FORMAT, "method": self.meta["method"], "class_path": self.meta["class_path"],
                "hparams": hparams, "preprocess": self.image_preprocess.to_dict() if self.image_preprocess else None,
                "versions": _versions()}

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file  # lazy: only export/import paths need it


        out = Path(save_directory)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.vlp_model.state_dict().items()}
        with atomic_target(out / "model.safetensors") as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        text = self.vlp_model.text_encoder
        with quiet_transformers():
            text.model.save_pretrained(str(out / "text"), safe_serialization=True)
            text.tokenizer.save_pretrained(str(out / "text"))
        atomic_write_text(out / "config.json", json.dumps(self.export_config(), indent=2, sort_keys=True))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         **_: Any) -> "MedVLPExport":
        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download  # lazy: hub access only when the user asks for it

            folder = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                            force_download=force_download, local_files_only=local_files_only))
        return load_export(folder)


#: weight-file suffixes that are pickles (loading one can run code): never read from an export folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(folder: Path) -> None:
    """Refuse an export folder holding pickled weights (e.g. ``text/pytorch_model.bin``): medvlp writes
    safetensors only, and a pickle can run code when loaded.

    Raises:
        ValueError: one line naming the file.
    """
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise ValueError(f"{found[0]}: refused: an export holds weights as safetensors only, and this file is a "
                         f"pickle (loading it can run code); remove it or re-export the checkpoint")


def load_export(folder: str | Path, allow_class_path: bool = False) -> MedVLPExport:
    """Rebuild the model of an export folder (strict load from ``model.safetensors``).

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: when ``config.json`` is not a medvlp export or names an unregistered method.
    """

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (not a medvlp export folder)")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder}/config.json: format {cfg.get('format')!r}, expected {EXPORT_FORMAT!r}")
    name = cfg["method"]
    if name in METHODS:
        method_cls = METHODS.get(name)
    elif allow_class_path:
        method_cls = METHODS.get(cfg["class_path"])
    else:
        raise ValueError(f"{folder}: method {name!r} is not registered ({', '.join(METHODS.names())}); install its "
                         "plugin or pass allow_class_path=True")
    refuse_pickled_weights(folder)
    state = load_state_file(folder / "model.safetensors")  # safetensors only: no code can run
    hparams = copy.deepcopy(cfg["hparams"])
    _encoder_args(hparams["text_encoder"])["model"] = str(folder / "text")
    model = method_cls(**hparams)  # building reads no file; the export's weights follow
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not match {name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    pre = Preprocess.from_dict(cfg["preprocess"]) if cfg.get("preprocess") else None
    meta = {k: cfg[k] for k in ("method", "class_path", "hparams")}
    return MedVLPExport(model.eval(), pre, meta)


def export(ckpt: str | Path, out: str | Path, format: str = "hf", allow_class_path: bool = False) -> Path:
    """Write an export folder for a medvlp training checkpoint.

    Args:
        ckpt: ``last.ckpt`` (or any medvlp checkpoint).
        out: folder to write.
        format: ``hf`` (the folder described in the module docstring) or ``timm`` (the 2D ViT image encoder
            as a timm ``VisionTransformer`` state dict in ``model.safetensors`` + a timm-style ``config.json``).
        allow_class_path: see :func:`medvlp.method.load_method`.

    Raises:
        ValueError: on an unknown format, or ``timm`` for a non-ViT / non-2D image encoder.
    """

    if format not in ("hf", "timm"):
        raise ValueError(f"export format must be hf|timm, got {format!r}")
    model = load_method(str(ckpt), allow_class_path=allow_class_path)
    meta = safe_load(ckpt)["medvlp"]
    run_cfg_path = Path(ckpt).parent.parent / "config.yaml"
    run_cfg = None
    if run_cfg_path.is_file():

        run_cfg = to_container(load_yaml(run_cfg_path))
    pre = preprocess_for_method(model, run_cfg)
    out = Path(out)
    if format == "timm":
        return _export_timm(model, pre, out)
    MedVLPExport(model, pre, meta).save_pretrained(out)
    return out


def _export_timm(model: Any, pre: Preprocess, out: Path) -> Path:
    from safetensors.torch import save_file  # lazy: only export/import paths need it


    enc = model.image_encoder
    if not isinstance(enc, ViTEncoder) or "2" not in enc.patch_embed:
        raise ValueError(f"format=timm exports a 2D ViTEncoder; this model has {type(enc).__name__} "
                         f"with spatial_dims {getattr(enc, 'spatial_dims', '?')}")
    state = {k: v.contiguous() for k, v in encoder_to_timm(enc).items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_target(out / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    size = pre.image_size if isinstance(pre.image_size, int) else list(pre.image_size)[0]
    cfg = {"architecture": "vit", "num_classes": 0, "global_pool": "token", "embed_dim": enc.embed_dim,
           "depth": len(enc.blocks), "num_heads": enc.blocks[0].attn.num_heads, "patch_size": enc.patch_size(2)[0],
           "img_size": size, "in_chans": enc.in_channels,
           "pretrained_cfg": {"input_size": [enc.in_channels, size, size], "mean": list(pre.mean), "std": list(pre.std),
                              "interpolation": pre.interpolation, "crop_pct": 1.0},
           "versions": _versions()}
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2))
    return out


def from_pretrained(path_or_repo: str | Path, **kwargs: Any) -> tuple[Any, Preprocess | None]:
    """``(model, preprocess)`` from an export folder (or a hub repo when online).

    ``model`` has ``encode_image``/``encode_text``/``image_representation``/``image_feature_maps``;
    ``preprocess.image(raw)`` turns an ``(H, W)`` / ``(H, W, C)`` array or tensor (uint8 or ``[0, 1]``) into the
    model's input batch.
    """
    local = Path(path_or_repo)
    if local.is_file():
        raise ValueError(f"{local} is a file, not an export folder: load a training checkpoint with "
                         f"medvlp.load('medvlp', {str(local)!r}), or write a folder with `medvlp export "
                         f"ckpt={local} out=DIR` first")
    if not local.is_dir() and (local.suffix in (".ckpt", ".pt", ".bin", ".safetensors") or str(path_or_repo).startswith(
            (".", "/", "~")) or str(path_or_repo).count("/") > 1):
        raise FileNotFoundError(f"{path_or_repo}: no such export folder (a hub repo id is 'org/name')")
    loaded = MedVLPExport.from_pretrained(str(path_or_repo), **kwargs)
    return loaded.vlp_model, loaded.image_preprocess
