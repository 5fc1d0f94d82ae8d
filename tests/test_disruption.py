"""Disruption: the pure edit, the nnsight intervention (checked with plain hooks), controls, CLI."""

from __future__ import annotations

import pytest
import torch
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.model import load_model
from massact_nn.tracing.probes.common import make_plan
from massact_nn.tracing.probes.disruption import (
    DisruptionConfig,
    disrupt,
    generate_images,
    save_disruption,
)
from massact_nn.tracing.stats import StatsConfig, collect_stats

from massact_nn.disruption import DisruptionResult, ablate
from massact_nn.errors import MassactError

GEN = GenerationConfig(steps=3, seed=5, height=32, width=32, batch_size=4)
PROMPTS = ["a red cat", "a blue dog on the sea"]


@pytest.fixture(scope="module")
def planted(planted_flux_dir):
    return load_model(planted_flux_dir)


@pytest.fixture(scope="module")
def planted_stats(planted, tmp_path_factory):
    stats = collect_stats(planted, ["a red cat", "a green tree", "a dog"],
                          StatsConfig(GenerationConfig(steps=2, height=32, width=32), k=2, progress=False))
    folder = tmp_path_factory.mktemp("stats")
    stats.save(folder)
    return folder


# -- pure edit -------------------------------------------------------------------------------
def test_ablate_modes_touch_only_the_chosen_channels():
    torch.manual_seed(0)
    h = torch.randn(2, 6, 8) + 3.0
    h[1, :, 2] -= 10.0  # row 1 has a negative token mean on channel 2
    before = h.clone()
    ch = torch.tensor([2, 5])
    rest = torch.ones(8, dtype=torch.bool)
    rest[ch] = False
    z = ablate(h, ch, "zero")
    assert torch.equal(h, before), "the input must not be edited in place"
    assert (z[..., ch] == 0).all() and torch.equal(z[..., rest], h[..., rest])
    s = ablate(h, ch, "scale", alpha=0.5)
    torch.testing.assert_close(s[..., ch], h[..., ch] * 0.5)
    t = ablate(h, ch, "token_mean")
    torch.testing.assert_close(t[..., ch], h[..., ch].mean(1, keepdim=True).expand(2, 6, 2))
    m = ablate(h, ch, "mean", values=torch.tensor([-4.0, 7.0]))
    assert (m[:, :, 2] == -4.0).all() and (m[:, :, 5] == 7.0).all()
    m = ablate(h, ch, "mean", values=torch.tensor([4.0, 7.0]), signed=False)  # magnitudes: sample's sign
    assert (m[0, :, 2] == 4.0).all() and (m[1, :, 2] == -4.0).all() and (m[:, :, 5] == 7.0).all()
    assert ablate(h, torch.zeros(0, dtype=torch.long), "zero") is h
    with pytest.raises(MassactError, match="disruption mode"):
        ablate(h, ch, "bogus")
    with pytest.raises(MassactError, match="out of range"):
        ablate(h, torch.tensor([8]), "zero")


# -- the intervention, read back by an independent plain hook ---------------------------------
@pytest.mark.parametrize("site,nxt", [("transformer_blocks.0", "transformer_blocks.1"),
                                      ("single_transformer_blocks.0", "single_transformer_blocks.1")])
def test_zeroed_channels_read_zero_at_next_block_input(planted, site, nxt):
    plan = make_plan(planted, GEN, sites=[site], steps="1:")
    ch = torch.tensor([5, 3])
    seen = []
    hook = planted.pipeline.transformer.get_submodule(nxt).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["hidden_states"].detach().clone()), with_kwargs=True)
    try:
        generate_images(planted, plan, PROMPTS, {site: (ch, None)})
    finally:
        hook.remove()
    assert len(seen) == GEN.steps
    assert seen[0][..., ch].abs().max() > 0, "step 0 is outside the window and must be untouched"
    for x in seen[1:]:
        assert (x[..., ch] == 0).all()
        assert x[..., 0].abs().max() > 0, "other channels must be kept"


def test_mean_mode_writes_the_stats_signed_mean(planted, planted_stats):
    from massact_nn.stats import ChannelStats

    st = ChannelStats.load(planted_stats)
    site, nxt = "transformer_blocks.0", "transformer_blocks.1"
    ch = torch.tensor([5, 3])
    want = st.stat(site, "mean")[ch]
    plan = make_plan(planted, GEN, sites=[site])
    seen = []
    hook = planted.pipeline.transformer.get_submodule(nxt).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["hidden_states"].detach().clone()), with_kwargs=True)
    try:
        generate_images(planted, plan, PROMPTS, {site: (ch, want)}, mode="mean")
    finally:
        hook.remove()
    assert len(seen) == GEN.steps
    for x in seen:
        torch.testing.assert_close(x[..., ch], want.expand_as(x[..., ch]))


