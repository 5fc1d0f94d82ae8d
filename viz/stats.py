"""Viewers of channel statistics: heatmap, massive-activation profile, per-step evolution.

The layers × channels heatmap, the classic profile (top-1/2/3 and median per layer), and the
per-step evolution of a site's top channels.

Every viewer takes :class:`massact_nn.stats.ChannelStats` results (never a model) and returns a
``plotly.graph_objects.Figure`` whose hover text names the site, layer, channel and value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from massact_nn.errors import MassactError, check_k, choice_error
from massact_nn.sites import resolve_sites
from massact_nn.stats import STATISTICS, ChannelStats

from ._common import (
    FONT,
    LOG_FLOOR,
    PALETTE,
    as_numpy,
    esc,
    log10_floor,
    log_axis,
    log_colorbar,
    lower_median,
    run_label,
)

RANK_COLOURS = ("#d62728", "#ff7f0e", "#bcbd22")
RANK_DASH = ("solid", "dash", "dot")
MEDIAN_COLOUR = "#7f7f7f"


def site_label(module: str, layer: int) -> str:
    """How a site is named on axes and in hover text: module path and flat layer index."""
    return f"{module} · L{layer}"


def stat_matrix(stats: ChannelStats, stat: str = "abs_mean") -> np.ndarray:
    """A statistic stacked over sites, NaN-padded where sites have different widths.

    Shapes:
        -> [sites, max channels].
    """
    width = max(s.channels for s in stats.sites)
    out = np.full((len(stats.sites), width), np.nan)
    for i, s in enumerate(stats.sites):
        out[i, : s.channels] = as_numpy(stats.stat(s.module, stat))
    return out


def channel_heatmap(
    stats: ChannelStats,
    k: int | None = None,
    statistics: Sequence[str] = STATISTICS,
    channels: str | Sequence[int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layers × channels heatmap of a statistic on a log colour scale, top-k channels marked.

    A dropdown switches between statistics; each has its own heatmap and top-k markers. The
    colour is ``log10(value)`` (the colour bar is labelled in raw values); hover text shows the
    raw value.

    Args:
        stats: Channel statistics of one run.
        k: How many top channels to mark per site (default: the run's k).
        statistics: Which statistics the dropdown offers, the first shown initially.
        channels: Columns shown: ``None`` (every channel), ``"top"`` (the union of every site's
            top-k under the offered statistics: readable for 3072-wide models), or channel ids.
        title: Figure title (default: names the model).
    """
    if not statistics:
        accepted = ", ".join(STATISTICS)
        raise MassactError(f"statistics=() is empty; accepted: one or more of {accepted}")
    for name in statistics:
        if name not in STATISTICS:
            raise choice_error("statistic", name, STATISTICS)
    kk = stats.k if k is None else k
    check_k(kk, min(s.channels for s in stats.sites))
    labels = [site_label(s.module, s.layer) for s in stats.sites]
    cols = _columns(stats, kk, statistics, channels)
    # A subset is drawn as categories so that the chosen columns sit side by side.
    xs_all = np.arange(stat_matrix(stats, statistics[0]).shape[1]) if cols is None else \
        [str(c) for c in cols]
    fig = go.Figure()
    for j, name in enumerate(statistics):
        raw = stat_matrix(stats, name)
        if cols is not None:
            raw = raw[:, cols]
        raw = raw.astype(np.float32)  # half the HTML of float64, and plenty for a colour
        z = log10_floor(raw).astype(np.float32)
        fig.add_trace(go.Heatmap(
            z=z, customdata=raw, x=xs_all, y=labels,
            colorscale="Viridis", zmin=float(np.nanmin(z)), zmax=float(np.nanmax(z)),
            colorbar=log_colorbar(float(np.nanmin(z)), float(np.nanmax(z)), name),
            hovertemplate=(f"site %{{y}}<br>channel %{{x}}<br>{name} = %{{customdata:.4g}}"
                           "<extra></extra>"),
            name=name, visible=j == 0,
        ))
        xs, ys, vals, ranks = [], [], [], []
        for s, lab in zip(stats.sites, labels):
            top = stats.top(s.module, kk, stat=name).tolist()
            v = as_numpy(stats.stat(s.module, name))
            for r, c in enumerate(top):
                if cols is not None and c not in cols:
                    continue
                xs.append(c if cols is None else str(c))
                ys.append(lab)
                vals.append(v[c])
                ranks.append(r + 1)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"top-{kk} ({name})",
            customdata=np.stack([vals, ranks], axis=1),
            marker=dict(symbol="circle-open", size=9, color="#ff2d55", line=dict(width=2)),
            hovertemplate=(f"site %{{y}}<br>channel %{{x}} (top-%{{customdata[1]}})<br>{name} = "
                           "%{customdata[0]:.4g}<extra></extra>"),
            visible=j == 0, showlegend=False,
        ))
    n = len(statistics)
    buttons = []
    for j, name in enumerate(statistics):
        vis = [False] * (2 * n)
        vis[2 * j] = vis[2 * j + 1] = True
        buttons.append(dict(label=name, method="update", args=[{"visible": vis}]))
    model = run_label(stats.meta, "model")
    fig.update_layout(
        title=dict(text=title or f"Channel statistics per site · {model} · circles: top-{kk}"),
        xaxis=dict(title="channel" if cols is None else "channel (only those listed)",
                   showgrid=False, type="linear" if cols is None else "category"),
        yaxis=dict(title="", autorange="reversed", type="category", showgrid=False),
        updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.12,
                          yanchor="bottom", showactive=True)],
        annotations=[dict(text="statistic:", showarrow=False, xref="paper", yref="paper",
                          x=0.88, xanchor="right", y=1.12, yanchor="bottom", yshift=6)],
        height=max(360, 22 * len(labels) + 170), font=FONT, template="plotly_white",
        margin=dict(l=10, r=10, t=80, b=50),
    )
    return fig


