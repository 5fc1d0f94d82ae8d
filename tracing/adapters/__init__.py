"""Adapters, one per diffusers DiT family, and the registry that picks one for a transformer."""

from __future__ import annotations

from typing import Any

from massact_nn.errors import MassactError

from . import (
    auraflow,
    bria,
    chroma,
    cogview3plus,
    cogview4,
    flux,
    flux2,
    hunyuandit,
    krea2,
    ovis,
    pixart,
    qwenimage,
    sana,
    sd3,
    zimage,
)
from .base import LAYOUTS, Adapter, BlockList, Guidance, input_timestep, input_tokens, read_image, write_image

ADAPTERS: tuple[Adapter, ...] = (
    flux.ADAPTER, flux2.ADAPTER, qwenimage.ADAPTER, sana.ADAPTER, sd3.ADAPTER, pixart.ADAPTER,
    chroma.ADAPTER, cogview4.ADAPTER, auraflow.ADAPTER, zimage.ADAPTER, bria.ADAPTER, cogview3plus.ADAPTER,
    hunyuandit.ADAPTER, ovis.ADAPTER, krea2.ADAPTER,
)

_BY_CLASS = {cls: a for a in ADAPTERS for cls in a.transformer_classes}


def supported_classes() -> list[str]:
    """Every diffusers transformer class name an adapter covers."""
    return sorted(_BY_CLASS)


def adapter_for_class(class_name: str) -> Adapter:
    """The adapter for a transformer class name.

    Raises:
        MassactError: naming the class and listing the supported ones.
    """
    a = _BY_CLASS.get(class_name)
    if a is None:
        raise MassactError(
            f"unsupported transformer class {class_name!r}; supported: {', '.join(supported_classes())}"
        )
    return a


# diffusers loads legacy ``Transformer2DModel`` configs as the class their ``norm_type`` names
# (models/model_loading_utils.py, _CLASS_REMAPPING_DICT); PixArt-α/Σ's published configs are such.
_LEGACY_CLASSES = {"Transformer2DModel": {"ada_norm_single": "PixArtTransformer2DModel"}}


def transformer_class_name(config: dict) -> str:
    """The class diffusers instantiates for a transformer ``config.json`` (legacy names remapped)."""
    name = config.get("_class_name", "")
    return _LEGACY_CLASSES.get(name, {}).get(config.get("norm_type"), name)


def adapter_for(transformer: Any) -> Adapter:
    """The adapter for a transformer module (or an nnsight envoy wrapping one)."""
    module = getattr(transformer, "_module", transformer)
    return adapter_for_class(type(module).__name__)


__all__ = [
    "ADAPTERS", "LAYOUTS", "Adapter", "BlockList", "Guidance", "adapter_for",
    "adapter_for_class", "input_timestep", "input_tokens", "read_image", "supported_classes",
    "transformer_class_name", "write_image",
]
