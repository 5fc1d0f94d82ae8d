"""Site tables of a DiT: from a loaded model, or from a folder of configs without weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from massact_nn.errors import MassactError
from massact_nn.sites import Site

from .adapters import Adapter, adapter_for, adapter_for_class, transformer_class_name


def _get(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def sites_of_transformer(transformer: torch.nn.Module, adapter: Adapter | None = None) -> list[Site]:
    """Sites of a transformer module, in execution order.

    The width is read from the transformer's config, so this works on a meta-device module.
    """
    transformer = getattr(transformer, "_module", transformer)
    adapter = adapter or adapter_for(transformer)
    width = adapter.width(transformer.config)
    sites: list[Site] = []
    for bl in adapter.blocks:
        blocks = _get(transformer, bl.attr)
        for i in range(len(blocks)):
            sites.append(Site(len(sites), f"{bl.attr}.{i}", width, bl.streams, bl.kind))
    return sites


def sites_of(model: Any) -> list[Site]:
    """Sites of an nnsight ``DiffusionModel`` or a diffusers pipeline."""
    pipe = getattr(model, "pipeline", model)
    return sites_of_transformer(pipe.transformer)


def sites_from_folder(folder: str | Path) -> tuple[Adapter, list[Site]]:
    """Site table of a pipeline folder without loading or allocating weights.

    Only ``transformer/config.json`` is needed: the transformer is built from its config on the
    meta device (no storage), which is how a folder holding only FLUX.1-dev's configs is listed.
    """
    cfg_path = Path(folder) / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise MassactError(
            f"no transformer config at {str(cfg_path)!r}; expected a diffusers pipeline folder"
        )
    cfg = json.loads(cfg_path.read_text())
    name = transformer_class_name(cfg)
    adapter = adapter_for_class(name)
    import diffusers

    cls = getattr(diffusers, name)
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(str(Path(folder) / "transformer")))
    return adapter, sites_of_transformer(transformer, adapter)
