"""The HTML report: self-contained, one plotly.js, every run's figures and metadata, and a page
that really draws in a browser (headless Chromium; skipped with a reason where it is missing)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from _viz_fixtures import disruption_result, segmentation_result, synthetic_stats, transport_result
from massact_nn.tracing.cli.main import main
from massact_nn.viz import build_report, find_runs
from massact_nn.viz.browser import check_in_browser, find_chromium

from massact_nn.errors import MassactError
from massact_nn.masks import iou, load_png_mask, save_png_mask, upsample_nearest

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="no chromium on PATH (CI installs Debian's `chromium`; `apt-get install chromium`)",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    synthetic_stats(model="/models/dit-a").save(root / "stats_a")
    synthetic_stats(n_sites=5, seed=1, per_step=False, model="/models/llm-b").save(root / "stats_b")
    disruption_result().save(root / "disrupt")
    seg, truth = segmentation_result()
    seg.save(root / "segment")
    save_png_mask(root / "segment" / "gt_mask.png", truth)
    transport_result().save(root / "transport")
    llm_run().save(root / "stats_c_llm")
    return root


def llm_run():
    """A language-model run: its channel statistics plus the largest single entries by token."""
    from massact_nn.llm_stats import LLMStats, TokenPositions

    layers = [{"layer": i, "module": f"transformer_blocks.{i}", "median_abs": 0.5,
               "top_abs": [10.0 * (i + 1), 3.0, 2.0], "ratio_top1_median": 20.0 * (i + 1),
               "top": [{"prompt": 0, "token": 0, "token_text": "<bos>", "last": False,
                        "channel": 7, "value": -10.0 * (i + 1), "ratio_median": 20.0 * (i + 1)}]}
              for i in range(3)]
    return LLMStats(channels=synthetic_stats(seed=2, per_step=False, model="/models/llm-c"),
                    positions=TokenPositions(layers=layers, tokens=[["<bos>", "the", "cat"]]))


# figures: 3 stats runs -> a comparison; stats_a: profile, heatmap, per-step; stats_b: 2;
# stats_c_llm: 2 + the token extremes; disruption: grid + bars; segmentation: overview +
# per-block viewer; transport: strip.
N_FIGURES = 1 + 3 + 2 + 3 + 2 + 2 + 1


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return build_report([runs], tmp_path_factory.mktemp("report") / "report.html")


def test_runs_are_found_in_reading_order(runs):
    kinds = [r.path.name for r in find_runs([runs])]
    assert kinds == ["stats_a", "stats_b", "stats_c_llm", "disrupt", "segment", "transport"]


def test_report_is_self_contained_with_plotly_once(report):
    text = report.read_text()
    assert text.count("plotly.js v") <= 2  # the library's own banner, inlined once
    big = [s for s in re.findall(r"<script[^>]*>(.*?)</script>", text, re.S) if len(s) > 1_000_000]
    assert len(big) == 1
    page = text.replace(big[0], "")
    # Nothing is fetched: no external scripts, styles or images outside the inlined library.
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|<img[^>]+src=\"(?!data:)", page)
    assert "cdn.plot.ly" not in page
    assert text.count('class="plotly-graph-div"') == N_FIGURES
    assert report.stat().st_mode & 0o044 == 0o044  # readable by others, not mkstemp's 0600
    assert not [p for p in report.parent.iterdir() if p.name.endswith(".tmp")]


def test_report_carries_metadata_tables_and_images(report):
    text = report.read_text()
    for heading in ("Statistics · stats_a", "Statistics · stats_b", "Disruption · disrupt",
                    "Segmentation · segment", "Transport · transport", "Profiles compared"):
        assert heading in text
    for meta in ("/models/dit-a", "/models/llm-b", "a red circle on blue", "a yellow circle"):
        assert meta in text
    assert "ratio_top1_median" in text and "jaccard_prompts" in text  # per-site table
    # One row per site in each run's per-site table (stats_a: 3 sites, stats_b: 5).
    for run, n in (("stats_a", 3), ("stats_b", 5)):
        part = _section(text, f"Statistics · {run}")
        table = part[part.index("Per-site summary"):]
        table = table[:table.index("</table>")]
        assert table.count("<tr>") == 1 + n, run
        for i in range(n):
            assert f"<td>transformer_blocks.{i}</td>" in table
    # The IoU shown is the top set's against the true mask saved next to the run.
    seg, truth = segmentation_result()
    want = iou(upsample_nearest(seg.set_mask("top"), *truth.shape), truth)
    assert f"IoU {want:.4g}" in _section(text, "Segmentation · segment")
    # The language-model run adds its largest entries by token.
    llm = _section(text, "Statistics · stats_c_llm")
    assert "Largest activations by token" in llm and "&lt;bos&gt;" in llm
    assert "<b>green</b>" not in text.replace("&lt;b&gt;", "")  # prompts are escaped
    assert "data:image/png;base64," in text


def _section(text: str, heading: str) -> str:
    """The report's HTML from ``heading`` to the next second-level heading."""
    start = text.index(f">{heading}</h2>")  # the heading itself, not the table of contents
    end = text.find("<h2", start)
    return text[start:end if end > 0 else None]