def _columns(
    stats: ChannelStats, k: int, statistics: Sequence[str], channels: str | Sequence[int] | None
) -> list[int] | None:
    if channels is None:
        return None
    width = max(s.channels for s in stats.sites)
    if isinstance(channels, str):
        if channels != "top":
            raise choice_error("channels", channels, ["None", "top", "a list of channel ids"])
        return sorted({int(c) for name in statistics for s in stats.sites
                       for c in stats.top(s.module, k, stat=name).tolist()})
    ids = [int(c) for c in channels]
    bad = [c for c in ids if not 0 <= c < width]
    if not ids or bad:
        raise MassactError(f"channels {bad or ids} out of range; accepted: ids in 0..{width - 1}")
    return sorted(set(ids))


def _profile_rows(stats: ChannelStats, stat: str) -> dict[str, list]:
    rows: dict[str, list] = {"layer": [], "module": [], "channels": [], "values": [], "median": []}
    for s in stats.sites:
        v = as_numpy(stats.stat(s.module, stat))
        order = np.argsort(-v, kind="stable")[:3]
        rows["layer"].append(s.layer)
        rows["module"].append(s.module)
        rows["channels"].append(order.tolist())
        rows["values"].append(v[order].tolist())
        rows["median"].append(float(lower_median(v)))
    return rows


def _depth(run: ChannelStats) -> int:
    """How many sites the run's model has (not only the measured ones)."""
    n = run.meta.get("n_layers")
    return int(n) if n else max(s.layer for s in run.sites) + 1


