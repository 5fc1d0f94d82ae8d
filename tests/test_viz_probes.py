"""Viewers of probe results: the right images, masks, IoU and channels end up in the figures."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _viz_fixtures import GRID, SIZE, disruption_result, segmentation_result, transport_result
from massact_nn.viz import (
    disruption_grid,
    disruption_metrics,
    mask_overview,
    mask_viewer,
    transport_strip,
)
from massact_nn.viz._images import outline_path

from massact_nn.masks import iou, upsample_nearest


def _decode(source: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(source.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def test_disruption_grid_places_each_set_in_its_column_with_metrics():
    r = disruption_result()
    fig = disruption_grid(r)
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == 4 * 2
    titles = [a.text for a in fig.layout.annotations]
    for s in r.sets:
        cap = [t for t in titles if t.startswith(f"<b>{s}</b>")]
        assert cap, s
        if s != "none":
            assert f"PSNR {r.metrics['sets'][s]['psnr']:.4g}" in cap[0]
    # Trace order is set-major: image (set j, prompt i) shows exactly that set's image.
    for j, s in enumerate(r.sets):
        for i in range(2):
            px = _decode(images[j * 2 + i].source)
            f = px.shape[0] // SIZE
            want = (r.images[s][i].permute(1, 2, 0).numpy() * 255).round()
            np.testing.assert_allclose(px[::f, ::f], want, atol=1)
    hover = images[2].hovertemplate  # top_k2, prompt 0
    assert "set top_k2" in hover and "transformer_blocks.0 [5, 2]" in hover
    # A prompt is text, never markup.
    assert any("&lt;b&gt;green" in (a.text or "") for a in fig.layout.annotations)


def test_disruption_metrics_bars_follow_the_summary():
    r = disruption_result()
    fig = disruption_metrics(r)
    mse = fig.data[0]
    rows = [x for x in r.metrics["summary"] if x["control"] != "none"]
    assert list(mse.x) == [f"{x['control']} k={x['k']}" for x in rows]
    assert list(mse.y) == pytest.approx([x["mse"] for x in rows])
    assert fig.layout.yaxis.type == "log"
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels == ["mse", "psnr", "judge.colour"]
    assert list(fig.data[1].y) == pytest.approx([x["psnr"] for x in rows])
    assert list(fig.data[2].y) == pytest.approx([x["judge"]["colour"] for x in rows])
    # One metric at a time: the first shown, each button shows its own.
    assert [t.visible for t in fig.data] == [True, False, False]
    for i, b in enumerate(fig.layout.updatemenus[0].buttons):
        assert b.args[0]["visible"] == [j == i for j in range(3)]


def test_mask_overview_reports_iou_against_the_truth():
    r, truth = segmentation_result()
    fig = mask_overview(r, truth)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("<b>top</b>")  # the primary set first
    for name in ("top", "random", "centre"):
        want = iou(upsample_nearest(r.set_mask(name), SIZE, SIZE), truth)
        assert any(t.startswith(f"<b>{name}</b>") and f"IoU {want:.4g}" in t for t in titles)
    assert titles[-1] == "<b>true mask</b>"
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 4
    # Each panel draws its own set's mask; the last the truth, a majority vote per token.
    for h, name in zip(heat, ("top", "random", "centre"), strict=False):
        np.testing.assert_array_equal(np.asarray(h.z), r.set_mask(name).numpy().astype(float))
    per_token = truth.float().reshape(GRID[0], SIZE // GRID[0], GRID[1], SIZE // GRID[1]).mean((1, 3)) > 0.5
    assert per_token.any() and not per_token.all()
    np.testing.assert_array_equal(np.asarray(heat[3].z), per_token.numpy().astype(float))


def test_mask_viewer_sliders_combine_site_and_step():
    r, truth = segmentation_result()
    fig = mask_viewer(r, truth)
    site_slider, step_slider = fig.layout.sliders
    assert [s.label for s in site_slider.steps] == ["tb.0", "stb.0"]
    assert [s.label for s in step_slider.steps] == ["1", "3"]
    heat = [(i, t) for i, t in enumerate(fig.data) if t.type == "heatmap"]
    assert len(heat) == 2 * 2 * 2  # sets × sites × steps
    # Each heatmap draws the mask of the (set, site, step) its hover names.
    for _, t in heat:
        found = dict(re.findall(r"(set|site|step) ([^<]+)<br>", t.hovertemplate))
        key = f"{found['set']}/{found['site']}/{found['step']}"
        np.testing.assert_array_equal(np.asarray(t.z), r.per_block[key].numpy().astype(float), err_msg=key)
    assert len({tuple(map(tuple, np.asarray(t.z))) for _, t in heat}) > 1, "the masks must differ"
    # Pick site 1 (single_transformer_blocks.0) and step 3: exactly one heatmap per set is shown.
    vis = site_slider.steps[1].args[0]["visible"]
    opa = step_slider.steps[1].args[0]["opacity"]
    shown = [t for i, t in heat if vis[i] and opa[i] == 1.0]
    assert len(shown) == 2
    for t in shown:
        assert "single_transformer_blocks.0" in t.hovertemplate and "step 3" in t.hovertemplate
    assert "single_transformer_blocks.0" in site_slider.steps[1].args[1]["title.text"]
    # The block that differs from the truth by one token reports its own IoU on hover.
    odd = [t for _, t in heat if "set top" in t.hovertemplate and "site transformer_blocks.0" in
           t.hovertemplate and "step 1" in t.hovertemplate][0]
    want = iou(upsample_nearest(r.per_block["top/transformer_blocks.0/1"], SIZE, SIZE), truth)
    assert f"IoU vs true mask {want:.4g}" in odd.hovertemplate and want < 1.0


def test_outline_traces_the_mask_boundary_exactly():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    xs, ys = outline_path(m)
    segs = {(xs[i], ys[i], xs[i + 1], ys[i + 1]) for i in range(0, len(xs), 3)}
    assert len(segs) == 8  # a 2×2 block has 8 unit edges on its boundary
    assert all(min(a, c) >= 0.5 and max(a, c) <= 2.5 for a, _, c, _ in segs)


def test_transport_strip_shows_source_target_result_and_mask():
    r = transport_result()
    fig = transport_strip(r)
    images = [t for t in fig.data if t.type == "image"]
    assert [t.hovertemplate.split(":")[0].split("<")[0] for t in images] == [
        "source", "target", "result", "result"]
    assert "source: a yellow circle" in images[0].hovertemplate
    for t, want in zip(images, [r.source[0], r.target[0], r.result[0]]):
        px = _decode(t.source)
        f = px.shape[0] // SIZE
        np.testing.assert_allclose(px[::f, ::f], (want.permute(1, 2, 0).numpy() * 255).round(), atol=1)
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    np.testing.assert_array_equal(np.asarray(heat.z), r.token_mask.numpy().astype(float))
    assert heat.z.shape == GRID
    assert "transformer_blocks.1 [5, 8]" in heat.hovertemplate
    assert "MSE to source inside p 0.001" in fig.layout.title.text
    assert "to target outside p 0" in fig.layout.title.text
    assert any("a yellow circle → a red circle" in a.text for a in fig.layout.annotations)


def test_transport_strip_without_control_rows_has_no_target_column():
    import dataclasses

    r = transport_result()
    r = dataclasses.replace(r, target=None, metrics={k: v for k, v in r.metrics.items() if k != "to_target"})
    fig = transport_strip(r)
    images = [t for t in fig.data if t.type == "image"]
    assert [t.hovertemplate.split(":")[0].split("<")[0] for t in images] == ["source", "result", "result"]
    px = _decode(images[1].source)
    f = px.shape[0] // SIZE
    np.testing.assert_allclose(px[::f, ::f], (r.result[0].permute(1, 2, 0).numpy() * 255).round(), atol=1)
    assert "no untouched target" in fig.layout.title.text
    assert [a.text for a in fig.layout.annotations][:3] == [
        "source", "result (target with source channels)", "token mask p over the result"]


def test_transport_strip_names_one_real_image_as_every_pairs_source():
    import dataclasses

    r = transport_result()
    two = lambda x: torch.cat([x, x])  # noqa: E731
    meta = {k: v for k, v in r.meta.items() if k != "source_prompts"}
    r = dataclasses.replace(r, target=two(r.target), result=two(r.result),
                            meta={**meta, "source_image": {"caption": "a white cross"},
                                  "target_prompts": ["a cat", "a dog"]})
    fig = transport_strip(r)
    rows = [a.text for a in fig.layout.annotations if "→" in (a.text or "")]
    assert rows == ["image a white cross → a cat", "image a white cross → a dog"]
    hovers = [t.hovertemplate for t in fig.data if t.type == "image"]
    sources = [h for h in hovers if h.startswith("source")]
    assert len(sources) == 2 and all("source: image a white cross" in h for h in sources)


def test_mask_viewer_rejects_a_truth_of_the_wrong_shape():
    from massact_nn.errors import MassactError

    r, _ = segmentation_result()
    with pytest.raises(MassactError, match="fits neither"):
        mask_viewer(r, torch.zeros(5, 7, dtype=torch.bool))


def test_disruption_grid_can_show_one_k_at_a_time():
    from massact_nn.viz.probes import disruption_sets_by_k

    from massact_nn.errors import MassactError

    r = disruption_result()
    assert disruption_sets_by_k(r) == {2: ["none", "top_k2", "low_k2", "random0_k2"]}
    fig = disruption_grid(r, sets=["none", "top_k2"])
    assert len([t for t in fig.data if t.type == "image"]) == 2 * 2
    with pytest.raises(MassactError, match="unknown channel set 'top_k9'"):
        disruption_grid(r, sets=["top_k9"])
