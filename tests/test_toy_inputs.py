"""The toy's refusals: bad budgets, run folders, resume settings, export targets, judge inputs.

Every refusal is a one-line :class:`MassactError` raised before any work; the training tests
use a fake clock (1 s per ``time.time`` call) so that step counts are reproducible and a run
takes a few steps.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _toy_config import TINY
from diffusers import FluxPipeline, FluxTransformer2DModel
from massact_nn.tracing.cli.main import main
from massact_nn.tracing.toy import build
from massact_nn.tracing.toy import evaluate as E
from massact_nn.tracing.toy import export as X
from massact_nn.tracing.toy import judge as J
from massact_nn.tracing.toy import train as T

from massact_nn import world as W
from massact_nn.errors import MassactError

KW = {
    "progress": False,
    "vae_seconds": 2.0,
    "batch_size": 4,
    "log_every": 2,
    "warmup_steps": 2,
    "checkpoint_minutes": 100.0,
    "transformer_overrides": TINY,
}
STEPS = 4  # the fixture run's budget in (fake) seconds, one step each


def _fake_clock(mp: pytest.MonkeyPatch) -> None:
    clock = itertools.count()
    mp.setattr(T.time, "time", lambda: float(next(clock)))  # the time module, as in build


@pytest.fixture
def no_work(monkeypatch):
    """Fail at once if a refused call starts building, training or loading anything."""

    def boom(*_a, **_k):
        raise AssertionError("work started before the inputs were checked")

    for mod, name in ((build, "build_base"), (J, "train_judge"), (E, "load_judge"),
                      (E, "load_pipeline")):
        monkeypatch.setattr(mod, name, boom)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toyinputs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _fake_clock(mp)
        T.train(out, minutes=STEPS / 60, seed=0, resume=False, **KW)
    return out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("massact: error: "), err
    return err[0]


# -- 1. a new run never shares a folder with an old one; resume needs the whole run --------------
@pytest.mark.parametrize("held", [["state.pt"], ["pipeline"], ["state.pt", "pipeline"]])
def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, no_work, held):
    out = tmp_path / "run"
    (out / "pipeline").mkdir(parents=True) if "pipeline" in held else out.mkdir()
    if "state.pt" in held:
        (out / "state.pt").write_bytes(b"another run")
    with pytest.raises(MassactError, match=r"already holds a toy run.*--resume.*new or empty folder"):
        T.train(out, minutes=1.0, resume=False, **KW)
    if "state.pt" in held:
        assert (out / "state.pt").read_bytes() == b"another run"


def test_cli_new_run_into_a_finished_run_is_refused_and_keeps_its_state(
    run_copy, no_work, capsys
):
    before = (run_copy / T.STATE_FILE).read_bytes()
    assert main(["toy", "train", "--minutes", "1", "--out", str(run_copy), "--seed", "1"]) == 2
    line = _one_line_error(capsys)
    assert "already holds a toy run" in line and "--resume" in line
    assert (run_copy / T.STATE_FILE).read_bytes() == before


def test_resume_refuses_a_state_without_its_pipeline(run_copy, no_work):
    shutil.rmtree(run_copy / T.PIPELINE_DIR)
    before = (run_copy / T.STATE_FILE).read_bytes()
    with pytest.raises(MassactError, match=r"holds state.pt but no pipeline/.*cannot be resumed"):
        T.train(run_copy, minutes=1.0, resume=True, **KW)
    assert (run_copy / T.STATE_FILE).read_bytes() == before


# -- 2. a resume keeps the run's configuration ---------------------------------------------------
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"seed": 7}, r"seed: saved 0, requested 7"),
        ({"batch_size": 2}, r"batch_size: saved 4, requested 2"),
        ({"transformer_overrides": {**TINY, "num_layers": 2}},
         r"transformer_overrides\['num_layers'\]: saved 1, requested 2"),
        ({"lr": 5e-4}, r"lr: saved 0.001, requested 0.0005"),
    ],
)
def test_resume_with_another_configuration_is_refused(run_copy, monkeypatch, change, needle):
    _fake_clock(monkeypatch)
    before = torch.load(run_copy / T.STATE_FILE, weights_only=False)
    kw = {**KW, "seed": 0, **change}
    with pytest.raises(MassactError, match=needle):
        T.train(run_copy, minutes=(STEPS + 2) / 60, resume=True, **kw)
    after = torch.load(run_copy / T.STATE_FILE, weights_only=False)
    assert after["step"] == before["step"] == STEPS
    assert after["config"] == before["config"]  # never a config the model was not trained with
    layers = {k.split(".")[1] for k in after["model"] if k.startswith("transformer_blocks.")}
    assert len(layers) == after["config"]["transformer_overrides"]["num_layers"] == 1


# -- 9. a kill during the checkpoint swap does not break the run ---------------------------------
def test_resume_restores_the_transformer_a_killed_checkpoint_swap_left_as_old(run_copy, monkeypatch):
    pipe_dir = run_copy / T.PIPELINE_DIR
    ema = FluxTransformer2DModel.from_pretrained(pipe_dir / "transformer")
    real_replace = os.replace

    def killed(src, dst):  # the kill lands between moving the old folder out and the new one in
        if Path(src).name == "transformer.tmp":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            T._write_transformer(ema, run_copy)
    assert not (pipe_dir / "transformer").exists() and (pipe_dir / "transformer.old").is_dir()

    _fake_clock(monkeypatch)
    summary = T.train(run_copy, minutes=(STEPS + 2) / 60, seed=0, resume=True, **KW)
    assert summary["steps"] == STEPS + 2
    assert f"resume at step {STEPS} " in (run_copy / "train.log").read_text()
    assert sorted(p.name for p in pipe_dir.glob("transformer*")) == ["transformer"]
    FluxPipeline.from_pretrained(pipe_dir, local_files_only=True)  # loads again
    state = torch.load(run_copy / T.STATE_FILE, weights_only=False)
    assert state["step"] == STEPS + 2
    assert state["config"]["transformer_overrides"]["num_layers"] == 1


# -- 7. the training budget ----------------------------------------------------------------------
@pytest.mark.parametrize("minutes", [0, -1, float("nan"), float("inf"), "ten"])
def test_train_refuses_a_budget_that_is_not_a_finite_positive_number(tmp_path, no_work, minutes):
    with pytest.raises(MassactError, match=r"minutes=.*accepted: a finite number of minutes > 0"):
        T.train(tmp_path / "run", minutes=minutes, **KW)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("minutes", ["nan", "inf", "-inf", "0", "-1"])
def test_cli_train_refuses_a_budget_that_is_not_a_finite_positive_number(
    tmp_path, no_work, capsys, minutes
):
    assert main(["toy", "train", f"--minutes={minutes}", "--out", str(tmp_path / "run")]) == 2
    line = _one_line_error(capsys)
    assert f"--minutes={float(minutes)!r}" in line and "finite number of minutes > 0" in line
    assert not (tmp_path / "run").exists()


# -- 6. eval's prompt count and guidance scale ---------------------------------------------------
@pytest.fixture
def fake_pipeline(tmp_path):
    """A folder that passes for a toy pipeline until its weights are read (they never are)."""
    folder = tmp_path / "pipe"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    build.write_defaults(folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--n", "0"], "--n=0 is out of range; accepted: an integer >= 1"),
        (["--n", "-2"], "--n=-2 is out of range; accepted: an integer >= 1"),
        (["--cfg", "0"], "--cfg=0.0 is out of range; accepted: a finite number >= 1"),
        (["--cfg", "0.5"], "--cfg=0.5 is out of range; accepted: a finite number >= 1"),
        (["--cfg", "nan"], "--cfg=nan is out of range; accepted: a finite number >= 1"),
        (["--cfg", "inf"], "--cfg=inf is out of range; accepted: a finite number >= 1"),
    ],
)
def test_cli_eval_refuses_a_bad_prompt_count_or_cfg_scale(fake_pipeline, no_work, capsys, args, needle):
    assert main(["toy", "eval", str(fake_pipeline), *args]) == 2
    assert needle in _one_line_error(capsys)


@pytest.mark.parametrize(("kw", "needle"), [({"n": 0}, r"n=0 is out"), ({"n": 2.5}, r"n=2.5 is not"),
                                            ({"cfg_scale": float("nan")}, r"cfg_scale=nan is out"),
                                            ({"cfg_scale": 0.0}, r"cfg_scale=0.0 is out")])
def test_evaluate_and_generate_refuse_a_bad_prompt_count_or_cfg_scale(fake_pipeline, no_work, kw, needle):
    with pytest.raises(MassactError, match=needle):
        E.evaluate(fake_pipeline, **{"n": 1, **kw}, verbose=False)
    if "cfg_scale" in kw:  # generate would silently run without guidance
        with pytest.raises(MassactError, match=needle):
            E.generate(None, ["a red circle on a blue background"], [0], cfg_scale=kw["cfg_scale"])


# -- 5. what the judge reads ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return J.JudgeNet(width=4).eval()


def test_judge_reads_every_accepted_form_alike_and_refuses_integer_images(net):
    from PIL import Image

    images = W.World(0).sample(4, seed=5).images  # float32 [4, 3, 32, 32] in [-1, 1]
    hwc = (images.transpose(0, 2, 3, 1) + 1) / 2  # output_type="np"
    u8 = np.round(hwc * 255).astype(np.uint8)
    ref = J.judge(images, net)
    for same in (torch.from_numpy(images), hwc, [Image.fromarray(x) for x in u8]):
        got = J.judge(same, net)
        assert all((got[k] == ref[k]).all() for k in J.ATTRIBUTES)
    for bad in (u8, u8.transpose(0, 3, 1, 2), torch.from_numpy(u8.transpose(0, 3, 1, 2).copy())):
        with pytest.raises(MassactError, match=r"dtype (torch\.)?uint8: not floating point.*"
                                               r"accepted: float \[B, 3, 32, 32\] in \[-1, 1\]"):
            J.judge(bad, net)


@pytest.mark.parametrize(
    ("images", "needle"),
    [
        (np.zeros((3, 32, 32), np.float32), r"shape \[3, 32, 32\], dtype float32: not a batch"),
        (np.zeros((2, 3, 64, 64), np.float32), r"shape \[2, 3, 64, 64\], dtype float32;"),
        (torch.zeros(2, 3, 16, 16), r"shape \[2, 3, 16, 16\], dtype torch.float32;"),
        (torch.zeros(2, 1, 32, 32), r"shape \[2, 1, 32, 32\]"),
        (np.zeros((0, 3, 32, 32), np.float32), r"shape \[0, 3, 32, 32\]"),
        ([], r"empty list"),
    ],
)
def test_judge_names_the_shape_it_cannot_read(net, images, needle):
    with pytest.raises(MassactError, match=needle + r".*accepted: float \[B, 3, 32, 32\] in \[-1, 1\]"):
        J.score(images, W.all_captions()[:2], net)


def test_score_refuses_a_target_count_that_differs_from_the_image_count(net):
    images = W.World(0).sample(4, seed=5).images
    with pytest.raises(MassactError, match=r"4 images but targets of shapes"):
        J.score(images, W.all_captions()[:3], net)


# -- 3, 4, 8. export: a named judge, the target folder -------------------------------------------
@pytest.fixture
def judge_dir(tmp_path, net):
    J.save_judge(net, tmp_path / "judge")
    return tmp_path / "judge"


def test_export_with_a_named_judge_folder_that_holds_none_trains_no_judge(
    fake_pipeline, tmp_path, no_work, capsys
):
    dest = tmp_path / "dest"
    with pytest.raises(MassactError, match=r"no judge in .*nonexistent.*accepted: a folder with"):
        X.export(fake_pipeline, dest=dest, judge_folder=tmp_path / "nonexistent")
    args = ["toy", "export", str(fake_pipeline), "--dest", str(dest), "--eval-n", "0"]
    assert main([*args, "--judge", str(tmp_path / "nonexistent")]) == 2
    assert "no judge in" in _one_line_error(capsys)
    assert not dest.exists() and not (tmp_path / "nonexistent").exists()
    assert not list(tmp_path.glob("*.export-tmp"))


def test_export_replaces_a_previous_export_but_refuses_a_folder_holding_other_files(
    fake_pipeline, judge_dir, tmp_path, capsys
):
    dest = tmp_path / "dest"
    X.export(fake_pipeline, dest=dest, judge_folder=judge_dir)
    (dest / "stale.txt").write_text("from the previous export")
    X.export(fake_pipeline, dest=dest, judge_folder=judge_dir)  # a previous export: replaced
    assert not (dest / "stale.txt").exists() and (dest / "model_index.json").is_file()
    assert (dest / "judge.safetensors").is_file()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MassactError, match=r"'.*mine' is not empty and holds no toy export"):
        X.export(fake_pipeline, dest=mine, judge_folder=judge_dir)
    assert main(["toy", "export", str(fake_pipeline), "--dest", str(mine), "--judge", str(judge_dir),
                 "--eval-n", "0"]) == 2
    assert "holds no toy export" in _one_line_error(capsys)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    with pytest.raises(SystemExit):
        main(["toy", "export", "--help"])
    assert "replaced" in " ".join(capsys.readouterr().out.split())


def test_export_dest_dot_is_resolved_and_the_current_folder_is_refused(
    fake_pipeline, judge_dir, tmp_path, monkeypatch, capsys
):
    cwd = tmp_path / "here"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for dest in (".", "sub/..", "./"):
        with pytest.raises(MassactError, match=rf"dest '{dest}' \('{cwd}'\) is the current folder"):
            X.export(fake_pipeline, dest=dest, judge_folder=judge_dir)
    assert main(["toy", "export", str(fake_pipeline), "--dest", ".", "--judge", str(judge_dir),
                 "--eval-n", "0"]) == 2
    line = _one_line_error(capsys)
    assert "current folder" in line and "empty name" not in line
    res = X.export(fake_pipeline, dest="./out", judge_folder=judge_dir)
    assert res["dest"] == str(cwd / "out") and (cwd / "out" / "model_index.json").is_file()
    assert json.loads((cwd / "out" / build.DEFAULTS_FILE).read_text())["call"]["height"] == W.SIZE
