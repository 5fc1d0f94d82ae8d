"""Results read back exactly as written (dict order, dtypes), non-finite disruptions reported as
such, rerun folders without the previous run's images, and the report's metadata summary."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.model import load_model, toy_path
from massact_nn.tracing.probes.disruption import DisruptionConfig, _metrics, disrupt, save_disruption
from massact_nn.tracing.probes.segmentation import SegmentConfig, segment
from massact_nn.tracing.probes.transport import TransportConfig, save_transport, transport
from massact_nn.tracing.stats import StatsConfig, collect_stats
from massact_nn.viz.sections import probe_section

from massact_nn._io import load_json, save_json
from massact_nn.disruption import DisruptionResult
from massact_nn.errors import MassactError
from massact_nn.segmentation_result import SegmentationResult

PROMPT = "a red circle on a blue background"
GEN = GenerationConfig(steps=2, seed=1)
# Layer order, which is not alphabetical (single_ < transformer_, 10 < 2).
SITES = ["transformer_blocks.0", "transformer_blocks.2", "transformer_blocks.10",
         "single_transformer_blocks.0"]


@pytest.fixture(scope="module")
def toy():
    if not (toy_path() / "model_index.json").is_file():
        pytest.skip("the embedded toy model is not shipped in this checkout")
    return load_model("toy")


@pytest.fixture(scope="module")
def stats_dir(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_stats")
    collect_stats(toy, [PROMPT], StatsConfig(generation=GEN, progress=False)).save(folder)
    return folder


# -- 1. non-finite disruptions --------------------------------------------------------------
def test_non_finite_disruption_completes_and_says_so(stats_dir, tmp_path, capsys):
    out = tmp_path / "O"
    rc = cli(["disrupt", "--prompt", PROMPT, "--stats", str(stats_dir), "--num-steps", "2",
              "--mode", "scale", "--alpha", "1e30", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = load_json(out / "metrics.json")
    sets = metrics["sets"]
    assert sets["none"]["mse"] == 0.0 and sets["none"]["psnr"] is None and sets["none"]["non_finite"] == 0
    broken = [n for n in sets if n != "none"]
    assert broken
    for n in broken:  # every disrupted image overflowed: NaN, never a number, and counted
        row = sets[n]
        assert math.isnan(row["mse"]) and math.isnan(row["psnr"]), row
        assert row["non_finite"] == 1
        assert all(math.isnan(v) for v in row["per_image"]["mse"] + row["per_image"]["psnr"])
        assert all(math.isnan(v) for v in (row.get("judge") or {}).values())
    for entry in metrics["summary"]:
        if entry["control"] == "none":
            assert entry["mse"] == 0.0 and entry["psnr"] is None
        else:
            assert math.isnan(entry["mse"]) and math.isnan(entry["psnr"]) and entry["non_finite"] >= 1
    r = DisruptionResult.load(out)  # the written result reads back
    assert r.sets == ["none", *broken] and math.isnan(r.metrics["sets"][broken[0]]["mse"])
    # ... and a person reading the report sees it: magenta tiles (not black), "not finite"
    # captions and table cells, and a sentence naming the sets.
    import base64
    import io

    import numpy as np
    from massact_nn.viz import disruption_grid
    from massact_nn.viz.report import build_report
    from PIL import Image

    fig = disruption_grid(r)
    tiles = [np.asarray(Image.open(io.BytesIO(base64.b64decode(t.source.split(",", 1)[1]))).convert("RGB"))
             for t in fig.data if t.type == "image"]
    assert len(tiles) == len(r.sets)
    assert not (tiles[0] == (255, 0, 255)).all(-1).any()  # the baseline is finite
    for tile in tiles[1:]:
        assert (tile == (255, 0, 255)).all(-1).all()
    captions = [a.text for a in fig.layout.annotations if a.text.startswith("<b>")]  # column titles
    assert len(captions) == len(r.sets)
    assert all("1 image(s) not finite" in c for c in captions if not c.startswith("<b>none</b>"))
    assert sum("MSE not finite" in c for c in captions) == len(broken)
    page = build_report([out], tmp_path / "r.html").read_text()
    assert "Not finite: " + ", ".join(f"{n} (1 image)" for n in broken) in page
    assert '<td class="num">not finite</td>' in page


def test_one_non_finite_image_makes_the_set_mean_nan_not_the_others_mean():
    base = torch.rand(2, 3, 4, 4)
    half = base.clone()
    half[1] = math.nan  # image 1 overflowed, image 0 is untouched
    same = base.clone()
    names = [("none", "none", 0, 0), ("top_k1", "top", 1, 0), ("random0_k1", "random", 1, 0),
             ("random1_k1", "random", 1, 1)]
    images = {"none": base, "top_k1": half, "random0_k1": same, "random1_k1": half}
    m = _metrics(images, names, ["a", "b"], None, DisruptionConfig())
    top = m["sets"]["top_k1"]
    assert math.isnan(top["mse"]) and math.isnan(top["psnr"]) and top["non_finite"] == 1
    assert top["per_image"]["mse"][0] == 0.0 and top["per_image"]["psnr"][0] is None  # identical
    assert math.isnan(top["per_image"]["mse"][1]) and math.isnan(top["per_image"]["psnr"][1])
    assert m["sets"]["random0_k1"]["psnr"] is None and m["sets"]["random0_k1"]["non_finite"] == 0
    summary = {e["control"]: e for e in m["summary"]}
    assert math.isnan(summary["random"]["mse"]) and math.isnan(summary["random"]["psnr"])
    assert summary["random"]["non_finite"] == 1
    assert summary["none"]["mse"] == 0.0 and summary["none"]["psnr"] is None


# -- 2. segmentation results keep their order and dtypes -------------------------------------
def _segmentation(image_dtype: torch.dtype) -> SegmentationResult:
    g = torch.Generator().manual_seed(0)
    mask = lambda: torch.rand(4, 4, generator=g) > 0.5  # noqa: E731
    sets = ["top", "all", "random", "low"]
    sites = ["transformer_blocks.1", "single_transformer_blocks.0"]
    return SegmentationResult(
        aggregated={s: mask() for s in sets},
        per_block={f"{s}/{m}/{st}": mask() for st in (3, 1) for s in sets for m in sites},
        channels={f"{s}/{m}": torch.randint(0, 9, (2,), generator=g) for s in sets for m in sites},
        baselines={"input": mask(), "centre": mask(), "all_foreground": torch.ones(4, 4, dtype=torch.bool)},
        primary="top", image_size=(8, 8), image=torch.rand(3, 8, 8, generator=g).to(image_dtype),
        meta={"model": "m", "channel_sets": sets, "foreground": "border"},
    )


def _same_segmentation(a: SegmentationResult, b: SegmentationResult) -> None:
    for part in ("aggregated", "per_block", "channels", "baselines"):
        x, y = getattr(a, part), getattr(b, part)
        assert list(x) == list(y), part
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (part, k)
    assert a.image.dtype == b.image.dtype and torch.equal(a.image, b.image)
    assert (a.primary, a.image_size, a.meta) == (b.primary, b.image_size, b.meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segmentation_round_trip_keeps_every_order_and_dtype(tmp_path, dtype):
    r = _segmentation(dtype)
    _same_segmentation(r, SegmentationResult.load(r.save(tmp_path)))


def test_segmentation_of_the_toy_reads_back_in_run_order(toy, stats_dir, tmp_path):
    cfg = SegmentConfig(stats=stats_dir, prompt=PROMPT, controls=("all", "random", "low"), sites=[0, 3],
                        steps=[1, 0], generation=GEN)
    r = segment(toy, cfg)
    assert list(r.aggregated) == ["top", "all", "random", "low"]
    _same_segmentation(r, SegmentationResult.load(r.save(tmp_path)))


def test_segmentation_order_that_does_not_match_the_tensors_is_one_clear_error(tmp_path):
    _segmentation(torch.float32).save(tmp_path)
    meta = load_json(tmp_path / "meta.json")
    meta["tensor_order"]["aggregated"].append("bogus")
    save_json(tmp_path / "meta.json", meta)
    with pytest.raises(MassactError, match="'bogus'.*accepted: one of top, all, random, low"):
        SegmentationResult.load(tmp_path)


# -- 3. disruption results keep their site order ----------------------------------------------
def _disruption(sets=("none", "top_k2", "low_k2", "random0_k2"), seed=0) -> DisruptionResult:
    g = torch.Generator().manual_seed(seed)
    images = {s: torch.rand(1, 3, 8, 8, generator=g) for s in sets}
    channels = {s: {} if s == "none" else {m: torch.randint(0, 9, (2,), generator=g) for m in SITES}
                for s in sets}
    return DisruptionResult(images=images, channels=channels, metrics={"sets": {}, "summary": []},
                            meta={"model": "m", "sites": SITES})


def test_disruption_round_trip_keeps_sets_and_sites_in_execution_order(tmp_path):
    r = _disruption()
    back = DisruptionResult.load(save_disruption(r, tmp_path))
    assert back.sets == r.sets and list(back.channels) == list(r.channels)
    for s in r.sets:
        assert list(back.channels[s]) == list(r.channels[s]) == ([] if s == "none" else SITES)
        for m in r.channels[s]:
            assert torch.equal(back.channels[s][m], r.channels[s][m])
    assert back.meta == r.meta


def test_disruption_of_the_toy_reads_back_in_layer_order(toy, stats_dir, tmp_path):
    cfg = DisruptionConfig(generation=GEN, k=2, controls=("top",), progress=False)
    r = disrupt(toy, PROMPT, stats_dir, cfg)
    back = DisruptionResult.load(save_disruption(r, tmp_path))
    assert list(back.channels["top_k2"]) == list(r.channels["top_k2"]) == r.meta["sites"]


# -- 4. a rerun into the same folder --------------------------------------------------------------
def test_rerun_removes_the_previous_runs_set_pngs_only(tmp_path):
    save_disruption(_disruption(("none", "top_k4", "low_k4", "random0_k4", "random1_k4")), tmp_path)
    for user in ("notes.png", "my_low_k4.png", "low_k4.jpg"):
        (tmp_path / user).write_bytes(b"mine")
    assert (tmp_path / "low_k4.png").is_file() and (tmp_path / "random1_k4.png").is_file()
    save_disruption(_disruption(("none", "top_k4", "random0_k4"), seed=1), tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["grid.png", "my_low_k4.png", "none.png", "notes.png", "random0_k4.png", "top_k4.png"]
    assert (tmp_path / "low_k4.jpg").read_bytes() == b"mine"
    assert DisruptionResult.load(tmp_path).sets == ["none", "top_k4", "random0_k4"]


def test_rerun_leaves_other_kinds_and_paths_out_of_the_folder_alone(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "source.png").write_bytes(b"mine")
    save_json(run / "meta.json", {"kind": "transport", "set_order": ["source"]})
    save_disruption(_disruption(("none", "top_k2")), run)
    assert (run / "source.png").read_bytes() == b"mine"  # another kind's list names no set of ours
    meta = load_json(run / "meta.json")
    meta["set_order"] += ["../outside", str(outside.with_suffix(""))]
    save_json(run / "meta.json", meta)
    save_disruption(_disruption(("none",)), run)
    assert outside.read_bytes() == b"mine" and not (run / "top_k2.png").exists()


# -- 5. the report's metadata summary shows the probes' own keys ----------------------------------
def _summary_keys(folder) -> list[str]:
    meta = load_json(folder / "meta.json")
    _, parts = probe_section(folder, meta, "a")
    text = "".join(parts)
    assert "could not read" not in text
    table = text[text.index("Run metadata"):text.index("<details>", text.index("Run metadata"))]
    return re.findall(r"<td>([a-z_]+)</td>", table)


def test_report_summary_shows_transport_and_segmentation_keys(toy, stats_dir, tmp_path):
    t = transport(toy, PROMPT, "a green square on a white background", stats_dir,
                  TransportConfig(generation=GEN, k=2, progress=False))
    assert {"source_prompts", "target_prompts", "token_mask"} <= set(t.meta)
    keys = _summary_keys(save_transport(t, tmp_path / "transport"))
    assert {"source_prompts", "target_prompts", "token_mask"} <= set(keys), keys
    s = segment(toy, SegmentConfig(stats=stats_dir, prompt=PROMPT, foreground="minority", generation=GEN))
    assert {"foreground", "aggregation", "channel_sets"} <= set(s.meta)
    keys = _summary_keys(s.save(tmp_path / "segment"))
    assert {"foreground", "aggregation", "channel_sets"} <= set(keys), keys
    text = json.dumps(s.meta)
    assert "foreground_rule" not in text and "source_prompt\"" not in json.dumps(t.meta)
