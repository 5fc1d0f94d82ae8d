"""Inputs that used to crash late, or pass silently, get one clear error early (or mean what they say)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.generation import GenerationConfig, guidance_meta
from massact_nn.tracing.model import load_model
from massact_nn.tracing.probes.evaluate import EvaluationConfig, evaluate
from massact_nn.tracing.probes.segmentation import SegmentConfig, check_config
from massact_nn.tracing.probes.transport_parts import resolve_token_mask
from massact_nn.tracing.stats import StatsConfig, collect_stats

from massact_nn.errors import MassactError
from massact_nn.stats import ChannelStats

GEN = GenerationConfig(steps=1, seed=0, height=32, width=32)


def _cli_error(capsys, *argv: str) -> str:
    rc = cli(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("massact: error:"), err
    return err


@pytest.fixture(scope="module")
def stats_dir(tiny_flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats")
    collect_stats(tiny_flux, ["a red cat"], StatsConfig(GEN, k=2, progress=False)).save(folder)
    return folder


# -- run folders ----------------------------------------------------------------------------------
def test_a_damaged_statistics_folder_is_one_clear_error(stats_dir, tmp_path):
    import shutil

    def copy(name: str):
        d = tmp_path / name
        shutil.copytree(stats_dir, d)
        return d

    bad_json = copy("bad_json")
    (bad_json / "stats.json").write_text("{not json")
    no_sites = copy("no_sites")
    meta = json.loads((no_sites / "stats.json").read_text())
    del meta["sites"]
    (no_sites / "stats.json").write_text(json.dumps(meta))
    garbage = copy("garbage")
    (garbage / "stats.safetensors").write_bytes(b"\x00" * 64)
    foreign = copy("foreign")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(foreign / "stats.safetensors"))
    for folder, needle in ((bad_json, "cannot read .*stats.json.*JSONDecodeError"),
                           (no_sites, "has no site list"),
                           (garbage, "cannot read tensors from .*stats.safetensors"),
                           (foreign, "lacks abs_mean/transformer_blocks.0")):
        with pytest.raises(MassactError, match=needle):
            ChannelStats.load(folder)
    assert ChannelStats.load(stats_dir).sites  # the intact folder still loads


@pytest.mark.parametrize("command", [["stats", "--prompt", "a"], ["report"]])
def test_an_unwritable_out_is_refused_before_any_work(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    if command[0] == "report":
        err = _cli_error(capsys, "report", str(tmp_path), "--out", str(afile / "r.html"))
        assert "lies under the file" in err
        err = _cli_error(capsys, "report", str(tmp_path), "--out", str(tmp_path))
        assert "is a folder; accepted: the path of the HTML file" in err
    else:
        # A model that does not exist: the check must come first, or this would fail on the model.
        err = _cli_error(capsys, *command, "--model", str(tmp_path / "no-model"), "--out", str(afile))
        assert f"--out {str(afile)!r} is an existing file" in err


def test_out_with_a_tilde_is_written_where_it_was_checked(tiny_flux_dir, tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    code = cli(["stats", "--model", str(tiny_flux_dir), "--prompt", "a cat", "--steps", "1",
                "--height", "32", "--width", "32", "--out", "~/run"])
    assert code == 0 and (home / "run" / "stats.json").is_file()
    assert not (cwd / "~").exists()  # not a literal folder named "~"


def test_file_outputs_and_inputs_are_named_clearly(tmp_path, capsys):
    err = _cli_error(capsys, "toy", "eval", str(tmp_path / "no-toy"), "--json", str(tmp_path))
    assert f"--json {str(tmp_path)!r} is a folder; accepted: the path of a file" in err
    afile = tmp_path / "report.html"
    afile.write_text("x")
    err = _cli_error(capsys, "report", str(afile), "--out", str(tmp_path / "r.html"))
    assert "is a file, not a folder" in err
    err = _cli_error(capsys, "stats", "--prompts-file", str(tmp_path / "none.txt"), "--out",
                     str(tmp_path / "o"))
    assert "does not exist; accepted: a UTF-8 text file, one prompt per line" in err


def test_a_prompts_file_that_is_not_utf8_is_one_clear_error(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"a red cat\n\xff\xfe dog\n")
    err = _cli_error(capsys, "stats", "--prompts-file", str(f), "--out", str(tmp_path / "o"))
    assert "is not UTF-8 text" in err


def test_a_mistyped_local_path_is_not_sent_to_the_hub_as_a_traceback(tmp_path, capsys):
    with pytest.raises(MassactError, match="'tinyflux/typo' is not a local folder, and as a Hub id"):
        load_model("tinyflux/typo")
    err = _cli_error(capsys, "sites", "--model", "tinyflux/typo")
    assert "check the path" in err


def test_heights_and_widths_must_be_positive_integers(tiny_flux):
    for name in ("height", "width"):
        gen = GenerationConfig(steps=1, **{"height": 32, "width": 32, name: 0})
        with pytest.raises(MassactError, match=f"{name}=0 is out of range"):
            collect_stats(tiny_flux, ["a"], StatsConfig(gen, progress=False))
        gen = GenerationConfig(steps=1, **{"height": 32, "width": 32, name: 32.0})
        with pytest.raises(MassactError, match=f"{name}=32.0 is not an integer"):
            collect_stats(tiny_flux, ["a"], StatsConfig(gen, progress=False))
    # numpy and torch integers are integers (an array of sizes, a tensor from a config)
    gen = GenerationConfig(steps=1, height=np.int64(32), width=torch.tensor(32), batch_size=np.int32(2))
    st = collect_stats(tiny_flux, ["a"], StatsConfig(gen, k=2, progress=False))
    assert (st.meta["height"], st.meta["width"]) == (32, 32)
    assert json.loads(json.dumps(st.meta["generation"]))["batch_size"] == 2


def test_runs_from_before_the_ignored_flag_still_merge(tiny_flux):
    a = collect_stats(tiny_flux, ["a red cat"], StatsConfig(GEN, k=2, progress=False))
    b = collect_stats(tiny_flux, ["a dog"], StatsConfig(GEN, k=2, progress=False))
    old = ChannelStats(a.sites, a.tensors, {**a.meta, "guidance_scale_used": 3.5})
    del old.meta["guidance_scale_ignored"]  # as written before the flag existed
    assert old.merge(b).meta["prompts"] == ["a red cat", "a dog"]
    with pytest.raises(MassactError, match="guidance_scale differs"):
        ChannelStats(a.sites, a.tensors, {**old.meta, "guidance_scale": 7.0}).merge(b)


# -- transport inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("ids", ['"12"', "[1.7, 2.2]", "[true]", '{"a": 1}'])
def test_channel_files_take_integer_ids_only(ids, stats_dir, tmp_path, capsys):
    f = tmp_path / "ch.json"
    f.write_text('{"transformer_blocks.0": ' + ids + "}")
    err = _cli_error(capsys, "transport", "--model", str(tmp_path / "no-model"), "--source-prompt", "a",
                     "--target-prompt", "b", "--channels", str(f), "--out", str(tmp_path / "o"))
    assert "with integer ids" in err  # "12" used to become channels [1, 2], 1.7 channel 1


def test_token_masks_are_boolean_or_zero_one(tmp_path):
    grid, pairs = (4, 4), 1
    soft = np.full(grid, 0.1, dtype=np.float32)  # a soft mask: .bool() made every token inside
    np.save(tmp_path / "soft.npy", soft)
    for spec in (tmp_path / "soft.npy", torch.from_numpy(soft), np.full(grid, 255, np.uint8)):
        with pytest.raises(MassactError, match="values other than 0 and 1"):
            resolve_token_mask(spec, grid, pairs)
    from massact_nn.masks import iou

    with pytest.raises(MassactError, match="mask has values other than 0 and 1"):  # metrics too
        iou(torch.full(grid, 0.3), torch.ones(grid, dtype=torch.bool))
    assert iou(torch.ones(grid), torch.ones(grid, dtype=torch.bool)) == 1.0
    half = np.zeros(grid, np.uint8)
    half[:2] = 1
    np.save(tmp_path / "half.npy", half)
    for spec in (tmp_path / "half.npy", half, half.astype(bool), torch.from_numpy(half).float()):
        m = resolve_token_mask(spec, grid, pairs)
        assert m.dtype == torch.bool and m[0].tolist() == half.astype(bool).tolist()


# -- segmentation options of the other source -------------------------------------------------------
def test_options_of_the_other_segmentation_source_are_refused(stats_dir, tmp_path, capsys):
    with pytest.raises(MassactError, match="t given with a prompt, where they do nothing"):
        check_config(SegmentConfig(stats=stats_dir, prompt="a cat", t=0.3))
    with pytest.raises(MassactError, match="caption, posterior given with a prompt"):
        check_config(SegmentConfig(stats=stats_dir, prompt="a cat", caption="x", posterior="sample"))
    with pytest.raises(MassactError, match=r"steps='1' given with a real image"):
        check_config(SegmentConfig(stats=stats_dir, image=torch.zeros(1, 3, 32, 32), caption="x", steps="1"))
    check_config(SegmentConfig(stats=stats_dir, image=torch.zeros(1, 3, 32, 32), caption="x", t=0.2))
    for seed in (-1, 2**32, 1.5, True):  # scikit-learn would refuse them after the generation
        with pytest.raises(MassactError, match=f"kmeans_seed={seed!r} is out of range; accepted"):
            check_config(SegmentConfig(stats=stats_dir, prompt="a cat", kmeans_seed=seed))
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    err = _cli_error(capsys, "segment", "--model", "toy", "--stats", str(stats_dir), "--image", str(img),
                     "--caption", "x", "--num-steps", "3", "--out", str(tmp_path / "o"))
    assert "--num-steps 3 given with --image" in err
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    err = _cli_error(capsys, "segment", "--model", "toy", "--stats", str(stats_dir), "--prompt", "a",
                     "--gt-mask", str(notes), "--out", str(tmp_path / "o"))
    assert "cannot be read as an image" in err


# -- evaluation and the judge -------------------------------------------------------------------------
@pytest.mark.parametrize("bad, needle", [({"pairs": 0}, "pairs=0 is out of range"),
                                         ({"prompts": -1}, "prompts=-1 is out of range"),
                                         ({"transport_ks": []}, r"transport_ks=\[\] is empty"),
                                         ({"ks": [1, 0]}, "ks entry=0 is out of range"),
                                         ({"random_draws": True}, "random_draws=True is not an integer"),
                                         ({"pairs": 2.0}, "pairs=2.0 is not an integer")])
def test_evaluation_counts_are_checked_before_anything_runs(bad, needle, tiny_flux):
    # No statistics at all: the check must come before they are even loaded.
    with pytest.raises(MassactError, match=needle):
        evaluate(tiny_flux, "/no/such/stats", EvaluationConfig(**bad))


def test_the_judge_skips_images_it_cannot_read():
    from massact_nn.tracing.probes.common import judge_readings, judge_scores
    from massact_nn.tracing.toy.export import shipped_path
    from massact_nn.tracing.toy.judge import load_judge

    from massact_nn import world as W

    net = load_judge(shipped_path())
    caps = W.all_captions()[:2]
    assert judge_scores(net, torch.rand(2, 3, 32, 32), caps) is not None
    assert judge_scores(net, torch.rand(2, 3, 48, 48), caps) is None  # used to crash after the run
    assert judge_readings(net, torch.rand(2, 3, 48, 48)) is None


def test_a_named_judge_folder_must_hold_a_judge(tmp_path):
    from massact_nn.tracing.model import toy_path
    from massact_nn.tracing.toy.evaluate import evaluate as toy_eval

    with pytest.raises(MassactError, match="no judge.safetensors in"):
        toy_eval(toy_path(), n=1, judge_folder=tmp_path / "nope", verbose=False)
    assert not (tmp_path / "nope").exists()  # no judge trained and written there


# -- guidance a pipeline ignores ----------------------------------------------------------------------
def test_a_guidance_scale_the_pipeline_ignores_is_recorded_as_unused(tiny_flux):
    from massact_nn.tracing.adapters import flux

    # The tiny FLUX.1 has no guidance embedding (like schnell): FluxPipeline drops the scale.
    runs = [collect_stats(tiny_flux, ["a red cat"], StatsConfig(
        GenerationConfig(steps=1, height=32, width=32, guidance_scale=g), k=2, progress=False))
        for g in (7.0, 1.0)]
    assert [r.meta["guidance_scale_used"] for r in runs] == [None, None]
    assert torch.equal(runs[0].matrix(), runs[1].matrix())
    other_seed = collect_stats(tiny_flux, ["a red cat"], StatsConfig(
        GenerationConfig(steps=1, seed=5, height=32, width=32, guidance_scale=1.0), k=2, progress=False))
    merged = runs[0].merge(other_seed)  # the ignored scales do not block the merge
    assert merged.meta["prompts"] == ["a red cat", "a red cat"] and merged.meta["prompt_seeds"] == [0, 5]
    with pytest.raises(MassactError, match="the shards overlap"):
        runs[0].merge(runs[1])  # the same prompt and seed: one trajectory, not two

    class Dev:  # a FluxPipeline whose transformer embeds the guidance (FLUX.1-dev)
        transformer = types.SimpleNamespace(config=types.SimpleNamespace(guidance_embeds=True))

        def __call__(self, prompt=None, guidance_scale=3.5):
            pass

    assert guidance_meta(Dev(), {}, 1, False, flux.ADAPTER)["guidance_scale_used"] == 3.5
    assert guidance_meta(Dev(), {"guidance_scale": 7.0}, 1, False, flux.ADAPTER)["guidance_scale_used"] == 7.0


def test_a_disruption_at_a_size_the_judge_cannot_read_runs_without_it(tmp_path):
    from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt

    toy = load_model("toy")
    st = collect_stats(toy, ["a red circle on a blue background"],
                       StatsConfig(GenerationConfig(steps=1, height=48, width=48), k=2, progress=False))
    d = disrupt(toy, ["a red circle on a blue background"], st,
                DisruptionConfig(generation=GenerationConfig(steps=1, height=48, width=48), k=[1],
                                 random_draws=1, progress=False))
    assert d.meta["judge"] is False and all("judge" not in r for r in d.metrics["sets"].values())


def test_missing_model_folders_are_named_as_folders_and_long_causes_cut_at_a_word():
    from massact_nn.tracing.llm.model import load_llm
    from massact_nn.tracing.model import hub_error

    with pytest.raises(MassactError, match="model folder '/no/such/folder' does not exist; accepted: minilm"):
        load_llm("/no/such/folder")
    with pytest.raises(MassactError, match="unknown model 'nope'"):  # a bare name is no folder
        load_llm("nope")
    msg = str(hub_error("org/x", OSError("word " * 60)))
    assert "(word word" in msg and "word ...);" in msg and "wor)" not in msg


def test_alpha_k_and_empty_masks_are_refused_with_the_reason():
    from massact_nn.selection import random_k
    from massact_nn.transport import check_alpha

    with pytest.raises(MassactError, match="alpha='0.5' is not a number"):
        check_alpha("0.5")  # float() would take it, the blend arithmetic would not
    assert check_alpha(np.float32(0.25)) == 0.25
    assert random_k(6, np.int64(2), seed=0).numel() == 2  # numpy integers are integers
    with pytest.raises(MassactError, match=r"k \(random draw\)=5 is out of range; accepted: 1..4 "
                                           r"\(the 4 of 6 channels not excluded\)"):
        random_k(6, 5, seed=0, exclude=torch.tensor([0, 1]))
    with pytest.raises(MassactError, match=r"exclude: channel ids \[-1\] out of range"):
        random_k(6, 2, seed=0, exclude=torch.tensor([-1]))  # not "the last channel"
    with pytest.raises(MassactError, match=r"k \(random draw\)=2.0 is not an integer"):
        random_k(6, 2.0, seed=0)


def test_an_empty_token_mask_or_ground_truth_is_refused(
    tiny_flux_dir, tiny_flux, stats_dir, tmp_path, capsys
):
    from massact_nn.tracing.probes.transport import TransportConfig, transport
    from PIL import Image

    none = np.zeros((8, 8), dtype=bool)  # the token grid at 32 px
    with pytest.raises(MassactError, match=r"selects no token for pairs \[0\]"):
        transport(tiny_flux, "a cat", "a dog", stats_dir,
                  TransportConfig(generation=GenerationConfig(steps=1, height=32, width=32),
                                  token_mask=torch.from_numpy(none), judge=False, progress=False))
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 8:24, 3] = 255  # drawn in the alpha channel only: reads as no foreground
    Image.fromarray(rgba, "RGBA").save(tmp_path / "gt.png")
    err = _cli_error(capsys, "segment", "--model", str(tiny_flux_dir), "--stats", str(stats_dir),
                     "--prompt", "a cat", "--gt-mask", str(tmp_path / "gt.png"), "--out",
                     str(tmp_path / "o"))
    assert "has no foreground pixel" in err
