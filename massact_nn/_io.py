"""Atomic writes of tensors (safetensors) and metadata (JSON).

A run folder is read by later steps (selection feeds disruption, segmentation feeds transport), so
a half-written file must never be visible under its final name: every write goes to a temporary
file in the same folder and is then renamed over the target, which is atomic on POSIX.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(flat, tmp))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU."""
    return load_file(str(path))


def save_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, indented for people who read run folders."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic(Path(path), write)


def load_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)
