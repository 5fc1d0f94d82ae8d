"""Statistics through nnsight on a tiny FLUX.1, against an independent plain-hook oracle."""

from __future__ import annotations

import json

import pytest
import torch
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.model import load_model
from massact_nn.tracing.stats import StatsConfig, collect_stats

from massact_nn.errors import MassactError
from massact_nn.stats import ChannelStats

PROMPTS = ["a red cat", "a blue dog on the sea", "a green tree"]
GEN = GenerationConfig(steps=3, seed=11, height=32, width=32, batch_size=2,
                       extra={"max_sequence_length": 16})


def _hook_oracle(pipe, prompts, gen):
    """abs_mean / mean_abs / max_abs computed with plain forward hooks (image stream = out[1])."""
    tr = pipe.transformer
    names = [f"transformer_blocks.{i}" for i in range(len(tr.transformer_blocks))]
    names += [f"single_transformer_blocks.{i}" for i in range(len(tr.single_transformer_blocks))]
    seen = {n: [] for n in names}
    handles = [
        tr.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: seen[n].append(out[1].detach().double().clone())
        )
        for n in names
    ]
    try:
        for i, p in enumerate(prompts):
            pipe(p, num_inference_steps=gen.steps, height=gen.height, width=gen.width,
                 generator=torch.Generator().manual_seed(gen.seed + i), max_sequence_length=16,
                 output_type="latent")
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, xs in seen.items():
        x = torch.cat(xs)  # [prompts*steps, tokens, channels], prompt-major
        out[n] = {
            "abs_mean": x.mean(1).abs().mean(0),
            "mean_abs": x.abs().mean(1).mean(0),
            "max_abs": x.abs().amax((0, 1)),
            "mean": x.mean(1).mean(0),
            "per_step_abs_mean": x.mean(1).abs().view(len(prompts), gen.steps, -1).mean(0),
        }
    return out


def test_stats_equal_plain_hook_computation(tiny_flux):
    stats = collect_stats(tiny_flux, PROMPTS, StatsConfig(GEN, k=3, progress=False))
    oracle = _hook_oracle(tiny_flux.pipeline, PROMPTS, GEN)
    assert [s.module for s in stats.sites] == list(oracle)
    for module, ref in oracle.items():
        for name, want in ref.items():
            if name == "per_step_abs_mean":  # measured only on request (below)
                continue
            got = stats.stat(module, name).double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {module}")
    assert stats.meta["prompts"] == PROMPTS and stats.meta["steps"] == 3
    assert stats.meta["n_layers"] == len(oracle)  # the model's depth (for depth-normalised plots)
    # The dtype the activations were measured in, as diffusers reports the model's.
    assert stats.meta["dtype"] == str(tiny_flux.pipeline.transformer.dtype).removeprefix("torch.")


def test_same_seed_same_stats_and_batching_invariance(tiny_flux):
    a = collect_stats(tiny_flux, PROMPTS, StatsConfig(GEN, progress=False))
    b = collect_stats(tiny_flux, PROMPTS, StatsConfig(GEN, progress=False))
    one = GenerationConfig(**{**GEN.to_json(), "batch_size": 1})
    c = collect_stats(tiny_flux, PROMPTS, StatsConfig(one, progress=False))
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
        torch.testing.assert_close(a.tensors[key], c.tensors[key], rtol=1e-5, atol=1e-6, msg=key)
    other = GenerationConfig(**{**GEN.to_json(), "seed": 12})
    d = collect_stats(tiny_flux, PROMPTS, StatsConfig(other, progress=False))
    assert not torch.equal(a.tensors["abs_mean/transformer_blocks.0"],
                           d.tensors["abs_mean/transformer_blocks.0"])


