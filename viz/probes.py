"""Viewers of probe results: the disruption grid and metrics, and the transport strip.

Each takes a result object (:class:`~massact_nn.disruption.DisruptionResult`,
:class:`~massact_nn.transport.TransportResult`) and returns a ``plotly.graph_objects.Figure``.
Segmentation masks are in :mod:`massact_nn.viz.masks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from massact_nn.disruption import DisruptionResult
from massact_nn.errors import MassactError, choice_error
from massact_nn.transport import TransportResult

from ._common import FONT, compact_ints, fmt, log_axis, run_label
from ._common import esc as _esc
from ._common import short as _short
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
    if isinstance(judge, dict) and judge and not row.get("non_finite"):  # NaN readings say nothing
        parts.append("judge " + " ".join(f"{_esc(a)} {fmt(v)}" for a, v in list(judge.items())[:3]
                                         if isinstance(v, (int, float))))
    if row.get("non_finite"):
        parts.append(f"<b>{row['non_finite']} image(s) not finite</b> (magenta)")
    return "<br>".join(parts)


def disruption_grid(
    result: DisruptionResult, max_prompts: int = 4, sets: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Channel sets side by side (columns, baseline first), prompts as rows, metrics as captions.

    Hover on an image names the set, the prompt, the disrupted channels per site and the
    metrics.

    Args:
        result: A disruption result.
        max_prompts: Rows shown (the first prompts).
        sets: Set names shown, in order (default: all; see :func:`disruption_sets_by_k`).
        title: Figure title.
    """
    sets = list(result.sets if sets is None else sets)
    unknown = [s for s in sets if s not in result.images]
    if unknown:
        raise choice_error("channel set", unknown[0], result.sets)
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


def disruption_sets_by_k(result: DisruptionResult) -> dict[int, list[str]]:
    """Set names grouped by k, each group led by the undisturbed baseline (one grid per k)."""
    per_set = (result.metrics or {}).get("sets", {})
    base = [s for s in result.sets if s == "none"]
    groups: dict[int, list[str]] = {}
    for s in result.sets:
        k = per_set.get(s, {}).get("k")
        if s != "none" and isinstance(k, int):
            groups.setdefault(k, list(base)).append(s)
    return groups or {0: list(result.sets)}


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
    # MSE of the controls is orders of magnitude below the top-k's: linear bars would hide them.
    axes = {n: log_axis(np.asarray([_get(r, n) or np.nan for r in summary]), n) if n == "mse"
            else dict(title=n, type="linear") for n in names}
    buttons = [dict(label=n, method="update",
                    args=[{"visible": [i == j for i in range(len(names))]}, {"yaxis": axes[n]}])
               for j, n in enumerate(names)]
    fig.update_layout(
        title=dict(text=title or "Disruption vs the undisturbed images (random: mean ± sd over draws)"),
        yaxis=axes[names[0]],
        xaxis=dict(title="channel set"),
        updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.12, yanchor="bottom")],
        height=400, font=FONT, template="plotly_white", showlegend=False,
        margin=dict(l=10, r=10, t=80, b=50),
    )
    return fig


def _get(row: dict, name: str) -> float | None:
    if name.startswith("judge."):
        v = (row.get("judge") or {}).get(name[6:])
    else:
        v = row.get(name)
    return float(v) if isinstance(v, (int, float)) else None


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
    # A run without the control rows (``target is None``) has no untouched target to show.
    panels = [("source", "source: {src}", result.source), ("target", "target: {tgt}", result.target),
              ("result (target with source channels)", "result: {tgt} with channels of {src}",
               result.result)]
    panels = [x for x in panels if x[2] is not None]
    ncol = len(panels) + 1
    names = [x[0] for x in panels] + ["token mask p over the result"]
    if len(srcs) == 1:  # one real image is the source of every pair
        srcs = srcs * n
    row_titles = [f"{_esc(_short(srcs[i] if i < len(srcs) else '?', 24))} → "
                  f"{_esc(_short(tgts[i] if i < len(tgts) else '?', 24))}" for i in range(n)]
    fig = make_subplots(rows=n, cols=ncol, subplot_titles=names + [""] * (ncol * (n - 1)),
                        row_titles=row_titles, horizontal_spacing=0.015, vertical_spacing=0.03)
    chans = _channels_text(result.channels)
    for i in range(n):
        src = _esc(srcs[i] if i < len(srcs) else "")
        tgt = _esc(tgts[i] if i < len(tgts) else "")
        for j, (_, lab, img) in enumerate(panels):
            fig.add_trace(image_trace(img[min(i, img.shape[0] - 1)], (rows, cols),
                                      hover=lab.format(src=src, tgt=tgt)),
                          row=i + 1, col=j + 1)
        fig.add_trace(image_trace(result.result[i], (rows, cols), hover="result"), row=i + 1, col=ncol)
        for tr in mask_traces(masks[min(i, masks.shape[0] - 1)], f"transported channels:<br>{chans}",
                              inside="transported (in p)", outside="kept (outside p)"):
            fig.add_trace(tr, row=i + 1, col=ncol)
    image_axes(fig, n, ncol, (rows, cols))
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
    if not isinstance(src, dict):
        return _metrics_line(m, limit=4)
    parts = [f"MSE to source inside p {fmt(src.get('inside'))}"]
    if isinstance(tgt, dict):
        parts.append(f"to target outside p {fmt(tgt.get('outside'))}")
    else:
        parts.append("no untouched target (run without control rows)")
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
    "disruption_grid", "disruption_metrics", "transport_strip",
)
