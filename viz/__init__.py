"""Plotly viewers of massact-nn results and the self-contained HTML report.

The only place in the project that imports plotly. Every viewer takes result objects (never a
model) and returns a ``plotly.graph_objects.Figure``.
"""

from .report import build_report, find_runs
from .stats import channel_heatmap, massive_profile, stat_matrix, step_evolution

__all__ = [
    "build_report",
    "channel_heatmap",
    "find_runs",
    "massive_profile",
    "stat_matrix",
    "step_evolution",
]
