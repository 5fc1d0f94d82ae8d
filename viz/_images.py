"""Images and token masks as Plotly traces (images as compressed inline PNG, crisp when small)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch

from ._common import png_data_uri

#: Small images are upscaled (nearest) to at least this many pixels wide before encoding, so the
#: browser never blurs a 32-px toy image into mush.
MIN_DISPLAY_PX = 256

#: Background tokens are dimmed and the foreground outlined: a tint alone vanishes on an image of
#: the same colour (a red mask over a red shape), a dim plus an outline reads on any image.
DIM_COLOUR = "rgba(10, 10, 30, 0.62)"
OUTLINE_COLOUR = "#00e5ff"


#: The colour of non-finite pixels in every viewer (no image of the shapes world uses it).
NOT_FINITE_RGB = (255, 0, 255)


def to_hwc_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image ``[3, H, W]`` (or ``[H, W, 3]`` / ``[H, W]``) in [0, 1] as ``uint8 [H, W, 3]``.

    Non-finite pixels are drawn in :data:`NOT_FINITE_RGB`.
    """
    a = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        bad = ~np.isfinite(a).all(axis=-1)
        a = (np.clip(np.nan_to_num(a, nan=0.0), 0, 1) * 255).round().astype(np.uint8)
        # NaN/inf pixels would clip to black, like a real black background: shown magenta.
        a[bad] = NOT_FINITE_RGB
    return np.ascontiguousarray(a)


def image_trace(
    image: torch.Tensor | np.ndarray, grid: tuple[int, int] | None = None, hover: str = ""
) -> go.Image:
    """An image trace, in token units when ``grid`` is given, else in pixels.

    With ``grid = (rows, cols)`` a token-mask heatmap drawn on the same axes lines up with the
    image at ``x = col``, ``y = row``.

    Shapes:
        image: [3, H, W] in [0, 1] (or uint8 [H, W, 3]).
    """
    a = to_hwc_uint8(image)
    h, w = a.shape[:2]
    f = max(1, math.ceil(MIN_DISPLAY_PX / max(w, 1)))
    if f > 1:
        a = a.repeat(f, 0).repeat(f, 1)
    rows, cols = grid if grid is not None else (h, w)
    dx, dy = cols / (w * f), rows / (h * f)
    return go.Image(
        source=png_data_uri(a), x0=dx / 2 - 0.5, y0=dy / 2 - 0.5, dx=dx, dy=dy,
        hovertemplate=(hover or "%{x:.0f}, %{y:.0f}") + "<extra></extra>",
    )


def mask_traces(
    mask: torch.Tensor | np.ndarray, hover: str, outline: str = OUTLINE_COLOUR,
    inside: str = "foreground", outside: str = "background", **kw,
) -> list[go.Heatmap | go.Scatter]:
    """A token mask over an image: tokens outside dimmed (a heatmap), the inside outlined (a line).

    Hover on the heatmap gives ``token row %{y}, col %{x}`` and which side of the mask it is on.
    ``kw`` (visibility, opacity, hoverinfo) applies to both traces.

    Shapes:
        mask: [rows, cols] bool.
    """
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    z = m.astype(np.float32)
    heat = go.Heatmap(
        z=z, text=np.where(m, inside, outside), zmin=0, zmax=1, showscale=False,
        colorscale=[[0.0, DIM_COLOUR], [1.0, "rgba(0,0,0,0)"]],
        hovertemplate=hover + "<br>token row %{y}, col %{x}: %{text}<extra></extra>", **kw,
    )
    line_kw = {k: v for k, v in kw.items() if k != "hoverinfo"}
    xs, ys = outline_path(m)
    edge = go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=outline, width=2.5),
                      hoverinfo="skip", showlegend=False, **line_kw)
    return [heat, edge]


def outline_path(m: np.ndarray) -> tuple[list, list]:
    """The token-cell edges between inside and outside, as one path broken by ``None``.

    Exact block edges, not an interpolated contour: a token is in the mask or it is not.

    Shapes:
        m: [rows, cols] bool.
    """
    pad = np.pad(m, 1)
    xs: list = []
    ys: list = []
    # Vertical edges: between columns c-1 and c where the mask changes (cell centres at ints).
    for r, c in zip(*np.nonzero(pad[1:-1, 1:] != pad[1:-1, :-1])):
        xs += [c - 0.5, c - 0.5, None]
        ys += [r - 0.5, r + 0.5, None]
    for r, c in zip(*np.nonzero(pad[1:, 1:-1] != pad[:-1, 1:-1])):
        xs += [c - 0.5, c + 0.5, None]
        ys += [r - 0.5, r - 0.5, None]
    return [float(x) if x is not None else None for x in xs], \
        [float(y) if y is not None else None for y in ys]


def image_axes(fig: go.Figure, rows: int, cols: int, extent: tuple[int, int]) -> None:
    """Hide ticks, fix the range to the image and lock the aspect of a ``rows × cols`` grid.

    ``extent = (height, width)`` in the axes' units (token grid or pixels). A fixed range keeps
    every panel the same size (an outline trace would otherwise pad the autorange).
    """
    h, w = extent
    for i in range(1, rows * cols + 1):
        sx = "" if i == 1 else str(i)
        fig.layout[f"xaxis{sx}"].update(showticklabels=False, showgrid=False, zeroline=False,
                                        range=[-0.5, w - 0.5], constrain="domain")
        fig.layout[f"yaxis{sx}"].update(showticklabels=False, showgrid=False, zeroline=False,
                                        range=[h - 0.5, -0.5], scaleanchor=f"x{sx}",
                                        constrain="domain")
