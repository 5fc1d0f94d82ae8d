"""Plotly viewers of massact-nn results and the self-contained HTML report.

The only place in the project that imports plotly. Every viewer takes result objects (never a
model) and returns a ``plotly.graph_objects.Figure``.
"""

from .llm import token_extremes
from .masks import mask_overview, mask_viewer
from .probes import disruption_grid, disruption_metrics, transport_strip
from .report import build_report, find_runs
from .stats import channel_heatmap, massive_profile, stat_matrix, step_evolution
from .steps import step_heatmap

__all__ = [
    "build_report",
    "channel_heatmap",
    "disruption_grid",
    "disruption_metrics",
    "find_runs",
    "mask_overview",
    "mask_viewer",
    "massive_profile",
    "stat_matrix",
    "step_evolution",
    "step_heatmap",
    "token_extremes",
    "transport_strip",
]
