"""Shared helpers of the viewers: colours, log-scale ticks, numbers for hover text, inline PNGs."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

#: Distinct colours (Plotly's D3 palette) for runs and ranks.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)

#: Smallest value drawn on a log axis: zeros (e.g. a zeroed channel) would otherwise vanish.
LOG_FLOOR = 1e-6

FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13)


def as_numpy(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """A float64 numpy copy of a tensor or array (NaN kept)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def log10_floor(x: np.ndarray) -> np.ndarray:
    """``log10(max(x, LOG_FLOOR))`` with NaN kept (NaN marks padding, drawn blank)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(x), np.nan, np.log10(np.maximum(x, LOG_FLOOR)))


def log_colorbar(zmin: float, zmax: float, title: str) -> dict:
    """A colour bar for ``log10`` values labelled with the raw values (1, 10, 100, ...)."""
    lo, hi = math.floor(zmin), math.ceil(zmax)
    if hi - lo > 8:  # keep at most ~8 labels readable
        step = math.ceil((hi - lo) / 8)
    else:
        step = 1
    vals = [float(v) for v in range(lo, hi + 1, step)]
    if zmax - zmin < 2:  # a narrow range would show one label or none: add 2×, 3× and 5× ticks
        vals = sorted(d + math.log10(m) for d in range(lo, hi + 1) for m in (1, 2, 3, 5))
    vals = [v for v in vals if zmin - 1e-9 <= v <= zmax + 1e-9] or [zmin, zmax]
    return dict(
        title=dict(text=title, side="right"),
        tickvals=vals,
        ticktext=[fmt(float(f"{10.0**v:.3g}")) for v in vals],
        thickness=14,
    )


def compact_ints(values: object) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0–3, 7"``: step and layer lists stay readable in titles."""
    if not isinstance(values, (list, tuple)) or not values or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return str(values)
    vs = sorted(set(values))
    runs, start, prev = [], vs[0], vs[0]
    for v in vs[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(runs)


def esc(s: object) -> str:
    """Text for hover boxes and titles, shown as typed.

    plotly.js reads them as HTML ("<b>" must stay text), and hover templates read ``%{...}`` as
    a placeholder: a zero-width space after the ``%`` keeps it text and looks the same.
    """
    return html.escape(str(s)).replace("%{", "%\u200b{")


def short(s: str, n: int = 32) -> str:
    """``s`` cut to ``n`` characters with an ellipsis."""
    return s if len(s) <= n else s[: n - 1] + "…"


def lower_median(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """The median as torch takes it (the lower of the two middle values for an even count).

    The statistics' ``ratio_top1_median`` uses torch's; a plot next to that table must use the
    same median, or their ratios disagree (19.06 against 19.17 on the toy's first layer).
    """
    a = np.asarray(values, dtype=float)
    if axis is None:
        a, axis = a.ravel(), 0
    k = (a.shape[axis] - 1) // 2
    return np.take(np.partition(a, k, axis=axis), k, axis=axis)


def fmt(v: float) -> str:
    """A number short enough for a hover box or a table cell (3 significant digits).

    ``None`` (nothing to show, e.g. the PSNR of identical images) is "–"; NaN is "not finite"
    (a result computed from non-finite values, which must not read like a missing one).
    """
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "not finite"
    v = float(v)
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3g}"


def png_data_uri(source: str | Path | bytes | np.ndarray) -> str:
    """An image as a ``data:image/png;base64,...`` URI, for self-contained HTML and figures.

    Args:
        source: A PNG path, PNG bytes, or an image array (uint8, or float in [0, 1]).

    Shapes:
        source (array): [H, W] or [H, W, 3|4].
    """
    if isinstance(source, np.ndarray):
        from PIL import Image

        a = source
        if a.dtype != np.uint8:
            a = (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(source, bytes):
        data = source
    else:
        data = Path(source).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def run_label(meta: dict, fallback: str) -> str:
    """A short label for a run: its model's folder name (``toy`` stays ``toy``)."""
    model = str(meta.get("model") or "").rstrip("/")
    return Path(model).name if model else fallback


def log_axis(values: np.ndarray, title: str) -> dict:
    """A log y axis: a label per decade over wide ranges, at 1, 2 and 5 over narrow ones.

    Plotly's default labels every minor tick (2, 3, ..., 9) of a narrow log axis and the 2s and
    5s of a wide one, which reads as noise next to the decade labels.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    axis: dict = dict(title=title, type="log", exponentformat="power")
    if not v.size:
        return axis
    lo, hi = math.floor(np.log10(v.min())), math.ceil(np.log10(v.max()))
    # Up to three decades get labels at 1, 2 and 5: with decade labels alone a plot spanning
    # 0.2 to 5 showed only "1" (values are read off the axis, not only by hovering).
    if hi - lo > 3:
        axis["dtick"] = 1
    else:  # explicit labels: plotly's own minor labels read "2, 5" for 0.2 and 0.5
        vals = [m * 10.0**d for d in range(lo, hi + 1) for m in (1, 2, 5)]
        axis.update(tickmode="array", tickvals=vals, ticktext=[fmt(float(f"{x:.3g}")) for x in vals])
    return axis
