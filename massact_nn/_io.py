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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import MassactError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file gets the usual permissions (mkstemp's 0600 would make shared runs unreadable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies).

    Tensors that share memory (one id tensor given for every site, a view of another entry) are
    copied apart first: safetensors refuses shared storage.
    """
    flat, seen = {}, set()
    for k, v in tensors.items():
        x = v.detach().to("cpu").contiguous()
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen and x.numel():
            x = x.clone()
        seen.add(x.untyped_storage().data_ptr())
        flat[k] = x
    atomic_write(path, lambda tmp: save_file(flat, tmp))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file onto the CPU.

    Raises:
        MassactError: naming the file, when it is missing or not a safetensors file.
    """
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise MassactError(f"cannot read tensors from {str(path)!r} ({type(e).__name__}: {e}); "
                           "accepted: a safetensors file written by massact-nn") from None


def save_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, indented for people who read run folders."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    atomic_write(path, write)


def save_run(folder: str | Path, tensors: dict[str, torch.Tensor], metrics: Any, meta: dict) -> Path:
    """Write a probe's run folder: ``result.safetensors``, ``metrics.json``, ``meta.json``.

    ``meta.json`` goes first and comes back last: a save over an older run that dies midway
    leaves a folder without it, which loading refuses, instead of the old metadata over the new
    tensors.
    """
    folder = Path(folder)
    (folder / "meta.json").unlink(missing_ok=True)
    save_tensors(folder / "result.safetensors", tensors)
    save_json(folder / "metrics.json", metrics)
    save_json(folder / "meta.json", meta)
    return folder


def load_json(path: str | Path) -> Any:
    """Read a JSON file.

    Raises:
        MassactError: naming the file, when it is missing, not UTF-8 or not JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MassactError(f"cannot read {str(path)!r} ({type(e).__name__}: {e}); accepted: a JSON "
                           "file written by massact-nn") from None
