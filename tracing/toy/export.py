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
from massact_nn.errors import MassactError

from . import build

MAX_BYTES = 25 * 1024 * 1024
"""Size limit of the shipped folder."""

_ALLOWED_SUFFIXES = {".json", ".safetensors", ".txt", ".model"}
_JUDGE_FILES = ("judge.safetensors", "judge.json")


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


def _has_judge(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _JUDGE_FILES)


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a toy export (``model_index.json`` and ``massact_toy.json``)."""
    folder = Path(folder)
    return (folder / "model_index.json").is_file() and (folder / build.DEFAULTS_FILE).is_file()


def check_dest(dest: str | Path, source: str | Path | None = None) -> Path:
    """The absolute export target, refusing one whose replacement would lose other files.

    Accepted: a path that does not exist yet, an empty folder, or a previous toy export (see
    :func:`is_export`), which the export replaces. Refused: a file, a non-empty folder that
    is not a toy export, the filesystem root, the current folder or one above it, and a
    folder inside ``source``.

    Raises:
        MassactError: naming the folder and what is accepted.
    """
    given = dest
    dest = Path(dest).expanduser().resolve()
    accepted = ("accepted: a new folder, an empty one, or a previous toy export "
                "(with model_index.json and massact_toy.json), which the export replaces")
    if not dest.name:
        raise MassactError(f"dest {str(given)!r} is the filesystem root; {accepted}")
    cwd = Path.cwd().resolve()
    if dest == cwd or dest in cwd.parents:
        raise MassactError(f"dest {str(given)!r} ({str(dest)!r}) is the current folder or holds it, "
                           f"and the export would replace it; {accepted}, other than the current one")
    if source is not None and Path(source).resolve() in dest.parents:
        raise MassactError(f"dest {str(given)!r} lies inside the source {str(source)!r}; {accepted}, "
                           "outside the source")
    if dest.exists():
        if not dest.is_dir():
            raise MassactError(f"dest {str(dest)!r} is a file; {accepted}")
        if any(dest.iterdir()) and not is_export(dest):
            raise MassactError(f"dest {str(dest)!r} is not empty and holds no toy export (no "
                               f"model_index.json and {build.DEFAULTS_FILE}): replacing it would "
                               f"delete its files; {accepted}")
    return dest


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def export(
    source: str | Path,
    dest: str | Path | None = None,
    judge_folder: str | Path | None = None,
    evaluate_n: int = 0,
) -> dict[str, Any]:
    """Copy a pipeline folder (and a judge) to ``dest``, replacing a previous export there.

    Args:
        source: a training run folder or a pipeline folder.
        dest: target folder; default :func:`shipped_path`. It is replaced as a whole, so it
            must be new, empty or a previous toy export (see :func:`check_dest`).
        judge_folder: folder with ``judge.safetensors`` (it must hold one); default: the
            source pipeline folder, then its run folder's ``judge/``; when neither holds one a
            judge is trained (2000 steps, a few minutes).
        evaluate_n: when > 0, evaluate the exported folder on this many prompts and store
            the numbers in its ``massact_toy.json``.

    Returns:
        ``{"dest": str, "bytes": int, "report": evaluation or None}``.

    Raises:
        MassactError: before any work, for a ``dest`` that :func:`check_dest` refuses or a
            named ``judge_folder`` without a judge.
        FileNotFoundError: if ``source`` holds no toy pipeline.
        ValueError: if the result would exceed :data:`MAX_BYTES`.
    """
    from .judge import load_judge, save_judge, train_judge

    src = resolve_pipeline(source)
    dest = check_dest(dest if dest else shipped_path(), src)
    if judge_folder and not _has_judge(Path(judge_folder)):
        raise MassactError(f"no judge in {str(judge_folder)!r} (judge.safetensors and judge.json); "
                           "accepted: a folder with a trained judge, or no judge folder (the "
                           "source's judge is used, else one is trained)")
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
    if judge_folder:  # a judge the caller named must be there (checked above), never made up
        net = load_judge(judge_folder)
    else:
        for cand in (src, src.parent / "judge"):
            if _has_judge(cand):
                net = load_judge(cand)
                break
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return {"dest": str(dest), "bytes": size, "report": report}