def massive_profile(
    stats: ChannelStats | Sequence[ChannelStats],
    stat: str = "abs_mean",
    labels: Sequence[str] | None = None,
    normalized_depth: bool | None = None,
    title: str | None = None,
) -> go.Figure:
    """The classic massive-activation plot: top-1, top-2, top-3 and the median per layer (log y).

    Several runs (e.g. a DiT and a language model) are overlaid: colour per run, dash per rank.

    Args:
        stats: One run, or several to overlay (a language-model run's ``LLMStats`` too).
        stat: Which statistic ranks the channels.
        labels: Legend names of the runs (default: their model names).
        normalized_depth: x = layer / (layers − 1) in [0, 1] instead of the layer index
            (default: on when the runs' models have different depths). The depth is the model's
            site count from the run's metadata (``n_layers``), so a run measured at a subset of
            sites keeps each site at its own depth; older runs fall back to the deepest measured
            layer.
        title: Figure title.
    """
    runs = [stats] if isinstance(stats, ChannelStats) else list(stats)
    runs = [getattr(r, "channels", r) for r in runs]  # a language-model run: its channel statistics
    if not runs:
        raise MassactError("no statistics given; accepted: one or more ChannelStats")
    if stat not in STATISTICS:
        raise choice_error("statistic", stat, STATISTICS)
    if labels is None:
        labels = [run_label(r.meta, f"run {i}") for i, r in enumerate(runs)]
        if len(set(labels)) < len(labels):
            labels = [f"{lab} ({i})" for i, lab in enumerate(labels)]
    if len(labels) != len(runs):
        raise MassactError(
            f"labels has {len(labels)} names for {len(runs)} runs; accepted: one per run"
        )
    if normalized_depth is None:
        normalized_depth = len({_depth(r) for r in runs}) > 1
    fig = go.Figure()
    single = len(runs) == 1
    ys: list[np.ndarray] = []
    for i, (run, group) in enumerate(zip(runs, labels)):
        lab = esc(group)  # shown as typed in legends and hover boxes
        rows = _profile_rows(run, stat)
        x = np.asarray(rows["layer"], dtype=float)
        if normalized_depth:
            x = (x / max(_depth(run) - 1, 1)).round(4)
        vals = np.asarray([v + [np.nan] * (3 - len(v)) for v in rows["values"]])
        ys += [vals.ravel(), np.asarray(rows["median"])]
        chans = [c + [-1] * (3 - len(c)) for c in rows["channels"]]
        for r in range(3):
            colour = RANK_COLOURS[r] if single else PALETTE[i % len(PALETTE)]
            dash = "solid" if single else RANK_DASH[r]
            fig.add_trace(go.Scatter(
                x=x, y=np.maximum(vals[:, r], LOG_FLOOR), mode="lines+markers",
                name=f"top-{r + 1}" if single else f"{lab} top-{r + 1}",
                legendgroup=group, line=dict(color=colour, dash=dash, width=2.5 if r == 0 else 1.8),
                marker=dict(size=6), text=rows["module"],
                customdata=np.stack(
                    [np.asarray(rows["layer"]), [c[r] for c in chans], vals[:, r]], 1
                ),
                hovertemplate=(f"{lab}<br>site %{{text}} · L%{{customdata[0]}}<br>top-{r + 1}: "
                               f"channel %{{customdata[1]}}<br>{stat} = %{{customdata[2]:.4g}}"
                               "<extra></extra>"),
            ))
        med = np.asarray(rows["median"])
        fig.add_trace(go.Scatter(
            x=x, y=np.maximum(med, LOG_FLOOR), mode="lines+markers",
            name="median" if single else f"{lab} median", legendgroup=group,
            line=dict(color=MEDIAN_COLOUR if single else PALETTE[i % len(PALETTE)], dash="dashdot",
                      width=1.5),
            marker=dict(size=5, symbol="square"), text=rows["module"],
            customdata=np.stack([np.asarray(rows["layer"]), med], 1),
            hovertemplate=(f"{lab}<br>site %{{text}} · L%{{customdata[0]}}<br>median over channels"
                           f"<br>{stat} = %{{customdata[1]:.4g}}<extra></extra>"),
        ))
    model = esc(labels[0]) if single else " vs ".join(esc(x) for x in labels)
    fig.update_layout(
        title=dict(text=title or f"Massive activations per layer ({stat}) · {model}"),
        xaxis=_depth_axis(normalized_depth, max(_depth(r) for r in runs)),
        yaxis=log_axis(np.concatenate(ys), f"{stat} (log)"),
        height=460, font=FONT, template="plotly_white", hovermode="closest",
        legend=dict(orientation="v", x=1.01, y=1.0),
        margin=dict(l=10, r=10, t=60, b=50),
    )
    return fig


