"""Viewers of channel statistics: figures carry the measured numbers, not just any figure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _viz_fixtures import PLANT
from _viz_fixtures import synthetic_stats as _stats
from massact_nn.viz import channel_heatmap, massive_profile, stat_matrix, step_evolution

from massact_nn.errors import MassactError
from massact_nn.sites import Site
from massact_nn.stats import STATISTICS, StatsAccumulator


@pytest.fixture(scope="module")
def stats():
    return _stats()


def test_heatmap_colour_is_log10_of_the_statistic_and_hover_has_raw_values(stats):
    fig = channel_heatmap(stats)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [t.name for t in heat] == list(STATISTICS)
    for t in heat:
        m = stats.matrix(t.name).double().numpy()
        np.testing.assert_allclose(np.asarray(t.customdata), m, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(t.z), np.log10(m), rtol=1e-6)
        assert "%{y}" in t.hovertemplate and "channel %{x}" in t.hovertemplate
        assert t.name in t.hovertemplate
    # Rows are named by module path and layer (the hover's %{y}).
    assert list(heat[0].y) == [f"transformer_blocks.{i} · L{i}" for i in range(3)]
    assert heat[0].visible and not heat[1].visible


def test_heatmap_marks_the_measured_top_k(stats):
    fig = channel_heatmap(stats, k=2)
    markers = [t for t in fig.data if t.type == "scatter"]
    assert len(markers) == len(STATISTICS)
    for stat, t in zip(STATISTICS, markers):
        for s in stats.sites:
            label = f"{s.module} · L{s.layer}"
            got = [int(x) for x, y in zip(t.x, t.y) if y == label]
            assert got == stats.top(s.module, 2, stat=stat).tolist()
    am = [t for t in markers if "abs_mean" in t.name][0]
    first = [int(x) for x, y in zip(am.x, am.y) if y.startswith("transformer_blocks.2 ")][0]
    assert first == PLANT[2]
    # The dropdown shows one statistic's heatmap and markers at a time.
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == list(STATISTICS)
    vis = buttons[1].args[0]["visible"]
    assert vis == [False, False, True, True, False, False]


def test_heatmap_rejects_unknown_statistic_and_k(stats):
    with pytest.raises(MassactError, match="unknown statistic 'median'"):
        channel_heatmap(stats, statistics=["median"])
    with pytest.raises(MassactError, match="k=17"):
        channel_heatmap(stats, k=17)


def test_stat_matrix_pads_sites_of_different_width():
    sites = [Site(0, "a.0", 4), Site(1, "b.0", 6)]
    acc = StatsAccumulator(sites, steps=1, k=2)
    acc.begin_batch(1)
    for s in sites:
        acc.update(s.module, 0, torch.ones(1, 3, s.channels))
    acc.end_batch()
    m = stat_matrix(acc.result())
    assert m.shape == (2, 6) and np.isnan(m[0, 4:]).all() and (m[1] == 1).all()


def test_profile_shows_top_three_and_median(stats):
    fig = massive_profile(stats)
    names = [t.name for t in fig.data]
    assert names == ["top-1", "top-2", "top-3", "median"]
    for r in range(3):
        t = fig.data[r]
        for i, s in enumerate(stats.sites):
            v = stats.stat(s.module).double()
            order = torch.sort(v, descending=True).indices
            assert int(t.customdata[i][1]) == int(order[r])  # hover names the channel
            assert t.y[i] == pytest.approx(float(v[order[r]]), rel=1e-6)
            assert t.text[i] == s.module
    assert [int(c[1]) for c in fig.data[0].customdata] == [PLANT[0], PLANT[1], PLANT[2]]
    # The median is torch's (lower middle value), the one the statistics' ratio_top1_median uses.
    med = [float(stats.stat(s.module).median()) for s in stats.sites]
    assert list(fig.data[3].y) == pytest.approx(med, rel=1e-6)
    for s, top1, m in zip(stats.summary(), fig.data[0].y, fig.data[3].y, strict=True):
        assert s["ratio_top1_median"] == pytest.approx(top1 / m, rel=1e-5)
    assert fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [0, 1, 2]


def test_profile_ranks_by_the_statistic_asked_for(stats):
    fig = massive_profile(stats, stat="max_abs")
    for r in range(3):
        for i, s in enumerate(stats.sites):
            v = stats.stat(s.module, "max_abs").double()
            order = torch.sort(v, descending=True).indices
            assert fig.data[r].y[i] == pytest.approx(float(v[order[r]]), rel=1e-6)
    assert not torch.allclose(stats.stat(stats.sites[0].module, "max_abs"), stats.stat(stats.sites[0].module))


def test_normalised_depth_is_the_layer_over_the_model_depth(stats):
    # A 12-site model measured at sites 0, 1 and 11: each keeps its own depth, not its rank.
    from massact_nn.stats import ChannelStats

    part = ChannelStats(sites=[replace(s, layer=layer) for s, layer in zip(stats.sites, (0, 1, 11))],
                        tensors=stats.tensors, meta={**stats.meta, "n_layers": 12})
    fig = massive_profile([stats, part], normalized_depth=True)
    assert list(fig.data[4].x) == pytest.approx([0, 1 / 11, 1], abs=1e-4)
    assert list(fig.data[0].x) == pytest.approx([0, 0.5, 1])  # no n_layers: the deepest layer + 1
    # The depths differ (3 against 12), so the default normalises too.
    assert list(massive_profile([stats, part]).data[4].x) == pytest.approx([0, 1 / 11, 1], abs=1e-4)


def test_profile_overlays_runs_on_normalised_depth(stats):
    other = _stats(n_sites=5, seed=1, model="/m/tiny-b")
    fig = massive_profile([stats, other])
    assert len(fig.data) == 8
    a, b = fig.data[0], fig.data[4]
    assert list(a.x) == pytest.approx([0, 0.5, 1])
    assert list(b.x) == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert a.name == "tiny-a top-1" and b.name == "tiny-b top-1"
    assert a.line.color != b.line.color
    assert "tiny-b" in b.hovertemplate
    with pytest.raises(MassactError, match="labels has 1 names for 2 runs"):
        massive_profile([stats, other], labels=["x"])


def test_step_evolution_plots_per_step_curves_with_a_site_slider(stats):
    fig = step_evolution(stats, n_channels=2)
    assert len(fig.layout.sliders[0].steps) == 3
    per_site = 3  # two channels + the median
    assert len(fig.data) == 3 * per_site
    for i, s in enumerate(stats.sites):
        curves = stats.stat(s.module, "per_step_abs_mean").double().numpy()
        top = stats.top(s.module, 2).tolist()
        traces = fig.data[i * per_site:(i + 1) * per_site]
        assert [t.name for t in traces[:2]] == [f"channel {c}" for c in top]
        for t, c in zip(traces, top):
            np.testing.assert_allclose(np.asarray(t.customdata), curves[:, c], rtol=1e-6)
            assert s.module in t.hovertemplate
        vis = fig.layout.sliders[0].steps[i].args[0]["visible"]
        assert [j for j, v in enumerate(vis) if v] == list(range(i * per_site, (i + 1) * per_site))
    # The planted channel grows with the step.
    t0 = fig.data[0]
    assert t0.name == f"channel {PLANT[0]}" and np.all(np.diff(np.asarray(t0.customdata)) > 0)


def test_step_evolution_needs_per_step():
    with pytest.raises(MassactError, match="per_step=True"):
        step_evolution(_stats(per_step=False))


def test_heatmap_can_show_only_the_top_channels(stats):
    fig = channel_heatmap(stats, k=2, channels="top")
    heat = fig.data[0]
    union = sorted({c for s in stats.sites for name in STATISTICS
                    for c in stats.top(s.module, 2, stat=name).tolist()})
    assert list(heat.x) == [str(c) for c in union]
    m = stats.matrix("abs_mean").double().numpy()[:, union]
    np.testing.assert_allclose(np.asarray(heat.customdata), m, rtol=1e-6)
    assert set(fig.data[1].x) <= set(heat.x)
    fig = channel_heatmap(stats, channels=[3, 0])
    assert list(fig.data[0].x) == ["0", "3"]
    with pytest.raises(MassactError, match="out of range"):
        channel_heatmap(stats, channels=[99])
    with pytest.raises(MassactError, match="unknown channels 'bottom'"):
        channel_heatmap(stats, channels="bottom")


def test_token_extremes_shows_top_entries_against_the_median():
    from massact_nn.viz import token_extremes

    from massact_nn.llm_stats import TokenPositions

    layers = [{"layer": i, "module": f"encoder.layer.{i}", "median_abs": 0.5,
               "top_abs": [10.0 * (i + 1), 3.0, 2.0], "ratio_top1_median": 20.0 * (i + 1),
               "top": [{"prompt": 0, "token": 0, "token_text": "[CLS]", "last": False,
                        "channel": 99, "value": -10.0 * (i + 1), "ratio_median": 20.0}]}
              for i in range(3)]
    fig = token_extremes(TokenPositions(layers=layers, tokens=[["[CLS]", "a"]]))
    assert [t.name for t in fig.data] == ["top-1 |h|", "top-2 |h|", "top-3 |h|", "median |h|"]
    assert list(fig.data[0].customdata) == [10.0, 20.0, 30.0]
    assert list(fig.data[3].customdata) == [0.5, 0.5, 0.5]
    # Every line plots its own j-th largest |h| (the lines differ: 10 i, 3, 2; the median 0.5).
    for t, want in zip(fig.data, ([10.0, 20.0, 30.0], [3.0] * 3, [2.0] * 3, [0.5] * 3), strict=True):
        assert list(t.y) == want and list(t.customdata) == want, t.name
    assert "[CLS]@0" in fig.data[0].text[1] and "channel 99" in fig.data[0].text[1]
    assert "encoder.layer.1 · L1" in fig.data[0].text[1]


def test_step_heatmap_is_steps_by_top_channels_per_site(stats):
    from massact_nn.viz import step_heatmap

    fig = step_heatmap(stats, n_channels=2)
    assert len(fig.data) == len(stats.sites) and len(fig.layout.sliders[0].steps) == 3
    for t, s in zip(fig.data, stats.sites):
        top = stats.top(s.module, 2).tolist()
        assert list(t.x) == [str(c) for c in top]
        want = stats.stat(s.module, "per_step_abs_mean").double().numpy()[:, top]
        np.testing.assert_allclose(np.asarray(t.customdata), want, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(t.z), np.log10(want), rtol=1e-5)
        assert s.module in t.hovertemplate
    assert fig.data[0].zmin == fig.data[2].zmin  # one colour scale for every site


def test_labels_and_prompts_are_shown_as_typed(stats):
    from massact_nn.viz._common import esc

    fig = massive_profile([stats, stats], labels=["<b>run</b> %{y}", "plain"])
    trace = fig.data[0]
    assert trace.name.startswith("&lt;b&gt;run&lt;/b&gt;") and "%{y}" not in trace.name
    assert "%{y}" not in trace.hovertemplate.split("<br>")[0]  # not a placeholder plotly fills
    assert "&lt;b&gt;run" in fig.layout.title.text
    assert esc("50%{x} <i>") == "50%\u200b{x} &lt;i&gt;"


def test_a_language_model_run_overlays_as_it_is(stats):
    from massact_nn.llm_stats import LLMStats, TokenPositions

    llm = LLMStats(channels=_stats(n_sites=5, seed=1, model="/m/llm"), positions=TokenPositions([], []))
    fig = massive_profile([stats, llm], normalized_depth=True)
    assert list(fig.data[4].x) == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert list(fig.data[4].y) == pytest.approx(list(massive_profile(llm.channels).data[0].y))
