"""Export a trained toy pipeline (plus its judge) into the shipped package data.

The shipped folder ``massact_nn/assets/toy/`` is a complete ``FluxPipeline`` folder
(safetensors only) with ``massact_toy.json`` (pipeline call defaults, training config and
the evaluation numbers measured at export) and ``judge.safetensors``/``judge.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import massact_nn

from . import build

MAX_BYTES = 25 * 1024 * 1024
"""Size limit of the shipped folder."""

_ALLOWED_SUFFIXES = {".json", ".safetensors", ".txt", ".model"}


def shipped_path() -> Path:
    """Location of the shipped toy pipeline folder (it may not exist yet)."""
    return Path(massact_nn.__file__).resolve().parent / "assets" / "toy"


def is_shipped(folder: str | Path | None = None) -> bool:
    """Whether ``folder`` (default: the shipped location) holds a loadable toy pipeline."""
    folder = Path(folder) if folder else shipped_path()
    weights = list((folder / "transformer").glob("*.safetensors"))
    return (folder / "model_index.json").exists() and bool(weights)


def resolve_pipeline(path: str | Path) -> Path:
    """A run folder (with ``pipeline/``) or a pipeline folder -> the pipeline folder."""
    path = Path(path)
    if (path / "pipeline" / "model_index.json").exists():
        return path / "pipeline"
    if (path / "model_index.json").exists():
        return path
    raise FileNotFoundError(f"no toy pipeline in {path} (expected model_index.json or pipeline/)")


def _record_checkpoint(src: Path, meta_path: Path) -> None:
    """Store the step, training time and live config of the run's latest checkpoint."""
    state_path = src.parent / "state.pt"
    if not state_path.exists():
        return
    import torch

    state = torch.load(state_path, map_location="cpu", weights_only=False)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("call", build.PIPELINE_DEFAULTS)
    meta["checkpoint"] = {
        "step": int(state["step"]),
        "train_minutes": round(float(state["elapsed"]) / 60.0, 2),
        "config": state.get("config"),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def export(
    source: str | Path,
    dest: str | Path | None = None,
    judge_folder: str | Path | None = None,
    evaluate_n: int = 0,
) -> dict[str, Any]:
    """Copy a pipeline folder (and a judge) to ``dest``, replacing what was there.

    Args:
        source: a training run folder or a pipeline folder.
        dest: target folder; default :func:`shipped_path`.
        judge_folder: folder with ``judge.safetensors``; default: the source pipeline
            folder, then its run folder's ``judge/``; when none is found a judge is trained
            (2000 steps, a few minutes).
        evaluate_n: when > 0, evaluate the exported folder on this many prompts and store
            the numbers in its ``massact_toy.json``.

    Returns:
        ``{"dest": str, "bytes": int, "report": evaluation or None}``.

    Raises:
        ValueError: if the result would exceed :data:`MAX_BYTES`.
    """
    from .judge import load_judge, save_judge, train_judge

    src = resolve_pipeline(source)
    dest = Path(dest) if dest else shipped_path()
    tmp = dest.with_name(dest.name + ".export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        src,
        tmp,
        ignore=lambda _d, names: [
            n for n in names if Path(n).suffix and Path(n).suffix not in _ALLOWED_SUFFIXES
        ],
    )
    # Leftovers of an interrupted checkpoint swap must not ship.
    for leftover in ("transformer.tmp", "transformer.old"):
        shutil.rmtree(tmp / leftover, ignore_errors=True)
    candidates = [Path(judge_folder)] if judge_folder else [src, src.parent / "judge"]
    for cand in candidates:
        try:
            net = load_judge(cand)
            break
        except FileNotFoundError:
            continue
    else:
        net = train_judge(log=lambda _m: None)
    save_judge(net, tmp)
    _record_checkpoint(src, tmp / build.DEFAULTS_FILE)
    report = None
    if evaluate_n > 0:
        from .evaluate import evaluate

        report = evaluate(tmp, n=evaluate_n, verbose=True)
        meta_path = tmp / build.DEFAULTS_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.setdefault("call", build.PIPELINE_DEFAULTS)
        meta["evaluation"] = {
            "n": report["n"],
            "judge": report["judge"],
            "max_top1_over_median": report["max_top1_over_median"],
            "blocks": report["blocks"],
        }
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    size = folder_bytes(tmp)
    if size > MAX_BYTES:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"export is {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB limit"
        )
    old = dest.with_name(dest.name + ".export-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return {"dest": str(dest), "bytes": size, "report": report}