def test_disrupt_in_mean_mode_writes_each_sites_signed_mean(planted, planted_stats):
    # The whole probe, not only its intervention: the values come from the statistics run.
    from massact_nn.stats import ChannelStats

    st = ChannelStats.load(planted_stats)
    sites = {"transformer_blocks.0": "transformer_blocks.1",
             "single_transformer_blocks.0": "single_transformer_blocks.1"}
    seen: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    tr = planted.pipeline.transformer
    hooks = [tr.get_submodule(nxt).register_forward_pre_hook(
        lambda mod, args, kwargs, s=s: seen[s].append(kwargs["hidden_states"].detach().clone()),
        with_kwargs=True) for s, nxt in sites.items()]
    cfg = DisruptionConfig(generation=GEN, k=2, mode="mean", controls=("top",), sites=list(sites),
                           progress=False)
    try:
        r = disrupt(planted, PROMPTS, planted_stats, cfg)
    finally:
        for h in hooks:
            h.remove()
    assert r.meta["mean_statistic"] == "mean" and r.meta["mode"] == "mean"
    tops = {s: torch.topk(st.stat(s, "abs_mean"), 2).indices for s in sites}
    assert any((st.stat(s, "mean")[tops[s]] < 0).any() for s in sites), \
        "a negative mean must be among them, or signed and magnitude values could not be told apart"
    for s in sites:
        ch = tops[s]
        assert sorted(r.channels["top_k2"][s].tolist()) == sorted(ch.tolist())
        mean = st.stat(s, "mean")[ch]
        assert len(seen[s]) == 2 * GEN.steps  # the baseline generation, then the disrupted one
        for x in seen[s][:GEN.steps]:  # the baseline is untouched
            assert not torch.allclose(x[..., ch], mean.expand_as(x[..., ch]))
        for x in seen[s][GEN.steps:]:
            torch.testing.assert_close(x[..., ch], mean.expand_as(x[..., ch]))


def test_disrupt_controls_planted_channel_is_critical(planted, planted_stats, tmp_path):
    calls = []

    def user(images, prompts):
        calls.append((tuple(images.shape), list(prompts)))
        return {"mean_brightness": float(images.mean())}

    cfg = DisruptionConfig(generation=GEN, k=[1, 2], random_draws=2, user_metric=user, progress=False)
    r = disrupt(planted, PROMPTS, planted_stats, cfg)
    assert r.sets[0] == "none" and len(r.sets) == 1 + 2 * (2 + 2)
    for module, ch in r.channels["top_k1"].items():
        assert ch.tolist() == [5], f"planted channel must be top-1 at {module}"
    for name in ("random0_k1", "random1_k1", "low_k1"):
        assert all(5 not in ch.tolist() for ch in r.channels[name].values())
    draws = [{m: c.tolist() for m, c in r.channels[f"random{d}_k2"].items()} for d in (0, 1)]
    assert draws[0] != draws[1], "random draws must differ"
    s = r.metrics["sets"]
    assert s["none"]["mse"] == 0.0
    assert s["top_k1"]["mse"] > 10 * max(s["low_k1"]["mse"], s["random0_k1"]["mse"], s["random1_k1"]["mse"])
    # Each set's mse is its images' distance to the undisturbed ones; the summary averages draws.
    for name in r.sets:
        want = (r.images[name] - r.images["none"]).pow(2).flatten(1).mean(1)
        assert s[name]["mse"] == pytest.approx(float(want.mean()), rel=1e-6, abs=1e-12)
    summary = {(row["control"], row["k"]): row for row in r.metrics["summary"]}
    for k in (1, 2):
        draws = [s[f"random{d}_k{k}"]["mse"] for d in (0, 1)]
        assert summary[("random", k)]["draws"] == 2 and draws[0] != draws[1]
        assert summary[("random", k)]["mse"] == pytest.approx(sum(draws) / 2, rel=1e-6)
        assert summary[("top", k)]["mse"] == pytest.approx(s[f"top_k{k}"]["mse"], rel=1e-6)
    assert len(calls) == len(r.sets) and calls[0] == ((2, 3, 32, 32), PROMPTS)
    assert "mean_brightness" in s["top_k2"]["user"]
    # Save and load back exactly.
    save_disruption(r, tmp_path / "run")
    assert (tmp_path / "run" / "grid.png").is_file() and (tmp_path / "run" / "top_k1.png").is_file()
    back = DisruptionResult.load(tmp_path / "run")
    assert back.sets == r.sets and back.metrics == r.metrics
    assert all(torch.equal(back.images[k], r.images[k]) for k in r.sets)
    assert all(torch.equal(back.channels[k][m], r.channels[k][m]) for k in r.sets for m in r.channels[k])
    assert back.meta["prompts"] == PROMPTS and back.meta["steps"] == [0, 1, 2]
    assert back.meta["guidance"] == "none"  # the tiny FLUX.1 is guidance-distilled: one call per step


