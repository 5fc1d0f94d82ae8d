"""``massact demo``: every probe of this build runs end to end on a tiny Flux, and the report draws.

The demo's default model is the embedded toy; these tests use a tiny random ``build_flux`` folder
so they do not depend on it (one more runs on the toy once it is shipped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from massact_nn.tracing.cli.main import main
from massact_nn.tracing.model import toy_path
from massact_nn.viz.browser import check_in_browser, find_chromium

PROBES = ("disrupt", "segment", "segment_world", "transport")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    from massact_nn.tracing.testing.tiny import build_flux

    root = tmp_path_factory.mktemp("demo")
    model = build_flux(root / "tiny", plant=(5, 50.0))
    out = root / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--model", str(model), "--steps", "3", "--height", "32", "--width", "32",
                   "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_demo_runs_every_probe_and_prints_the_report(demo):
    out, stdout = demo
    report = out / "report.html"
    assert stdout.strip().splitlines()[-1] == str(report) and report.is_file()
    log = json.loads((out / "demo.json").read_text())
    assert (out / "stats" / "stats.json").is_file()
    for folder in PROBES:
        assert (out / folder / "meta.json").is_file(), folder
        assert str(out / folder) in log["folders"]
    assert log["skipped"] == []
    # The planted channel is what the statistics found, and the report says so.
    stats = json.loads((out / "stats" / "stats.json").read_text())
    assert all(site["top"][0] == 5 for site in stats["sites"])
    text = report.read_text()
    assert "Statistics · stats" in text
    for heading, folder in (("Disruption", "disrupt"), ("Segmentation", "segment"),
                            ("Segmentation", "segment_world"), ("Transport", "transport")):
        assert f"{heading} · {folder}<" in text


def test_demo_world_segmentation_is_scored_against_the_true_mask(demo):
    import numpy as np

    from massact_nn import world
    from massact_nn.masks import iou, load_png_mask, upsample_nearest
    from massact_nn.segmentation_result import SegmentationResult

    out, _ = demo
    metrics = json.loads((out / "segment_world" / "metrics.json").read_text())
    assert set(metrics["iou"]) >= {"top", "all", "random", "low"}
    # The truth is the world image's own mask (seed 0), and each IoU is measured against it.
    sample = world.World(seed=0).sample(1, seed=0)
    truth = load_png_mask(out / "segment_world" / "gt_mask.png")
    assert np.array_equal(truth.numpy(), sample.masks[0])
    r = SegmentationResult.load(out / "segment_world")
    assert r.meta["caption"] == sample.captions[0]
    for name, value in metrics["iou"].items():
        assert value == pytest.approx(iou(upsample_nearest(r.set_mask(name), *truth.shape), truth)), name


def test_demo_probes_ran_with_the_requested_settings(demo):
    import torch
    from massact_nn.tracing.cli.demo import STATS_PROMPTS, TRANSPORT_SOURCE, TRANSPORT_TARGET

    from massact_nn.disruption import DisruptionResult
    from massact_nn.transport import TransportResult

    out, _ = demo
    d = DisruptionResult.load(out / "disrupt")
    assert d.meta["k"] == [4] and d.meta["prompts"] == list(STATS_PROMPTS[:4])
    assert d.sets == ["none", "top_k4", "low_k4", "random0_k4", "random1_k4"]
    s = d.metrics["sets"]
    # The planted channel 5 is in the top set: removing it matters far more than the controls.
    assert all(5 in ch.tolist() for ch in d.channels["top_k4"].values())
    assert s["top_k4"]["mse"] > 10 * max(s[c]["mse"] for c in ("low_k4", "random0_k4", "random1_k4"))
    t = TransportResult.load(out / "transport")
    assert t.meta["source_prompts"] == [TRANSPORT_SOURCE] and t.meta["target_prompts"] == [TRANSPORT_TARGET]
    assert t.meta["token_mask"] == "union" and 0 < float(t.token_mask.float().mean()) < 1
    assert not torch.equal(t.result, t.target) and not torch.equal(t.source, t.target)


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (CI installs Debian's "
                    "`chromium`; `apt-get install chromium`)")
def test_demo_report_draws_in_a_browser(demo, tmp_path):
    out, _ = demo
    text = (out / "report.html").read_text()
    n = text.count('class="plotly-graph-div"')
    keep = os.environ.get("MASSACT_SCREENSHOTS")  # kept there (e.g. a CI artifact), else tmp
    shot = (Path(keep) if keep else tmp_path) / "demo.png"
    seen = check_in_browser(out / "report.html", screenshot=shot)
    assert seen.errors == []
    assert n >= 3 and seen.figures == n and seen.drawn == n
    assert seen.screenshot is not None and seen.screenshot.stat().st_size > 10_000


def test_demo_without_the_toy_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import massact_nn.tracing.model as model

    monkeypatch.setattr(model, "toy_path", lambda: tmp_path / "no-toy-here")
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "default model is not available yet" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (toy_path() / "model_index.json").is_file(),
                    reason="the embedded toy is not shipped yet (massact_nn/assets/toy)")
def test_demo_on_the_toy(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()


def test_a_skipped_world_segmentation_removes_an_older_runs_folder(tiny_flux, tmp_path):
    from massact_nn.tracing.cli.demo import _segment_world, _Unavailable
    from massact_nn.tracing.generation import GenerationConfig

    from massact_nn import world

    old = tmp_path / "segment_world"
    old.mkdir()
    (old / "meta.json").write_text("{}")  # an earlier demo here at the world's size
    size = 2 * world.SIZE
    ctx = {"model": tiny_flux, "gen": GenerationConfig(steps=1, height=size, width=size), "out": tmp_path}
    with pytest.raises(_Unavailable, match="world images are"):
        _segment_world(ctx)
    assert not old.exists()  # the report would otherwise show the stale run
