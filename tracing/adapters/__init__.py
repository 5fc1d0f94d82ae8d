"""Adapters, one per diffusers DiT family, and the registry that picks one for a transformer."""

from __future__ import annotations

from typing import Any

from massact_nn.errors import MassactError

from . import flux
from .base import LAYOUTS, Adapter, BlockList, Guidance, read_image, write_image

ADAPTERS: tuple[Adapter, ...] = (flux.ADAPTER,)

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


def adapter_for(transformer: Any) -> Adapter:
    """The adapter for a transformer module (or an nnsight envoy wrapping one)."""
    module = getattr(transformer, "_module", transformer)
    return adapter_for_class(type(module).__name__)


__all__ = [
    "ADAPTERS", "LAYOUTS", "Adapter", "BlockList", "Guidance", "adapter_for",
    "adapter_for_class", "read_image", "supported_classes", "write_image",
]