def test_same_seeds_make_baseline_reproducible(planted):
    plan = make_plan(planted, GEN)
    a = generate_images(planted, plan, PROMPTS, None)
    b = generate_images(planted, plan, PROMPTS, {})
    assert torch.equal(a, b)
    # ... and the seed is what fixes them: another seed gives other images.
    other = make_plan(planted, GenerationConfig(**{**GEN.to_json(), "seed": GEN.seed + 1}))
    assert not torch.allclose(generate_images(planted, other, PROMPTS, None), a)


# -- CLI: bad input is one line and a non-zero exit -------------------------------------------
@pytest.fixture(scope="module")
def partial_stats(planted, tmp_path_factory):
    stats = collect_stats(planted, ["a cat"], StatsConfig(
        GenerationConfig(steps=1, height=32, width=32), k=2, sites=["transformer_blocks.0"], progress=False))
    folder = tmp_path_factory.mktemp("partial")
    stats.save(folder)
    return folder


@pytest.mark.parametrize("extra,needle", [
    (["--sites", "single_transformer_blocks.1"], "not in the statistics run"),
    (["--k", "40", "--sites", "transformer_blocks.0"], "k=40 is out of range"),
    (["--mode", "nope", "--sites", "0"], "unknown disruption mode"),
    (["--steps", "9:", "--sites", "0"], "select no step"),
    (["--k", "", "--sites", "0"], "no k given"),  # not a run of the undisturbed baseline alone
    (["--controls", "", "--sites", "0"], "no channel sets given"),
])
def test_cli_bad_input(planted_flux_dir, partial_stats, tmp_path, capsys, extra, needle):
    code = cli(["disrupt", "--model", str(planted_flux_dir), "--stats", str(partial_stats),
                "--prompt", "a cat", "--num-steps", "1", "--height", "32", "--width", "32",
                "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_cli_writes_run_folder(planted_flux_dir, partial_stats, tmp_path, capsys):
    code = cli(["disrupt", "--model", str(planted_flux_dir), "--stats", str(partial_stats),
                "--prompt", "a cat", "--num-steps", "2", "--height", "32", "--width", "32", "--k", "1",
                "--controls", "top", "--sites", "0", "--out", str(tmp_path / "o")])
    assert code == 0
    r = DisruptionResult.load(tmp_path / "o")
    assert r.sets == ["none", "top_k1"] and r.metrics["sets"]["top_k1"]["mse"] > 0


def test_numpy_k_is_an_integer_k(planted, partial_stats):
    import numpy as np
    from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt

    cfg = DisruptionConfig(GenerationConfig(steps=1, height=32, width=32), k=np.int64(2),
                           controls=("top",), sites=["transformer_blocks.0"], judge=False,
                           progress=False)
    assert disrupt(planted, "a cat", partial_stats, cfg).sets == ["none", "top_k2"]


def test_a_disruption_save_that_dies_midway_is_refused_on_load(planted, partial_stats, tmp_path,
                                                              monkeypatch):
    import massact_nn.tracing.probes.disruption as dis_mod
    from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt, save_disruption

    from massact_nn.errors import MassactError

    cfg = DisruptionConfig(GenerationConfig(steps=1, height=32, width=32), k=2, controls=("top",),
                           sites=["transformer_blocks.0"], judge=False, progress=False)
    r = disrupt(planted, "a cat", partial_stats, cfg)
    save_disruption(r, tmp_path)
    assert DisruptionResult.load(tmp_path).sets == ["none", "top_k2"]

    def killed(*_a, **_k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(dis_mod, "write_pngs", killed)
    with pytest.raises(KeyboardInterrupt):
        save_disruption(r, tmp_path)
    with pytest.raises(MassactError):
        DisruptionResult.load(tmp_path)