def test_per_step_curves_average_to_abs_mean(tiny_flux):
    st = collect_stats(tiny_flux, PROMPTS[:2], StatsConfig(GEN, per_step=True, progress=False))
    oracle = _hook_oracle(tiny_flux.pipeline, PROMPTS[:2], GEN)
    for s in st.sites:
        curve = st.stat(s.module, "per_step_abs_mean")
        assert curve.shape == (3, s.channels)
        want = oracle[s.module]["per_step_abs_mean"]
        torch.testing.assert_close(curve.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(curve.mean(0), st.stat(s.module), rtol=1e-5, atol=1e-6)
        # the signal changes along the trajectory, so per-step curves are not all equal
        assert not torch.allclose(curve[0], curve[-1])


def test_planted_channel_is_found_top1_everywhere(planted_flux_dir):
    model = load_model(planted_flux_dir)
    st = collect_stats(model, PROMPTS, StatsConfig(GEN, progress=False))
    # The plant writes channel 5 in the first double block, which the residual stream carries on.
    planted = 5
    for row in st.summary():
        assert row["top"][0] == planted, row
        assert row["ratio_top1_median"] > 20
        assert row["jaccard_prompts"] is not None and row["jaccard_prompts"] > 0.3


def test_nonfinite_activation_is_reported(tiny_flux_dir):
    model = load_model(tiny_flux_dir)
    with torch.no_grad():
        model.pipeline.transformer.single_transformer_blocks[0].proj_out.bias[3] = float("inf")

    where = r"non-finite activations at site single_transformer_blocks\.0, step 0"
    with pytest.raises(MassactError, match=where):
        collect_stats(model, PROMPTS[:1], StatsConfig(GEN, progress=False))


def test_cli_stats_writes_run_folder(tiny_flux_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli(["stats", "--model", str(tiny_flux_dir), "--prompt", "a red cat", "--prompt", "a dog",
                "--steps", "2", "--height", "32", "--width", "32", "--k", "3", "--per-step",
                "--out", str(out)])
    assert code == 0
    meta = json.loads((out / "stats.json").read_text())
    assert meta["prompts"] == ["a red cat", "a dog"] and meta["steps"] == 2
    assert meta["architecture"] == "flux" and meta["versions"]["nnsight"]
    assert [s["module"] for s in meta["sites"]][:2] == ["transformer_blocks.0", "transformer_blocks.1"]
    st = ChannelStats.load(out)
    assert st.has_per_step
    assert meta["sites"][0]["top"] == st.top("transformer_blocks.0", 3).tolist()
    assert meta["reduction"] == "auto" and meta["compiled_shapes"] == []
    # --sites takes commas as the probe commands do.
    code = cli(["stats", "--model", str(tiny_flux_dir), "--prompt", "a red cat", "--steps", "1",
                "--height", "32", "--width", "32", "--sites", "0,single_transformer_blocks.1",
                "--reduction", "eager", "--out", str(tmp_path / "two")])
    assert code == 0
    two = ChannelStats.load(tmp_path / "two")
    assert [s.module for s in two.sites] == ["transformer_blocks.0", "single_transformer_blocks.1"]
    assert two.meta["reduction"] == "eager"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/folder"], "model folder '/nonexistent/folder' does not exist"),
        (["--k", "0"], "k=0 is out of range"),
        (["--k", "99"], "k=99 is out of range; accepted: 1..32"),
        (["--no-prompt"], "no prompts given"),
        (["--height", "30"], "height=30, width=32 cannot be taken by this model"),
        (["--sites", "transformer_blocks.7"], "unknown site 'transformer_blocks.7'"),
        (["--sites"], "--sites was given without a site"),
        (["--guidance-scale", "nan"], "guidance_scale=nan is out of range; accepted: a finite number"),
        (["--dtype", "float64"], None),
        (["--reduction", "fast"], None),
    ],
)
def test_cli_bad_input_one_line(tiny_flux_dir, tmp_path, capsys, args, message):
    base = {"--model": str(tiny_flux_dir), "--prompt": "a cat", "--height": "32", "--width": "32",
            "--steps": "1"}
    argv = ["stats"]
    skip_prompt = "--no-prompt" in args
    for flag, value in base.items():
        if flag in args or (flag == "--prompt" and skip_prompt):
            continue
        argv += [flag, value]
    argv += [a for a in args if a != "--no-prompt"] + ["--out", str(tmp_path / "o")]
    if message is None:  # argparse rejects it (exit 2, usage line)
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2
        return
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("massact: error: ") and message in err[0], err


