"""Viewers and report sections of probe runs (disruption, segmentation, transport)."""

from __future__ import annotations

from pathlib import Path

from massact_nn._io import load_json

from . import html as H


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def probe_sections(folder: Path, meta: dict, anchor: str) -> tuple[str, list[str]]:
    """A generic probe-run section: metrics as a table, PNGs inline, metadata.

    Returns:
        ``(table-of-contents name, HTML parts)``.
    """
    name = f"Probe run · {folder.name}"
    parts = [H.heading(2, name, anchor)]
    pngs = sorted(folder.glob("*.png"))
    if pngs:
        parts.append(H.gallery([(p.stem, p) for p in pngs]))
    if (folder / "metrics.json").is_file():
        metrics = load_json(folder / "metrics.json")
        flat = _flatten(metrics) if isinstance(metrics, dict) else {"metrics": metrics}
        rows = [{"metric": k, "value": v} for k, v in flat.items()]
        parts.append(H.table(rows, ["metric", "value"]))
    if meta:
        parts.append(H.metadata(meta))
    return name, parts
