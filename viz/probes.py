"""Viewers of probe results: the disruption grid, segmentation masks, the transport strip.

Each takes a result object (:class:`~massact_nn.disruption.DisruptionResult`,
:class:`~massact_nn.segmentation_result.SegmentationResult`,
:class:`~massact_nn.transport.TransportResult`) and returns a ``plotly.graph_objects.Figure``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from massact_nn.disruption import DisruptionResult
from massact_nn.errors import MassactError
from massact_nn.masks import iou, upsample_nearest
from massact_nn.segmentation_result import SegmentationResult
from massact_nn.transport import TransportResult

from ._common import FONT, compact_ints, fmt, run_label
from ._images import image_axes, image_trace, mask_traces

CONTROL_COLOURS = {"none": "#333333", "top": "#d62728", "low": "#1f77b4", "random": "#7f7f7f"}


def _channels_text(per_site: dict[str, torch.Tensor], limit: int = 6) -> str:
    """``module [ids]`` lines for hover text (long lists shortened)."""
    if not per_site:
        return "no channels changed"
    lines = [f"{m} {per_site[m].tolist()}" for m in list(per_site)[:limit]]
    if len(per_site) > limit:
        lines.append(f"… and {len(per_site) - limit} more sites")
    return "<br>".join(lines)


def _esc(s: object) -> str:
    # Hover and titles are HTML in plotly.js: a prompt like "<b>" must not become markup.
    return html.escape(str(s))


def _set_caption(name: str, row: dict) -> str:
    parts = [f"<b>{_esc(name)}</b>"]
    nums = []
    if row.get("mse") is not None:
        nums.append(f"MSE {fmt(row['mse'])}")
    if row.get("psnr") is not None:
        nums.append(f"PSNR {fmt(row['psnr'])}")
    if nums:
        parts.append(" · ".join(nums))
    judge = row.get("judge")
    if isinstance(judge, dict) and judge:
        parts.append("judge " + " ".join(f"{_esc(a)} {fmt(v)}" for a, v in list(judge.items())[:3]
                                         if isinstance(v, (int, float))))
    return "<br>".join(parts)


def disruption_grid(result: DisruptionResult, max_prompts: int = 4, title: str | None = None) -> go.Figure:
    """Channel sets side by side (columns, baseline first), prompts as rows, metrics as captions.

    Hover on an image names the set, the prompt, the disrupted channels per site and the
    metrics.

    Args:
        result: A disruption result.
        max_prompts: Rows shown (the first prompts).
        title: Figure title.
    """
    sets = result.sets
    if not sets:
        raise MassactError("the disruption result holds no images")
    prompts = list(result.meta.get("prompts") or [])
    n = min(max_prompts, int(next(iter(result.images.values())).shape[0]))
    per_set = (result.metrics or {}).get("sets", {})
    fig = make_subplots(rows=n, cols=len(sets), column_titles=[_set_caption(s, per_set.get(s, {}))
                                                                for s in sets],
                        row_titles=[_esc(_short(prompts[i])) if i < len(prompts) else f"prompt {i}"
                                    for i in range(n)],
                        horizontal_spacing=0.01, vertical_spacing=0.02)
    for j, s in enumerate(sets):
        row = per_set.get(s, {})
        for i in range(n):
            per_image = row.get("per_image", {})
            vals = " · ".join(f"{k} {fmt(v[i])}" for k, v in per_image.items()
                              if isinstance(v, list) and i < len(v))
            hover = (f"set {_esc(s)}<br>prompt {_esc(prompts[i]) if i < len(prompts) else i}<br>"
                     f"{_channels_text(result.channels.get(s, {}))}<br>{vals}")
            fig.add_trace(image_trace(result.images[s][i], hover=hover), row=i + 1, col=j + 1)
    image_axes(fig, n, len(sets), tuple(result.images[sets[0]].shape[-2:]))
    mode = result.meta.get("mode", "?")
    fig.update_layout(
        title=dict(text=title or f"Disruption ({_esc(mode)}) · {_esc(run_label(result.meta, 'model'))}"
                   f" · steps {_esc(compact_ints(result.meta.get('steps', 'all')))}"),
        height=150 + 190 * n, width=None, font=FONT, template="plotly_white",
        margin=dict(l=10, r=40, t=110, b=10),
    )
    fig.update_annotations(font_size=11)
    return fig


def _short(s: str, n: int = 32) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def disruption_metrics(result: DisruptionResult, title: str | None = None) -> go.Figure:
    """Bars of each (control, k): MSE and PSNR to the undisturbed baseline, with a metric dropdown.

    The judge's readings (on the toy) are offered too; random draws are averaged, with their
    spread as error bars on the MSE.
    """
    summary = [r for r in (result.metrics or {}).get("summary", []) if r.get("control") != "none"]
    if not summary:
        raise MassactError("the disruption result has no metrics summary to plot")
    names = ["mse", "psnr"] + [f"judge.{a}" for a in (summary[0].get("judge") or {})]
    x = [f"{r['control']} k={r['k']}" for r in summary]
    colours = [CONTROL_COLOURS.get(r["control"], "#9467bd") for r in summary]
    fig = go.Figure()
    for j, name in enumerate(names):
        y = [_get(r, name) for r in summary]
        err = [r.get("mse_std", 0.0) for r in summary] if name == "mse" else None
        fig.add_trace(go.Bar(
            x=x, y=[v if v is not None else np.nan for v in y], marker_color=colours, name=name,
            error_y=dict(type="data", array=err, visible=err is not None),
            customdata=[[r.get("draws", 1)] for r in summary], visible=j == 0,
            hovertemplate=f"%{{x}}<br>{name} = %{{y:.4g}}<br>draws %{{customdata[0]}}<extra></extra>",
        ))
    buttons = [dict(label=n, method="update",
                    args=[{"visible": [i == j for i in range(len(names))]},
                          {"yaxis.title.text": n, "yaxis.type": _scale(n),
                           "yaxis.dtick": 1 if _scale(n) == "log" else None}])
               for j, n in enumerate(names)]
    fig.update_layout(
        title=dict(text=title or "Disruption vs the undisturbed images (random: mean ± sd over draws)"),
        yaxis=dict(title=names[0], type=_scale(names[0]), exponentformat="power",
                   dtick=1 if _scale(names[0]) == "log" else None),
        xaxis=dict(title="channel set"),
        updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.12, yanchor="bottom")],
        height=400, font=FONT, template="plotly_white", showlegend=False,
        margin=dict(l=10, r=10, t=80, b=50),
    )
    return fig


def _scale(metric: str) -> str:
    # MSE of the controls is orders of magnitude below the top-k's: linear bars would hide them.
    return "log" if metric == "mse" else "linear"


def _get(row: dict, name: str) -> float | None:
    if name.startswith("judge."):
        v = (row.get("judge") or {}).get(name[6:])
    else:
        v = row.get(name)
    return float(v) if isinstance(v, (int, float)) else None


# -- segmentation ----------------------------------------------------------------------------
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


# -- transport -------------------------------------------------------------------------------
def transport_strip(result: TransportResult, max_rows: int = 4, title: str | None = None) -> go.Figure:
    """Source, target, result and the token mask ``p`` (over the result), one row per pair.

    Hover on an image names its prompt; hover on the mask names the token, whether it was
    transported, and the channels ``m`` per site; the title carries the metrics.

    Shapes:
        result.token_mask: [rows, cols] or [pairs, rows, cols] bool.
    """
    n = min(max_rows, int(result.result.shape[0]))
    masks = result.token_mask if result.token_mask.ndim == 3 else result.token_mask[None]
    rows, cols = int(masks.shape[-2]), int(masks.shape[-1])
    meta = result.meta
    srcs = _prompts(meta, "source")
    tgts = _prompts(meta, "target")
    names = ["source", "target", "result (target with source channels)",
             "token mask p over the result"]
    row_titles = [f"{_esc(_short(srcs[i] if i < len(srcs) else '?', 24))} → "
                  f"{_esc(_short(tgts[i] if i < len(tgts) else '?', 24))}" for i in range(n)]
    fig = make_subplots(rows=n, cols=4, subplot_titles=names + [""] * (4 * (n - 1)),
                        row_titles=row_titles, horizontal_spacing=0.015, vertical_spacing=0.03)
    chans = _channels_text(result.channels)
    for i in range(n):
        src = _esc(srcs[i] if i < len(srcs) else "")
        tgt = _esc(tgts[i] if i < len(tgts) else "")
        for j, (lab, img) in enumerate([(f"source: {src}", result.source),
                                        (f"target: {tgt}", result.target),
                                        (f"result: {tgt} with channels of {src}", result.result)]):
            fig.add_trace(image_trace(img[min(i, img.shape[0] - 1)], (rows, cols), hover=lab),
                          row=i + 1, col=j + 1)
        fig.add_trace(image_trace(result.result[i], (rows, cols), hover="result"), row=i + 1, col=4)
        for tr in mask_traces(masks[min(i, masks.shape[0] - 1)], f"transported channels:<br>{chans}",
                              inside="transported (in p)", outside="kept (outside p)"):
            fig.add_trace(tr, row=i + 1, col=4)
    image_axes(fig, n, 4, (rows, cols))
    fig.update_layout(
        title=dict(text=title or f"Transport · {_transport_line(result.metrics)}"),
        height=130 + 290 * n, font=FONT, template="plotly_white",
        margin=dict(l=10, r=40, t=110, b=10),
    )
    fig.update_annotations(font_size=12)
    return fig


def _prompts(meta: dict, side: str) -> list[str]:
    """Prompts of one side of a transport (a real image source is named by its caption)."""
    many = meta.get(f"{side}_prompts")
    if many:
        return [str(p) for p in many]
    one = meta.get(f"{side}_prompt")
    if one:
        return [str(one)]
    img = meta.get(f"{side}_image")
    if isinstance(img, dict):
        return [f"image {img.get('caption') or img.get('path') or ''}".strip()]
    return []


def _transport_line(m: dict) -> str:
    """The few numbers that say whether transport worked, for the title."""
    src, tgt = m.get("to_source"), m.get("to_target")
    if not (isinstance(src, dict) and isinstance(tgt, dict)):
        return _metrics_line(m, limit=4)
    parts = [f"MSE to source inside p {fmt(src.get('inside'))}",
             f"to target outside p {fmt(tgt.get('outside'))}"]
    if isinstance(m.get("token_fraction"), (int, float)):
        parts.append(f"p covers {100 * m['token_fraction']:.0f}% of tokens")
    return " · ".join(parts)


def _metrics_line(metrics: dict, limit: int = 6) -> str:
    flat = []

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat.append(f"{_esc(prefix + k)} {fmt(v)}")

    walk(metrics or {})
    if not flat:
        return "no metrics"
    line = " · ".join(flat[:limit])
    return line if len(flat) <= limit else line + " …"


__all__: Sequence[str] = (
    "disruption_grid", "disruption_metrics", "mask_overview", "mask_viewer", "transport_strip",
)
