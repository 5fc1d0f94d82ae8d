"""The embedded toy Flux: training mechanics, inference conventions, shipped weights, CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _toy_config import TINY
from diffusers import FluxPipeline
from massact_nn.tracing.toy import build
from massact_nn.tracing.toy import train as T
from massact_nn.tracing.toy.evaluate import activation_summary, eval_prompts, generate
from massact_nn.tracing.toy.export import MAX_BYTES, folder_bytes, is_shipped, shipped_path
from massact_nn.tracing.toy.judge import load_judge, score

from massact_nn import world as W

TINY_RUN = {
    "progress": False,
    "vae_seconds": 2.0,
    "batch_size": 8,
    "log_every": 5,
    "warmup_steps": 5,
    "checkpoint_minutes": 100.0,
    "transformer_overrides": TINY,
}

needs_weights = pytest.mark.skipif(
    not is_shipped(), reason="toy weights not shipped yet (massact_nn/assets/toy is missing)"
)


def _losses(log_text: str) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+ loss ([0-9.]+)", log_text)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toyrun")
    summary = T.train(out, minutes=0.15, seed=0, **TINY_RUN)
    return out, summary


def test_training_from_scratch_lowers_a_finite_loss(tiny_run):
    out, summary = tiny_run
    losses = _losses((out / "train.log").read_text())
    assert len(losses) >= 3
    assert all(np.isfinite(losses))
    assert np.isfinite(summary["loss"])
    assert losses[-1] < losses[0]


def test_checkpoint_resumes_at_the_saved_step(tiny_run):
    out, summary = tiny_run
    state = torch.load(out / T.STATE_FILE, weights_only=False)
    assert state["step"] == summary["steps"] > 0
    assert state["elapsed"] == pytest.approx(summary["elapsed"])
    resumed = T.train(out, minutes=0.2, seed=0, **TINY_RUN)
    log = (out / "train.log").read_text()
    assert f"resume at step {summary['steps']} " in log
    assert resumed["steps"] > summary["steps"]
    assert resumed["elapsed"] >= 0.2 * 60


def test_lr_schedule_warms_up_holds_and_cools_down_to_zero():
    cfg = T.TrainConfig(minutes=10.0, warmup_steps=10, cooldown_frac=0.1)
    assert T.lr_factor(0, 0.0, cfg) == pytest.approx(0.1)
    assert T.lr_factor(100, 300.0, cfg) == 1.0
    assert T.lr_factor(100, 0.95 * 600, cfg) == pytest.approx(0.5)
    assert T.lr_factor(100, 600.0, cfg) == 0.0


def test_training_latents_match_what_the_pipeline_unpacks_and_decodes(tiny_run):
    out, _ = tiny_run
    pipe = FluxPipeline.from_pretrained(out / T.PIPELINE_DIR, local_files_only=True)
    x = torch.from_numpy(W.World(0).sample(2, seed=0).images)
    packed = T.encode_images(pipe, x)
    assert packed.shape == (2, (W.SIZE // 2) ** 2, 4 * build.LATENT_CHANNELS)
    unpacked = FluxPipeline._unpack_latents(packed, W.SIZE, W.SIZE, pipe.vae_scale_factor)
    vae = pipe.vae.config
    z = unpacked / vae.scaling_factor + vae.shift_factor  # what FluxPipeline does before decode
    with torch.no_grad():
        torch.testing.assert_close(z, pipe.vae.encode(x).latent_dist.mode(), rtol=1e-4, atol=1e-4)


def test_pipeline_feeds_the_transformer_what_training_feeds_it(tiny_run):
    out, _ = tiny_run
    pipe = FluxPipeline.from_pretrained(out / T.PIPELINE_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def pre(_mod, _args, kwargs):
        seen.append({k: kwargs[k] for k in ("timestep", "img_ids", "txt_ids", "hidden_states")})

    pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    call = {**build.read_defaults(out / T.PIPELINE_DIR), "num_inference_steps": 3}
    images = pipe(prompt=["a red circle on a blue background"], output_type="np", **call).images
    assert images.shape == (1, W.SIZE, W.SIZE, 3)
    assert len(seen) == 3
    grid = W.SIZE // 2
    ids = FluxPipeline._prepare_latent_image_ids(1, grid, grid, "cpu", torch.float32)
    torch.testing.assert_close(seen[0]["img_ids"], ids)
    assert seen[0]["txt_ids"].shape == (build.MAX_SEQUENCE_LENGTH, 3)
    assert not seen[0]["txt_ids"].any()
    # Timesteps reach the transformer as sigma in (0, 1], starting at pure noise (t = 1).
    ts = [float(s["timestep"][0]) for s in seen]
    assert ts[0] == pytest.approx(1.0) and all(0.0 < t <= 1.0 for t in ts) and ts == sorted(ts)[::-1]
    assert seen[0]["hidden_states"].shape == (1, grid * grid, 4 * build.LATENT_CHANNELS)


def test_activation_summary_finds_a_planted_outlier_channel():
    rng = np.random.default_rng(0)
    per_prompt = np.abs(rng.normal(0.0, 0.1, (8, 32)))
    per_prompt[:, 5] = 10.0
    per_prompt[:, [1, 2, 3]] = 1.0 + 0.01 * np.arange(3)
    out = activation_summary({"double.0": per_prompt})["double.0"]
    assert out["top_channels"][0] == 5
    assert set(out["top_channels"]) == {1, 2, 3, 5}
    assert out["topk_jaccard"] == 1.0
    assert out["top1_agreement"] == 1.0
    assert out["top1_over_median"] > 50


def test_activation_summary_stability_by_hand():
    # Three prompts, 6 channels, k=2. Own top-2 sets: {0, 1}, {0, 1}, {0, 2}; own top-1: 0, 0, 2.
    per_prompt = np.array([[9.0, 5.0, 1.0, 0.1, 0.2, 0.3],
                           [8.0, 6.0, 2.0, 0.1, 0.2, 0.3],
                           [3.0, 0.5, 7.0, 0.1, 0.2, 0.3]])
    out = activation_summary({"b": per_prompt}, k=2)["b"]
    assert out["top_channels"] == [0, 1]  # averages 6.67, 3.83, 3.33
    assert out["topk_jaccard"] == pytest.approx((1.0 + 1 / 3 + 1 / 3) / 3)
    assert out["top1_agreement"] == pytest.approx(2 / 3)
    avg = per_prompt.mean(0)
    assert out["top1_over_median"] == pytest.approx(avg[0] / np.median(avg))


def test_eval_prompts_are_deterministic_world_captions():
    caps, seeds = eval_prompts(16, seed=3)
    assert (caps, seeds) == eval_prompts(16, seed=3)
    assert eval_prompts(16, seed=4) != (caps, seeds)
    assert all(W.parse_caption(c) for c in caps) and len(set(seeds)) == 16


def test_cli_path_fails_cleanly_when_weights_are_missing(monkeypatch, tmp_path, capsys):
    from massact_nn.tracing.cli.main import main
    from massact_nn.tracing.toy import export

    monkeypatch.setattr(export, "shipped_path", lambda: tmp_path / "absent")
    assert main(["toy", "path"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not shipped" in err[0]


@needs_weights
def test_cli_path_prints_the_shipped_folder(capsys):
    from massact_nn.tracing.cli.main import main

    assert main(["toy", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(shipped_path())


@needs_weights
def test_shipped_folder_is_small_and_records_call_defaults():
    folder = shipped_path()
    assert folder_bytes(folder) <= MAX_BYTES
    meta = json.loads((folder / build.DEFAULTS_FILE).read_text())
    assert meta["call"]["height"] == W.SIZE and meta["call"]["max_sequence_length"] > 0
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))


@needs_weights
def test_shipped_judge_reads_fresh_world_images():
    torch.set_num_threads(1)
    batch = W.World(0).sample(512, seed=20251126)
    acc = score(batch.images, batch.captions, load_judge(shipped_path()))
    assert acc["all_three"] >= 0.95, acc


@needs_weights
def test_shipped_pipeline_loads_offline_and_follows_prompts(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    folder = shipped_path()
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    caps, seeds = eval_prompts(16, seed=777)
    images, abs_means = generate(pipe, caps, seeds, build.read_defaults(folder))
    assert images.shape == (16, 3, W.SIZE, W.SIZE) and np.isfinite(images).all()
    assert len(abs_means) == len(pipe.transformer.transformer_blocks) + len(
        pipe.transformer.single_transformer_blocks
    )
    acc = score(images, caps, load_judge(folder))
    assert acc["all_three"] >= 0.5, acc
