"""Steps × channels heatmap of a site's top channels, with a slider over sites."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from massact_nn.errors import check_k
from massact_nn.sites import resolve_sites
from massact_nn.stats import ChannelStats

from ._common import FONT, as_numpy, log10_floor, log_colorbar, run_label
from .stats import site_label


def step_heatmap(
    stats: ChannelStats,
    n_channels: int = 16,
    sites: Sequence[str | int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Per-step ``abs_mean`` (rows: denoising steps, columns: the site's top channels).

    The colour is ``log10`` on one scale shared by every site, so growth toward the last steps
    and differences between sites read directly; hover gives the raw value. A slider picks the
    site.

    Args:
        stats: A run collected with ``per_step=True``.
        n_channels: Top channels per site (by overall ``abs_mean``), left to right.
        sites: Module paths or layer indices (default: all).
        title: Figure title.
    """
    stats.require_per_step()
    chosen = resolve_sites(stats.sites, sites)
    check_k(n_channels, min(s.channels for s in chosen), what="n_channels")
    mats, tops = [], []
    for s in chosen:
        top = stats.top(s.module, n_channels).tolist()
        mats.append(as_numpy(stats.stat(s.module, "per_step_abs_mean"))[:, top].astype(np.float32))
        tops.append(top)
    z_all = [log10_floor(m) for m in mats]
    lo = float(min(np.nanmin(z) for z in z_all))
    hi = float(max(np.nanmax(z) for z in z_all))
    fig = go.Figure()
    for i, (s, m, z, top) in enumerate(zip(chosen, mats, z_all, tops)):
        fig.add_trace(go.Heatmap(
            z=z, customdata=m, x=[str(c) for c in top], y=np.arange(m.shape[0]),
            colorscale="Viridis", zmin=lo, zmax=hi, colorbar=log_colorbar(lo, hi, "abs_mean"),
            hovertemplate=(f"site {site_label(s.module, s.layer)}<br>step %{{y}}<br>channel %{{x}}"
                           "<br>abs_mean = %{customdata:.4g}<extra></extra>"),
            visible=i == 0, name=s.module,
        ))
    label = title or f"Per-step abs_mean, top-{n_channels} channels · {run_label(stats.meta, 'model')}"
    steps = [dict(method="update", label=str(s.layer),
                  args=[{"visible": [j == i for j in range(len(chosen))]},
                        {"title.text": f"{label} · site {site_label(s.module, s.layer)}"}])
             for i, s in enumerate(chosen)]
    n_steps = mats[0].shape[0]
    fig.update_layout(
        title=dict(text=f"{label} · site {site_label(chosen[0].module, chosen[0].layer)}"),
        xaxis=dict(title="channel (largest first)", type="category"),
        yaxis=dict(title="denoising step", autorange="reversed", dtick=1 if n_steps <= 30 else None),
        sliders=[dict(steps=steps, active=0, currentvalue=dict(prefix="layer "), pad=dict(t=50))],
        height=260 + 14 * n_steps, font=FONT, template="plotly_white",
        margin=dict(l=10, r=10, t=60, b=40),
    )
    return fig