def test_cli_unsupported_class(tmp_path, capsys):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert cli(["sites", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported transformer class 'UNet2DConditionModel'; supported: " in err
    assert "FluxTransformer2DModel" in err


def test_no_sites_selected_is_a_clear_error(tiny_flux):
    from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt
    from massact_nn.tracing.probes.transport import TransportConfig, transport

    with pytest.raises(MassactError, match=r"no sites selected \(sites=\[\]\)"):
        collect_stats(tiny_flux, PROMPTS, StatsConfig(GEN, sites=[], progress=False))
    st = collect_stats(tiny_flux, PROMPTS[:1], StatsConfig(GEN, k=2, progress=False))
    # A probe at no site would return the untouched images as if it had intervened.
    with pytest.raises(MassactError, match=r"no sites selected \(sites=\[\]\)"):
        transport(tiny_flux, "a red cat", "a dog", st,
                  TransportConfig(generation=GEN, sites=[], progress=False))
    with pytest.raises(MassactError, match=r"no sites selected \(sites=\[\]\)"):
        disrupt(tiny_flux, ["a cat"], st,
                DisruptionConfig(generation=GEN, sites=(s for s in []), progress=False))


def test_a_string_is_one_prompt_and_a_zero_batch_is_refused(tiny_flux):
    from dataclasses import replace

    from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt

    one_step = replace(GEN, steps=1)
    st = collect_stats(tiny_flux, "a red cat", StatsConfig(one_step, k=2, progress=False))
    assert st.meta["prompts"] == ["a red cat"]  # not nine one-character prompts
    listed = collect_stats(tiny_flux, ["a red cat"], StatsConfig(one_step, k=2, progress=False))
    assert torch.equal(st.matrix(), listed.matrix())
    d = disrupt(tiny_flux, "a red cat", st, DisruptionConfig(generation=one_step, k=[1], random_draws=1,
                                                            judge=False, progress=False))
    assert d.meta["prompts"] == ["a red cat"] and d.images["none"].shape[0] == 1
    with pytest.raises(MassactError, match=r"prompt 1 is ''; accepted: non-empty strings"):
        collect_stats(tiny_flux, ["a", ""], StatsConfig(one_step, progress=False))
    with pytest.raises(MassactError, match=r"batch_size=0 is out of range; accepted: an integer >= 1"):
        collect_stats(tiny_flux, "a", StatsConfig(replace(GEN, batch_size=0), progress=False))


def test_a_subset_of_sites_keeps_layers_and_the_models_depth(tiny_flux):
    cfg = StatsConfig(GEN, k=2, sites=[0, "single_transformer_blocks.1"], progress=False)
    sub = collect_stats(tiny_flux, PROMPTS[:1], cfg)
    assert [(s.layer, s.module) for s in sub.sites] == [(0, "transformer_blocks.0"),
                                                        (3, "single_transformer_blocks.1")]
    assert sub.meta["n_layers"] == 4


def test_planned_reductions_are_the_reductions_the_run_makes(tiny_flux, monkeypatch):
    # "auto" decides from this plan: it must count every reduction, per shape (the last batch of
    # three prompts at batch size 2 has one row).
    from massact_nn.tracing import stats as tst

    import massact_nn.reduce as red
    import massact_nn.stats as st

    made: dict = {}
    real = st.channel_sums

    def counting(h, compiled=False):
        made[tuple(h.shape)] = made.get(tuple(h.shape), 0) + 1
        return real(h, compiled)

    plans = []
    real_plan = red.plan_compiled

    def spy(reduction, device, calls, layouts=None):
        plans.append((reduction, dict(calls), dict(layouts)))
        return real_plan(reduction, device, calls, layouts)

    monkeypatch.setattr(st, "channel_sums", counting)
    monkeypatch.setattr(tst, "plan_compiled", spy)
    res = collect_stats(tiny_flux, PROMPTS, StatsConfig(GEN, progress=False))
    assert plans == [("auto", made, dict.fromkeys(made, 2))]  # FLUX: double and single blocks
    n_sites = len(res.sites)
    width = res.sites[0].channels
    assert made == {(2, 64, width): GEN.steps * n_sites, (1, 64, width): GEN.steps * n_sites}  # 32x32 px
    assert res.meta["reduction"] == "auto" and res.meta["compiled_shapes"] == []  # a CPU run


def test_compiled_on_a_cpu_warns_and_gives_the_eager_result(tiny_flux):
    eager = collect_stats(tiny_flux, PROMPTS[:1], StatsConfig(GEN, progress=False, reduction="eager"))
    with pytest.warns(UserWarning, match="'compiled' needs a CUDA device; on cpu"):
        comp = collect_stats(tiny_flux, PROMPTS[:1], StatsConfig(GEN, progress=False, reduction="compiled"))
    for key, t in eager.tensors.items():
        assert torch.equal(t, comp.tensors[key]), key
    with pytest.raises(MassactError, match="unknown reduction 'fast'; accepted: auto, eager, compiled"):
        collect_stats(tiny_flux, PROMPTS[:1], StatsConfig(GEN, progress=False, reduction="fast"))


def test_a_statistics_run_leaves_no_cyclic_garbage_of_its_own(tiny_flux, cyclic_garbage):
    collect_stats(tiny_flux, PROMPTS[:1], StatsConfig(GEN, progress=False))  # warm caches
    cfg = StatsConfig(GEN, progress=False)
    assert cyclic_garbage(lambda: collect_stats(tiny_flux, PROMPTS[:2], cfg)) == []
