"""Initialise a newly built model's encoders from the files their ``init_from`` names.

Building a module never reads a file: an encoder's constructor records ``init_from``, and this step loads it.
:func:`medvlp.train.build_method` runs it for models built to train; a model rebuilt from a checkpoint or an
export folder skips it, since the checkpoint's own weights replace that initialisation (so the original file
need not exist any more).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from medvlp.encoders.resnet import ResNetEncoder
from medvlp.encoders.vit import ViTEncoder
from medvlp.pretrained.surgery import adapt_input_conv, drop_module_prefix, layout_error, load_state_file
from medvlp.pretrained.vit import init_vit_from


def load_torchvision_resnet(encoder: ResNetEncoder, path: str) -> None:
    """Load a torchvision-layout ResNet state dict file into ``encoder`` (strict apart from the classifier
    ``fc``; a 3-channel ``conv1`` is summed for 1-channel inputs).

    Raises:
        ValueError: naming the file when its layout is not a torchvision ResNet's.
    """
    state = {k: v for k, v in drop_module_prefix(load_state_file(path)).items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_input_conv(state["conv1.weight"], encoder.in_channels)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise layout_error(path, f"not a torchvision ResNet state dict (missing {missing[:4]}, unexpected "
                           f"{unexpected[:4]})", encoder.state_dict(), state)


def _load_vit(encoder: ViTEncoder, path: str) -> None:
    init_vit_from(encoder, path, encoder.init_allow_download)


#: encoder class → how its ``init_from`` file is loaded
LOADERS: dict[type[nn.Module], Callable[..., None]] = {
    ViTEncoder: _load_vit,
    ResNetEncoder: load_torchvision_resnet,
}


def load_initial_weights(model: nn.Module) -> list[str]:
    """Load every ``init_from`` file named by an encoder inside ``model``; returns the files loaded.

    Raises:
        TypeError: a module names ``init_from`` but medvlp has no loader for its class.
    """
    loaded = []
    for module in model.modules():
        source = getattr(module, "init_from", None)
        if not source or not isinstance(source, str):
            continue
        loader = next((fn for cls, fn in LOADERS.items() if isinstance(module, cls)), None)
        if loader is None:
            raise TypeError(f"{type(module).__name__} names init_from={source!r} but has no initial-weights loader")
        loader(module, source)
        loaded.append(source)
    return loaded
