"""Viewer of a language model's largest activations by token position (Sun et al. 2024).

Takes :class:`massact_nn.llm_stats.TokenPositions` (``llm.json`` of a ``massact llm-stats`` run):
per layer, the 1st/2nd/3rd largest |h| of a sequence against the layer's median |h|, with the
token and channel where the largest one sits. The channel-mean view of the same run is
:func:`massact_nn.viz.massive_profile`, which also overlays it with a DiT on normalised depth.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from massact_nn.errors import MassactError
from massact_nn.llm_stats import TokenPositions

from ._common import FONT, LOG_FLOOR, esc, log_axis
from .stats import MEDIAN_COLOUR, RANK_COLOURS

POSITION_COLUMNS = ("layer", "module", "ratio_top1_median", "largest")


def token_extremes(positions: TokenPositions, title: str | None = None) -> go.Figure:
    """Top-1/2/3 |h| per layer (mean over prompts) against the median |h| (log y).

    Hover on the top-1 line names the layer's largest entry: token text, position, channel and
    its signed value.
    """
    layers = positions.layers
    if not layers:
        raise MassactError("the token positions hold no layers")
    x = [d["layer"] for d in layers]
    fig = go.Figure()
    tops = np.asarray([(d["top_abs"] + [np.nan] * 3)[:3] for d in layers], dtype=float)
    med = np.asarray([d["median_abs"] for d in layers], dtype=float)
    for r in range(3):
        hover = []
        for d in layers:
            e = d["top"][0] if (r == 0 and d.get("top")) else None
            where = (f"<br>largest: {esc(e['token_text'])}@{e['token']} (prompt {e['prompt']}), "
                     f"channel {e['channel']}, value {e['value']:.4g}") if e else ""
            hover.append(f"site {esc(d['module'])} · L{d['layer']}{where}")
        fig.add_trace(go.Scatter(
            x=x, y=np.maximum(tops[:, r], LOG_FLOOR), mode="lines+markers", name=f"top-{r + 1} |h|",
            line=dict(color=RANK_COLOURS[r], width=2.5 if r == 0 else 1.8), text=hover,
            customdata=tops[:, r],
            hovertemplate=f"%{{text}}<br>top-{r + 1} |h| = %{{customdata:.4g}}<extra></extra>",
        ))
    fig.add_trace(go.Scatter(
        x=x, y=np.maximum(med, LOG_FLOOR), mode="lines+markers", name="median |h|",
        line=dict(color=MEDIAN_COLOUR, dash="dashdot", width=1.5), customdata=med,
        text=[f"site {esc(d['module'])} · L{d['layer']}" for d in layers],
        hovertemplate="%{text}<br>median |h| = %{customdata:.4g}<extra></extra>",
    ))
    fig.update_layout(
        title=dict(text=title or "Largest activations per layer (|h| of single entries, mean over "
                   "prompts)"),
        xaxis=dict(title="layer", dtick=1 if len(x) <= 40 else None),
        yaxis=log_axis(np.concatenate([tops.ravel(), med]), "|h| (log)"),
        height=440, font=FONT, template="plotly_white", margin=dict(l=10, r=10, t=60, b=50),
    )
    return fig


def position_rows(positions: TokenPositions, per_layer: int = 3) -> list[dict]:
    """Table rows: per layer, the ratio and its largest entries as ``token@pos ch c (value)``."""
    rows = []
    for d in positions.layers:
        entries = [f"{e['token_text']}@{e['token']} ch{e['channel']} ({e['value']:+.3g})"
                   for e in d.get("top", [])[:per_layer]]
        rows.append({"layer": d["layer"], "module": d["module"],
                     "ratio_top1_median": d.get("ratio_top1_median"), "largest": entries})
    return rows