def test_cli_report_writes_and_bad_folders_fail_in_one_line(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(runs / "stats_a"), str(runs / "transport"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and out.is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MassactError, match="no results in"):
        build_report([empty], tmp_path / "x.html")


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where a screenshot goes: ``$MASSACT_SCREENSHOTS`` (kept, e.g. as a CI artifact) or tmp."""
    keep = os.environ.get("MASSACT_SCREENSHOTS")
    return (Path(keep) if keep else tmp_path) / name


@needs_chromium
def test_report_draws_every_figure_without_js_errors(report, tmp_path):
    shot = screenshot_path(tmp_path, "report.png")
    seen = check_in_browser(report, screenshot=shot)
    assert seen.errors == []
    assert seen.figures == N_FIGURES and seen.drawn == N_FIGURES
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1400, 4000)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page


@needs_chromium
def test_a_full_page_screenshot_reaches_the_end_of_the_report(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "full.png"
    seen = check_in_browser(report, screenshot=shot, window=(1400, None))
    img = Image.open(shot).convert("L")
    assert seen.errors == [] and img.size[0] == 1400
    # The page's last row of ink lies inside the picture, with white below it: the whole page.
    import numpy as np

    ink = np.nonzero(np.asarray(img).min(1) < 250)[0]
    assert ink.size and ink[-1] < img.size[1] - 50
    # A page of our own making records its height; another page falls back to the default.
    other = tmp_path / "plain.html"
    other.write_text("<html><body><p>hello</p></body></html>")
    check_in_browser(other, screenshot=tmp_path / "plain.png", window=(800, None))
    assert Image.open(tmp_path / "plain.png").size == (800, 4000)


@needs_chromium
def test_browser_check_catches_errors_and_undrawn_figures(report, tmp_path):
    broken = tmp_path / "broken.html"
    text = report.read_text()
    # Break the first figure's data and add an uncaught error after load.
    text = text.replace("Plotly.newPlot(", "Plotly.newPlot(undefinedVariable, ", 1)
    text = text.replace("</body>", "<script>null.boom();</script></body>")
    broken.write_text(text)
    seen = check_in_browser(broken)
    assert any("undefinedVariable" in e for e in seen.errors)
    assert any("boom" in e or "null" in e for e in seen.errors)
    assert seen.drawn == seen.figures - 1


def test_metrics_tables_pivot_same_keyed_metrics_and_judge_records():
    from massact_nn.viz.html import metrics_tables

    m = {"token_fraction": 0.25,
         "to_source": {"inside": 0.1, "outside": 0.5, "per_pair": {"inside": [0.1]}},
         "to_target": {"inside": 0.4, "outside": 0.0},
         "moved": {"fg_colour": 1.0}, "kept": {"bg_colour": 1.0},
         "already": {"fg_colour": 0.0, "bg_colour": 0.0},
         "judge": {"source": [{"fg_colour": "yellow"}], "result": [{"fg_colour": "red"}]}}
    html = metrics_tables(m)
    heads = re.findall(r"<thead>(.*?)</thead>", html)
    assert heads[0] == "<tr><th></th><th>to_source</th><th>to_target</th></tr>"
    assert sorted(re.findall(r"<th>(\w*)</th>", heads[1])) == ["", "already", "kept", "moved"]
    assert heads[2] == "<tr><th>judge</th><th>fg_colour</th></tr>"
    assert "<td>source</td><td>yellow</td>" in html and "<td>result</td><td>red</td>" in html
    assert "to_source.per_pair.inside" in html and "token_fraction" in html


def test_unreadable_folders_get_a_section_saying_why_not_a_crash(runs, tmp_path, capsys):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs / "stats_a", root / "stats_a")
    shutil.copytree(runs / "stats_b", root / "stats_half_written")
    (root / "stats_half_written" / "stats.json").write_text('{"model": "m", "sites": [')
    shutil.copytree(runs / "transport", root / "transport_bad")
    (root / "transport_bad" / "result.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(runs / "disrupt", root / "disrupt_list_metrics")
    (root / "disrupt_list_metrics" / "metrics.json").write_text("[1, 2]")
    out = build_report([root], tmp_path / "r.html")
    text = out.read_text()
    for name in ("stats_half_written", "transport_bad", "disrupt_list_metrics"):
        part = _section(text, next(h for h in re.findall(r">([^<>]*)</h2>", text) if name in h))
        assert "could not read this folder" in part or "could not be read" in part, name
    assert "Statistics · stats_a" in text  # the readable run is still there
    assert main(["report", str(root), "--out", str(tmp_path)]) == 2  # a folder is no HTML file
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a folder" in err


def test_the_iou_shown_uses_the_mask_the_run_was_scored_against(runs, tmp_path):
    import json
    import shutil

    import torch

    seg = tmp_path / "segment"
    shutil.copytree(runs / "segment", seg)
    truth = load_png_mask(seg / "gt_mask.png")
    other = tmp_path / "new_truth.png"
    save_png_mask(other, ~truth)  # the run was re-scored against another mask
    metrics = json.loads((seg / "metrics.json").read_text()) if (seg / "metrics.json").is_file() else {}
    (seg / "metrics.json").write_text(json.dumps({**metrics, "gt_mask": str(other)}))
    r, _ = segmentation_result()
    want = iou(upsample_nearest(r.set_mask("top"), *truth.shape), ~truth)
    assert not torch.equal(truth, ~truth)
    text = build_report([seg], tmp_path / "r.html").read_text()
    assert f"IoU {want:.4g}" in _section(text, "Segmentation · segment")