def step_evolution(
    stats: ChannelStats,
    n_channels: int | None = None,
    sites: Sequence[str | int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Per-step ``abs_mean`` of each site's top channels (lines, log y), a slider over sites.

    The median over all channels is drawn as a grey dashed reference. A channel keeps its colour
    across sites, so a massive channel that persists through depth is easy to follow.

    Args:
        stats: A run collected with ``per_step=True``.
        n_channels: Top channels per site (default: the run's k), ranked by overall ``abs_mean``.
        sites: Module paths or layer indices (default: all).
        title: Figure title.
    """
    stats.require_per_step()
    chosen = resolve_sites(stats.sites, sites)
    n = stats.k if n_channels is None else n_channels
    check_k(n, min(s.channels for s in chosen), what="n_channels")
    colour_of: dict[int, str] = {}
    fig = go.Figure()
    groups: list[int] = []
    ys: list[np.ndarray] = []
    for si, s in enumerate(chosen):
        curves = as_numpy(stats.stat(s.module, "per_step_abs_mean"))  # [S, C]
        steps = np.arange(curves.shape[0])
        lab = site_label(s.module, s.layer)
        top = stats.top(s.module, n).tolist()
        ys += [curves[:, top].ravel(), lower_median(curves, axis=1)]
        for c in top:
            colour_of.setdefault(c, PALETTE[len(colour_of) % len(PALETTE)])
            fig.add_trace(go.Scatter(
                x=steps, y=np.maximum(curves[:, c], LOG_FLOOR), mode="lines+markers",
                name=f"channel {c}", line=dict(color=colour_of[c], width=2),
                customdata=curves[:, c],
                hovertemplate=(f"site {lab}<br>step %{{x}}<br>channel {c}<br>abs_mean = "
                               "%{customdata:.4g}<extra></extra>"),
                visible=si == 0,
            ))
        med = lower_median(curves, axis=1)
        fig.add_trace(go.Scatter(
            x=steps, y=np.maximum(med, LOG_FLOOR), mode="lines", name="median of channels",
            line=dict(color=MEDIAN_COLOUR, dash="dash", width=1.5), customdata=med,
            hovertemplate=(f"site {lab}<br>step %{{x}}<br>median over {s.channels} channels<br>"
                           "abs_mean = %{customdata:.4g}<extra></extra>"),
            visible=si == 0,
        ))
        groups.append(len(top) + 1)
    total = sum(groups)
    slider_steps, start = [], 0
    for s, g in zip(chosen, groups):
        vis = [False] * total
        vis[start:start + g] = [True] * g
        start += g
        relayout = {"title.text": _evo_title(stats, s, title)}
        slider_steps.append(dict(method="update", label=str(s.layer),
                                 args=[{"visible": vis}, relayout]))
    fig.update_layout(
        title=dict(text=_evo_title(stats, chosen[0], title)),
        xaxis=dict(title="denoising step", dtick=1),
        yaxis=log_axis(np.concatenate(ys), "abs_mean (log)"),
        sliders=[dict(steps=slider_steps, active=0, currentvalue=dict(prefix="layer "),
                      pad=dict(t=50))],
        height=520, font=FONT, template="plotly_white",
        margin=dict(l=10, r=10, t=60, b=40),
    )
    return fig


def _evo_title(stats: ChannelStats, site, title: str | None) -> str:
    base = title or f"Per-step abs_mean of the top channels · {run_label(stats.meta, 'model')}"
    return f"{base} · site {site_label(site.module, site.layer)}"


def _depth_axis(normalized: bool, layers: int) -> dict:
    if normalized:
        return dict(title="normalised depth (layer / (layers − 1))", range=[-0.03, 1.03])
    # Integer ticks only: a layer 1.5 does not exist.
    return dict(title="layer", dtick=1 if layers <= 40 else None, tick0=0)
