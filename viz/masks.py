"""Viewers of segmentation results: token masks over the image, with IoU against a true mask.

Masks are drawn the same way everywhere: tokens outside the mask dimmed, the inside outlined
along exact token edges (a tint alone vanishes on an image of the same colour).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from massact_nn.errors import MassactError
from massact_nn.masks import iou, upsample_nearest
from massact_nn.segmentation_result import SegmentationResult

from ._common import FONT, fmt
from ._common import esc as _esc
from ._common import short as _short
from ._images import image_axes, image_trace, mask_traces

SET_ORDER = ("top", "all", "random", "low")


def _blocks(result: SegmentationResult) -> tuple[list[str], list[str], list[int]]:
    """Channel sets (primary first), site modules (in layer order when known), steps."""
    sets, modules, steps = list(result.aggregated), [], set()
    for key in result.per_block:
        s, rest = key.split("/", 1)
        module, step = rest.rsplit("/", 1)
        if module not in modules:
            modules.append(module)
        steps.add(int(step))
        if s not in sets:
            sets.append(s)
    # Saved results come back in alphabetical key order; show them in a reader's order.
    rank = {n: i for i, n in enumerate(SET_ORDER)}
    sets.sort(key=lambda n: (n != result.primary, rank.get(n, len(rank)), n))
    order = [str(m) for m in result.meta.get("sites") or [] if isinstance(m, str)]
    layers = _layer_of(result)
    modules.sort(key=lambda m: (layers.get(m, 10**6), order.index(m) if m in order else 10**6, m))
    return sets, modules, sorted(steps)


def _layer_of(result: SegmentationResult) -> dict[str, int]:
    """Flat layer index per module, only where the metadata states it (never guessed)."""
    layers: dict[str, int] = {}
    for s in result.meta.get("sites") or []:
        if isinstance(s, dict) and "module" in s and "layer" in s:
            layers[str(s["module"])] = int(s["layer"])
    extra = result.meta.get("layers")
    if isinstance(extra, dict):
        layers.update({str(k): int(v) for k, v in extra.items()})
    return layers


def _site_name(module: str, layers: dict[str, int]) -> str:
    return f"{module} · L{layers[module]}" if module in layers else module


def _short_site(module: str, layers: dict[str, int]) -> str:
    # Slider ticks are narrow: "single_transformer_blocks.10" -> "stb.10" (the title has it all).
    if module in layers:
        return f"L{layers[module]}"
    head, _, idx = module.rpartition(".")
    abbrev = "".join(w[0] for w in head.split("_") if w) if head else module
    return f"{abbrev}.{idx}" if idx.isdigit() else module


def _truth_pixels(result: SegmentationResult, truth: torch.Tensor | None) -> torch.Tensor | None:
    if truth is None:
        return None
    t = torch.as_tensor(np.asarray(truth)).bool()
    if tuple(t.shape) == result.grid and tuple(t.shape) != tuple(result.image_size):
        t = upsample_nearest(t, *result.image_size)
    if tuple(t.shape) != tuple(result.image_size):
        raise MassactError(f"true mask of shape {tuple(t.shape)} fits neither the image "
                           f"{tuple(result.image_size)} nor the token grid {result.grid}")
    return t


def mask_viewer(
    result: SegmentationResult, truth: torch.Tensor | None = None, title: str | None = None,
) -> go.Figure:
    """Each channel set's own mask at one site and step, over the image; sliders pick both.

    Columns are the channel sets (``top``, ``all``, ``random``, ``low``, ...). The site slider
    switches trace visibility and the step slider switches opacity (two independent properties,
    so the two sliders combine without any custom JavaScript). Column titles give each set's
    aggregated IoU against ``truth``; hover gives the block's own IoU.

    Args:
        result: A segmentation result with per-block masks.
        truth: True foreground mask at image or token-grid resolution. Shapes: [H, W] bool.
        title: Figure title.
    """
    sets, modules, steps = _blocks(result)
    if not modules:
        raise MassactError("the segmentation result has no per-block masks to browse")
    t = _truth_pixels(result, truth)
    layers = _layer_of(result)
    agg_iou = result.iou(t) if t is not None else {}
    titles = [f"<b>{_esc(s)}</b>" + (f" · IoU {fmt(agg_iou[s])} (all blocks)" if s in agg_iou else "")
              for s in sets]
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=titles, horizontal_spacing=0.02)
    image = result.image if result.image is not None else torch.full((3, *result.image_size), 0.5)
    grid = result.grid
    site_of, step_of = [], []  # per trace; None for the always-on images
    for j in range(len(sets)):
        fig.add_trace(image_trace(image, grid, hover="image"), row=1, col=j + 1)
        site_of.append(None)
        step_of.append(None)
    for j, s in enumerate(sets):
        for mi, m in enumerate(modules):
            for si, st in enumerate(steps):
                mask = result.per_block.get(f"{s}/{m}/{st}")
                if mask is None:
                    continue
                block_iou = ""
                if t is not None:
                    px = upsample_nearest(mask.bool(), *result.image_size)
                    block_iou = f"<br>IoU vs true mask {fmt(iou(px, t))}"
                ch = result.channels.get(f"{s}/{m}")
                chs = f"<br>channels {ch.tolist()}" if ch is not None and ch.numel() <= 16 else (
                    f"<br>{ch.numel()} channels" if ch is not None else "")
                hover = f"set {_esc(s)}<br>site {_esc(_site_name(m, layers))}<br>step {st}{chs}{block_iou}"
                for tr in mask_traces(mask, hover, visible=mi == 0, opacity=1.0 if si == 0 else 0.0,
                                      hoverinfo="all" if si == 0 else "skip"):
                    fig.add_trace(tr, row=1, col=j + 1)
                    site_of.append(mi)
                    step_of.append(si)
    vis = lambda mi: [True if a is None else a == mi for a in site_of]  # noqa: E731
    base = title or "Token masks per block (K=2 clusters)"
    head = lambda m: f"{base} · site {_esc(_site_name(m, layers))}"  # noqa: E731
    site_steps = [dict(method="update", label=_short_site(m, layers),
                       args=[{"visible": vis(mi)}, {"title.text": head(m)}])
                  for mi, m in enumerate(modules)]
    step_steps = [dict(method="restyle", label=str(st), args=[{
        "opacity": [1.0 if b is None or b == si else 0.0 for b in step_of],
        # Outlines never hover; every other trace hovers only when it is the shown step.
        "hoverinfo": ["skip" if t.type == "scatter" or (b is not None and b != si) else "all"
                      for t, b in zip(fig.data, step_of)],
    }]) for si, st in enumerate(steps)]
    fig.update_layout(
        title=dict(text=head(modules[0])),
        sliders=[
            dict(steps=site_steps, active=0, currentvalue=dict(prefix="site: "), x=0, len=0.48,
                 pad=dict(t=30)),
            dict(steps=step_steps, active=0, currentvalue=dict(prefix="step: "), x=0.52, len=0.48,
                 pad=dict(t=30)),
        ],
        height=230 + int(min(360, 1200 / len(sets))), font=FONT, template="plotly_white",
        margin=dict(l=10, r=10, t=90, b=10),
    )
    image_axes(fig, 1, len(sets), grid)
    fig.update_annotations(font_size=12)
    return fig


def mask_overview(
    result: SegmentationResult, truth: torch.Tensor | None = None, title: str | None = None,
) -> go.Figure:
    """The aggregated mask of every channel set and baseline over the image, IoU in the titles.

    Shapes:
        truth: [H, W] bool (or the token grid).
    """
    t = _truth_pixels(result, truth)
    names = [*_blocks(result)[0], *result.baselines]
    names = [n for n in names if n in result.aggregated or n in result.baselines]
    scores = result.iou(t) if t is not None else {}
    titles = [f"<b>{_esc(n)}</b>" + (f"<br>IoU {fmt(scores[n])}" if n in scores else "")
              for n in names]
    if t is not None:
        titles.append("<b>true mask</b>")
    cols = len(titles)
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, horizontal_spacing=0.015)
    image = result.image if result.image is not None else torch.full((3, *result.image_size), 0.5)
    grid = result.grid
    for j, n in enumerate(names):
        fig.add_trace(image_trace(image, grid, hover="image"), row=1, col=j + 1)
        kind = "channel set" if n in result.aggregated else "baseline"
        iou_txt = f"<br>IoU vs true mask {fmt(scores[n])}" if n in scores else ""
        for tr in mask_traces(result.set_mask(n), f"{kind} {_esc(n)}{iou_txt}"):
            fig.add_trace(tr, row=1, col=j + 1)
    if t is not None:
        fig.add_trace(image_trace(image, grid, hover="image"), row=1, col=cols)
        for tr in mask_traces(_to_grid(t, grid), "true mask", outline="#39ff14"):
            fig.add_trace(tr, row=1, col=cols)
    image_axes(fig, 1, cols, grid)
    src = result.meta.get("prompt") or result.meta.get("caption") or ""
    fig.update_layout(
        title=dict(text=title or "Foreground masks, aggregated over sites and steps · "
                   + _esc(_short(str(src), 60))),
        height=140 + int(min(300, 1200 / cols)), font=FONT, template="plotly_white",
        margin=dict(l=10, r=10, t=100, b=10),
    )
    fig.update_annotations(font_size=12)
    return fig


def _to_grid(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    # For display only: the true mask drawn on the token grid (majority per token).
    h, w = pixels.shape
    r, c = grid
    if h % r or w % c:
        return torch.nn.functional.interpolate(pixels[None, None].float(), size=grid)[0, 0] > 0.5
    return pixels.float().reshape(r, h // r, c, w // c).mean((1, 3)) > 0.5
