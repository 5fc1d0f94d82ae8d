"""Transport: the pure joint-mask math, identities on a tiny Flux, mode agreement, CLI errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.probes.transport import ImageSource, TransportConfig, save_transport, transport
from massact_nn.tracing.probes.transport_parts import group_rows, mask_groups, resolve_token_mask, rows_of
from massact_nn.tracing.sites import sites_of
from massact_nn.tracing.stats import StatsConfig, collect_stats

from massact_nn.errors import MassactError
from massact_nn.images import save_png
from massact_nn.transport import (
    TransportResult,
    blend,
    channel_mask,
    gather,
    joint_mask,
    scatter_blend,
    scatter_blend_,
    token_mask,
)

GEN = GenerationConfig(steps=3, seed=7, height=32, width=32)
SRC, TGT = ["a red cat", "a green tree"], ["a blue dog on the sea", "a cat"]


# -- pure math --------------------------------------------------------------------------------
def test_joint_mask_and_blend():
    p = torch.tensor([True, False, True])
    m = channel_mask(torch.tensor([1, 3]), 4)
    M = joint_mask(p, m)
    assert M.shape == (3, 4) and M.sum() == 4 and M[0, 1] and M[2, 3] and not M[1].any()
    t, s = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = blend(t, s, M, 1.0)
    assert torch.equal(out[:, M], s[:, M]) and torch.equal(out[:, ~M], t[:, ~M])
    assert torch.equal(blend(t, s, M, 0.0), t)
    torch.testing.assert_close(blend(t, s, M, 0.25)[:, M], 0.75 * t[:, M] + 0.25 * s[:, M])
    # Complementary masks cover every entry: transporting M then ~M gives the source exactly.
    assert torch.equal(blend(blend(t, s, M), s, ~M), s)


def test_two_pass_storage_equals_blend():
    t, s = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    tok, ch = torch.tensor([0, 4, 5]), torch.tensor([1, 2])
    M = joint_mask(token_mask(torch.isin(torch.arange(6), tok), 6), channel_mask(ch, 5))
    stored = gather(s, tok, ch)
    assert stored.shape == (2, 3, 2)
    for a in (1.0, 0.4):
        torch.testing.assert_close(scatter_blend(t, stored, tok, ch, a), blend(t, s, M, a))
    # Row-indexed, in place: rows 0 and 2 of a 4-row batch take rows 3 and 1 (one batch holding
    # sources and results); the other rows and the unmasked entries stay bit-identical.
    h = torch.randn(4, 6, 5)
    src, dst = torch.tensor([3, 1]), torch.tensor([0, 2])
    got = gather(h, tok, ch, src)
    assert torch.equal(got, gather(h[src], tok, ch))
    for a in (1.0, 0.4):
        out = h.clone()
        assert scatter_blend_(out, got, tok, ch, a, dst) is out
        torch.testing.assert_close(out[dst], blend(h[dst], h[src], M, a))
        assert torch.equal(out[[1, 3]], h[[1, 3]])
    with pytest.raises(MassactError, match="do not fit"):
        scatter_blend_(h.clone(), got, tok, ch, 1.0, torch.tensor([0]))


def test_mask_groups_and_rows():
    p = torch.zeros(3, 2, 2, dtype=torch.bool)
    p[0, 0] = p[2, 0] = True
    p[1, 1, 1] = True
    groups = mask_groups(p)
    assert [g for g, _ in groups] == [[0, 2], [1]]
    assert groups[0][1].tolist() == [0, 1] and groups[1][1].tolist() == [3]
    assert [g for g, _ in mask_groups(p, per_pair=True)] == [[0], [1], [2]]
    # 3 pairs x 2 copies; batched CFG puts [uncond copies; cond copies]: 12 rows.
    assert group_rows([0, 2], 1, 3, 2, False).tolist() == [3, 5]
    assert group_rows([0, 2], 1, 3, 2, True).tolist() == [3, 5, 9, 11]


def test_pure_shape_checks():
    with pytest.raises(MassactError, match="differ in shape"):
        blend(torch.zeros(1, 4, 2), torch.zeros(1, 5, 2), torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(MassactError, match="joint mask shape"):
        blend(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(MassactError, match="the image stream has 16"):
        token_mask(torch.ones(9), 16)
    with pytest.raises(MassactError, match=r"shape \(3, 3\); accepted: the token grid \(4, 4\)"):
        token_mask(torch.ones(3, 3), (4, 4))
    with pytest.raises(MassactError, match="alpha"):
        blend(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), torch.ones(4, 2, dtype=torch.bool), 1.5)


def test_token_masks_union_and_complement_cover_grid(tmp_path):
    fg = torch.zeros(4, 4, dtype=torch.bool)
    fg[1:3, 1:3] = True
    np.save(tmp_path / "fg.npy", fg.numpy())
    np.save(tmp_path / "bg.npy", (~fg).numpy())
    u = resolve_token_mask([str(tmp_path / "fg.npy"), str(tmp_path / "bg.npy")], (4, 4), 2)
    assert u.shape == (2, 4, 4) and u.all()
    assert torch.equal(resolve_token_mask(str(tmp_path / "fg.npy"), (4, 4), 1)[0], fg)
    assert resolve_token_mask("all", (4, 4), 3).all()
    with pytest.raises(MassactError, match="token mask has shape"):
        resolve_token_mask(torch.ones(3, 3, dtype=torch.bool), (4, 4), 1)


def test_rows_of_batched_cfg_layout():
    assert rows_of(2, 2, 3, False).tolist() == [4, 5]
    assert rows_of(0, 2, 3, True).tolist() == [0, 1, 6, 7]
    assert group_rows([1], 1, 2, 2, True).tolist() == [3, 7]


# -- on a tiny Flux ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def every_channel(tiny_flux):
    return {s.module: torch.arange(s.channels) for s in sites_of(tiny_flux)}


@pytest.fixture(scope="module")
def stats_dir(tiny_flux, tmp_path_factory):
    st = collect_stats(tiny_flux, ["a red cat", "a dog"],
                       StatsConfig(GenerationConfig(steps=2, height=32, width=32), k=2, progress=False))
    return st.save(tmp_path_factory.mktemp("tstats"))


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
def test_full_transport_with_norm_out_reproduces_source(tiny_flux, every_channel, mode):
    cfg = TransportConfig(generation=GEN, channels=every_channel, mode=mode, copy_norm_out=True,
                          progress=False)
    r = transport(tiny_flux, SRC, TGT, None, cfg)
    assert (r.target - r.source).abs().max() > 1e-3, "source and target must differ for the test to mean much"
    assert torch.equal(r.result, r.source)
    if mode == "two_pass":
        assert r.meta["stored_bytes"] == r.meta["full_bytes"] > 0  # p = all, m = all: everything stored


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
def test_alpha_zero_reproduces_target(tiny_flux, every_channel, mode):
    cfg = TransportConfig(generation=GEN, channels=every_channel, mode=mode, alpha=0.0, copy_norm_out=True,
                          progress=False)
    r = transport(tiny_flux, SRC, TGT, None, cfg)
    assert torch.equal(r.result, r.target)


def test_blocks_without_norm_out_are_not_an_identity(tiny_flux, every_channel):
    # Design notes, pitfall 10: norm_out is modulated by the target's pooled text embedding.
    cfg = TransportConfig(generation=GEN, channels=every_channel, progress=False)
    r = transport(tiny_flux, SRC, TGT, None, cfg)
    assert (r.result - r.source).abs().max() > 1e-4


def test_modes_agree_on_a_partial_transport(tiny_flux, stats_dir, tmp_path):
    p = torch.zeros(8, 8, dtype=torch.bool)
    p[:4] = True
    kw = dict(generation=GEN, k=3, token_mask=p, alpha=0.6, steps="1:", sites=[0, 2, 3], progress=False)
    a = transport(tiny_flux, SRC, TGT, stats_dir, TransportConfig(mode="batched", **kw))
    b = transport(tiny_flux, SRC, TGT, stats_dir, TransportConfig(mode="two_pass", **kw))
    torch.testing.assert_close(a.result, b.result, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.target, b.target, rtol=1e-4, atol=1e-5)
    # One pair per pipeline call: the same seeds per pair, so the same images.
    one = dict(kw, generation=GenerationConfig(**{**GEN.to_json(), "batch_size": 1}))
    c = transport(tiny_flux, SRC, TGT, stats_dir, TransportConfig(mode="two_pass", **one))
    torch.testing.assert_close(c.result, b.result, rtol=1e-4, atol=1e-5)
    assert c.meta["stored_bytes"] == b.meta["stored_bytes"]
    assert (a.result - a.target).abs().max() > 0
    # Only tokens in p x top-3 channels are stored: 32 of 64 tokens, 3 of 32 channels.
    assert b.meta["stored_bytes"] * 64 * 32 == b.meta["full_bytes"] * 32 * 3
    m = b.metrics
    assert m["token_fraction"] == 0.5 and m["to_source"]["inside"] is not None
    save_transport(b, tmp_path / "run")
    back = TransportResult.load(tmp_path / "run")
    for name in ("source", "target", "result", "token_mask"):
        assert torch.equal(getattr(back, name), getattr(b, name))
    assert back.channels.keys() == b.channels.keys() and back.metrics == b.metrics
    assert back.meta["target_prompts"] == TGT
    assert all((tmp_path / "run" / f"{n}.png").is_file() for n in ("source", "target", "result", "mask"))


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
def test_without_control_rows_the_result_is_the_same(tiny_flux, stats_dir, every_channel, mode, tmp_path):
    # Leaving out the untouched target rows (two rows per pair in batched mode) must not change
    # the result: each row keeps its pair's generator, only the batch shrinks.
    p = torch.zeros(8, 8, dtype=torch.bool)
    p[:, 3:] = True
    kw = dict(generation=GEN, k=3, token_mask=p, alpha=0.7, steps="1:", mode=mode, progress=False)
    a = transport(tiny_flux, SRC, TGT, stats_dir, TransportConfig(**kw))
    b = transport(tiny_flux, SRC, TGT, stats_dir, TransportConfig(control=False, **kw))
    assert b.target is None and b.meta["control"] is False and a.meta["control"] is True
    torch.testing.assert_close(b.result, a.result, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.source, a.source, rtol=1e-4, atol=1e-5)
    assert (a.result - a.target).abs().max() > 1e-4, "the transport must change the target to mean much"
    assert "to_target" not in b.metrics
    for part in ("all", "inside", "outside"):
        assert b.metrics["to_source"][part] == pytest.approx(a.metrics["to_source"][part], rel=1e-3, abs=1e-7)
    save_transport(a, tmp_path / "run")
    assert (tmp_path / "run" / "target.png").is_file()
    save_transport(b, tmp_path / "run")  # the same folder: the control run's target must go
    back = TransportResult.load(tmp_path / "run")
    assert back.target is None and torch.equal(back.result, b.result)
    assert not (tmp_path / "run" / "target.png").exists() and (tmp_path / "run" / "result.png").is_file()
    full = TransportConfig(generation=GEN, channels=every_channel, mode=mode, copy_norm_out=True,
                           control=False, progress=False)
    r = transport(tiny_flux, SRC, TGT, None, full)
    assert torch.equal(r.result, r.source)


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    from massact_nn.tracing.model import load_model
    from massact_nn.tracing.testing.tiny import BUILDERS

    folder = tmp_path_factory.mktemp("pixart")
    BUILDERS["pixart"](folder, seed=0, plant=None)
    return load_model(folder)


def test_two_row_batch_under_batched_cfg(tiny_pixart):
    # PixArt runs guidance as [uncond rows; cond rows] in one call: the two-row layout must pick
    # the source's and the result's rows in both halves.
    model = tiny_pixart
    g = GenerationConfig(steps=2, seed=5, height=32, width=32, guidance_scale=3.0)
    chans = {s.module: torch.arange(s.channels) for s in sites_of(model)}
    kw = dict(generation=g, channels=chans, copy_norm_out=True, progress=False)
    with_ctl = transport(model, SRC, TGT, None, TransportConfig(**kw))
    without = transport(model, SRC, TGT, None, TransportConfig(control=False, **kw))
    assert (with_ctl.target - with_ctl.source).abs().max() > 1e-3
    meta = with_ctl.meta
    assert meta["guidance"] == "batched [uncond; cond]" and meta["guidance_scale_used"] == 3.0
    for r in (with_ctl, without):
        torch.testing.assert_close(r.result, r.source, rtol=1e-4, atol=1e-5)
    part = dict(kw, channels={m: c[:3] for m, c in chans.items()}, copy_norm_out=False)
    a = transport(model, SRC, TGT, None, TransportConfig(**part))
    b = transport(model, SRC, TGT, None, TransportConfig(control=False, **part))
    torch.testing.assert_close(b.result, a.result, rtol=1e-4, atol=1e-5)
    assert (a.result - a.target).abs().max() > 1e-4 and (a.result - a.source).abs().max() > 1e-4


def test_segmentation_token_masks_under_batched_cfg(tiny_pixart):
    # token_mask="target" segments the target's trajectory first: PixArt hands the transformer its
    # latent positionally, and the mask must be the segmentation probe's for each target.
    from massact_nn.tracing.probes.segmentation import SegmentConfig, segment

    g = GenerationConfig(steps=2, seed=5, height=32, width=32, guidance_scale=3.0)
    st = collect_stats(tiny_pixart, ["a red cat"], StatsConfig(g, k=2, progress=False))
    r = transport(tiny_pixart, SRC, TGT, st, TransportConfig(generation=g, k=2, token_mask="target",
                                                              progress=False))
    for j, target in enumerate(TGT):
        seg = segment(tiny_pixart, SegmentConfig(stats=st, prompt=target, k=2, controls=("top",),
                                                 generation=replace(g, seed=g.seed + j)))
        want = r.token_mask[j] if r.token_mask.ndim == 3 else r.token_mask
        assert torch.equal(want, seg.mask), j


def test_image_source_on_an_unsupported_family_is_refused_first(tiny_pixart, tmp_path):
    chans = {s.module: torch.arange(2) for s in sites_of(tiny_pixart)}
    src = ImageSource(torch.zeros(1, 3, 32, 32), "a red cat")
    cfg = TransportConfig(generation=GenerationConfig(steps=1, height=32, width=32), channels=chans,
                          mode="two_pass", progress=False)
    with pytest.raises(MassactError, match="not supported for the 'pixart' family yet; accepted: flux"):
        transport(tiny_pixart, src, ["a dog"], None, cfg)


def test_cli_no_control(tiny_flux_dir, stats_dir, tmp_path, capsys):
    code = cli(["transport", "--model", str(tiny_flux_dir), "--stats", str(stats_dir), "--num-steps", "2",
                "--height", "32", "--width", "32", "--source-prompt", "a red cat", "--target-prompt", "a dog",
                "--no-control", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "result -> source" in out and "result -> target" not in out
    assert TransportResult.load(tmp_path / "o").target is None
    assert not (tmp_path / "o" / "target.png").exists()


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
def test_pairs_with_different_token_masks_match_single_pair_runs(tiny_flux, stats_dir, mode):
    # Three pairs, two sharing a mask (one group) and one on its own: each result must equal the
    # pair transported alone with its own mask and seed.
    srcs, tgts = SRC + ["a yellow moon"], TGT + ["a small house"]
    p = torch.zeros(3, 8, 8, dtype=torch.bool)
    p[0, :4] = p[2, :4] = True
    p[1, :, 5:] = True
    kw = dict(k=3, alpha=0.8, mode=mode, progress=False)
    many = transport(tiny_flux, srcs, tgts, stats_dir, TransportConfig(generation=GEN, token_mask=p, **kw))
    for j in range(3):
        g = GenerationConfig(**{**GEN.to_json(), "seed": GEN.seed + j})
        cfg = TransportConfig(generation=g, token_mask=p[j], **kw)
        one = transport(tiny_flux, srcs[j], tgts[j], stats_dir, cfg)
        torch.testing.assert_close(many.result[j], one.result[0], rtol=1e-4, atol=1e-5)
    assert (many.result - many.target).abs().amax((1, 2, 3)).min() > 1e-4


def test_image_conditioned_transport(tiny_flux, stats_dir, tmp_path):
    img = torch.rand(3, 32, 32)
    save_png(tmp_path / "src.png", img)
    src = ImageSource(str(tmp_path / "src.png"), "a red cat")
    base = dict(generation=GEN, k=4, mode="two_pass", progress=False)
    r = transport(tiny_flux, src, TGT, stats_dir, TransportConfig(**base))
    assert r.source.shape == r.target.shape == (2, 3, 32, 32)
    assert (r.result - r.target).abs().max() > 0
    r0 = transport(tiny_flux, src, TGT, stats_dir, TransportConfig(alpha=0.0, **base))
    assert torch.equal(r0.result, r0.target)
    with pytest.raises(MassactError, match="two_pass"):
        transport(tiny_flux, src, TGT, stats_dir, TransportConfig(**{**base, "mode": "batched"}))
    bad = ImageSource(torch.zeros(1, 3, 16, 16), "a red cat")
    with pytest.raises(MassactError, match="shape"):
        transport(tiny_flux, bad, TGT, stats_dir, TransportConfig(**base))
    # Under true CFG the real image has no unconditional values to carry: refused, not mixed.
    cfg_gen = GenerationConfig(**{**GEN.to_json(), "extra": {"true_cfg_scale": 4.0,
                                                             "negative_prompt": "a black square"}})
    with pytest.raises(MassactError, match="true classifier-free guidance .* not supported"):
        transport(tiny_flux, src, TGT, stats_dir, TransportConfig(**{**base, "generation": cfg_gen}))


# -- CLI: bad input is one line and a non-zero exit -------------------------------------------
def _bad_mask(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((3, 3), dtype=bool))
    return str(tmp_path / "m.npy")


@pytest.mark.parametrize("extra,needle", [
    (["--source-prompt", "a", "--source-prompt", "b", "--target-prompt", "c"], "2 source prompts for 1"),
    (["--source-prompt", "a", "--target-prompt", "c", "--k", "33"], "k=33 is out of range"),
    (["--source-prompt", "a", "--target-prompt", "c", "--mask", "MASK"], "token mask has shape (3, 3)"),
    (["--source-prompt", "a", "--target-prompt", "c", "--sites", "single_transformer_blocks.7"],
     "unknown site"),
    (["--source-image", "nope.png", "--source-caption", "x", "--target-prompt", "c", "--mode", "two_pass"],
     "does not exist"),
    (["--target-prompt", "c"], "no source given"),
])
def test_cli_bad_input(tiny_flux_dir, stats_dir, tmp_path, capsys, extra, needle):
    extra = [_bad_mask(tmp_path) if e == "MASK" else e for e in extra]
    code = cli(["transport", "--model", str(tiny_flux_dir), "--stats", str(stats_dir), "--num-steps", "1",
                "--height", "32", "--width", "32", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_cli_site_missing_from_stats(tiny_flux_dir, tiny_flux, tmp_path, capsys):
    st = collect_stats(tiny_flux, ["a cat"], StatsConfig(GenerationConfig(steps=1, height=32, width=32), k=2,
                                                          sites=[0], progress=False))
    st.save(tmp_path / "st")
    code = cli(["transport", "--model", str(tiny_flux_dir), "--stats", str(tmp_path / "st"),
                "--num-steps", "1", "--height", "32", "--width", "32", "--source-prompt", "a",
                "--target-prompt", "b", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not in the statistics run" in err[0], err


def test_union_mask_is_the_segmentation_probes_target_and_source_masks(tiny_flux, stats_dir):
    from massact_nn.tracing.probes.segmentation import SegmentConfig, segment

    g = GenerationConfig(steps=2, seed=3, height=32, width=32)
    r = transport(tiny_flux, SRC, TGT, stats_dir, TransportConfig(generation=g, k=4, token_mask="union",
                                                                  progress=False))
    for j in range(2):
        seg = dict(stats=stats_dir, k=4, controls=("top",), generation=GenerationConfig(
            steps=2, seed=3 + j, height=32, width=32))
        want = segment(tiny_flux, SegmentConfig(prompt=TGT[j], **seg)).mask
        want = want | segment(tiny_flux, SegmentConfig(prompt=SRC[j], **seg)).mask
        assert torch.equal(r.token_mask[j], want)
    assert r.meta["token_mask"] == "union"


def test_full_transport_identity_on_the_toy():
    from massact_nn.tracing.model import load_model, toy_path

    if not (toy_path() / "model_index.json").is_file():
        pytest.skip("the embedded toy model is not shipped in this checkout yet")
    toy = load_model("toy")
    chans = {s.module: torch.arange(s.channels) for s in sites_of(toy)}
    g = GenerationConfig(steps=4, seed=1)
    src, tgt = ["a red circle on a blue background"], ["a green square on a white background"]
    full = transport(toy, src, tgt, None, TransportConfig(generation=g, channels=chans, copy_norm_out=True,
                                                          progress=False))
    assert torch.equal(full.result, full.source) and (full.target - full.source).abs().max() > 1e-2
    cfg = TransportConfig(generation=g, channels=chans, alpha=0.0, progress=False)
    none = transport(toy, src, tgt, None, cfg)
    assert torch.equal(none.result, none.target)


@pytest.mark.parametrize("posterior", ["mode", "sample"])
def test_image_source_at_step_zero_shares_the_targets_noise(tiny_flux, every_channel, posterior):
    # At the first step t = 1 the noised real image is pure noise, drawn with the pair's seed: the
    # very noise the target starts from. With the target's own prompt as caption the source's
    # activations at step 0 are then the target's, so transporting all of them changes nothing.
    # A sampled posterior must not take the noise's place as the generator's first draw.
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    g = GenerationConfig(steps=3, seed=4, height=32, width=32)
    cfg = TransportConfig(generation=g, mode="two_pass", channels=every_channel, steps="0", progress=False)
    same = transport(tiny_flux, ImageSource(img, TGT[0], posterior=posterior), TGT[:1], None, cfg)
    assert torch.equal(same.result, same.target)
    if posterior == "sample":
        return
    other = transport(tiny_flux, ImageSource(img, SRC[0]), TGT[:1], None, cfg)
    assert (other.result - other.target).abs().max() > 1e-5



# -- the intervention, read back by independent plain hooks -----------------------------------
# Where each checked site's image stream is read: the input of the module that consumes it.
NEXT = {"transformer_blocks.0": "transformer_blocks.1",
        "transformer_blocks.1": "single_transformer_blocks.0",
        "single_transformer_blocks.0": "single_transformer_blocks.1"}


def _streams(model, run) -> dict[str, list[torch.Tensor]]:
    """Each checked site's image stream at every transformer call of ``run()``, via plain hooks."""
    seen: dict[str, list[torch.Tensor]] = {s: [] for s in NEXT}
    tr = model.pipeline.transformer
    hooks = [tr.get_submodule(nxt).register_forward_pre_hook(
        lambda mod, args, kwargs, s=s: seen[s].append(kwargs["hidden_states"].detach().clone()),
        with_kwargs=True) for s, nxt in NEXT.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _by_role(calls: list[torch.Tensor], mode: str, n: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Per step: the source, target and result rows, from the batch layout of each mode."""
    if mode == "batched":  # one pass of [sources; targets; results]
        return [{"src": x[:n], "tgt": x[n:2 * n], "res": x[2 * n:]} for x in calls]
    # two passes: [sources], then [targets; results]
    return [{"src": calls[i][:n], "tgt": calls[steps + i][:n], "res": calls[steps + i][n:]}
            for i in range(steps)]


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_partial_transport_writes_the_source_into_p_x_topk_only(tiny_flux, stats_dir, mode, alpha):
    from massact_nn.stats import ChannelStats

    st = ChannelStats.load(stats_dir)
    # The top-3 channels by |channel mean|, straight from the statistics, per site.
    top = {s: torch.topk(st.stat(s, "abs_mean"), 3).indices.sort().values for s in NEXT}
    assert len({tuple(t.tolist()) for t in top.values()}) > 1, "sites must differ for the test to mean much"
    p = torch.zeros(8, 8, dtype=torch.bool)
    p[2:6, 1:7] = True
    tokens = p.flatten().nonzero().flatten()
    cfg = TransportConfig(generation=GEN, k=3, token_mask=p, alpha=alpha, steps="1:", mode=mode,
                          sites=list(NEXT), progress=False)
    out = {}
    seen = _streams(tiny_flux, lambda: out.setdefault("r", transport(tiny_flux, SRC, TGT, stats_dir, cfg)))
    r = out["r"]
    for s in NEXT:
        assert r.channels[s].sort().values.tolist() == top[s].tolist(), s
    first = next(iter(NEXT))
    n, steps = len(TGT), GEN.steps
    for s in NEXT:
        rows = _by_role(seen[s], mode, n, steps)
        assert len(rows) == steps
        # Step 0 is outside the window: the result is still the target, bit for bit.
        assert torch.equal(rows[0]["res"], rows[0]["tgt"]), s
        for i in (1, 2):
            res, src, tgt = (rows[i][k][:, tokens][:, :, top[s]] for k in ("res", "src", "tgt"))
            if alpha == 1.0:
                assert torch.equal(res, src), (s, i)
            outside = rows[i]["res"].clone()
            outside[:, tokens[:, None], top[s]] = rows[i]["tgt"][:, tokens[:, None], top[s]]
            if s == first and i == 1:
                # Before the first edit the result row is the target: the blend is exact there,
                # and nothing outside p x m changed.
                torch.testing.assert_close(res, (1 - alpha) * tgt + alpha * src, rtol=1e-6, atol=1e-6)
                assert torch.equal(outside, rows[i]["tgt"]), "entries outside p x m must be untouched"
            assert not torch.equal(rows[i]["res"], rows[i]["src"]), "only p x m may come from the source"
    # The reported distances are over the pixels under p (each token a 4 x 4 pixel patch here).
    pix = p.repeat_interleave(4, 0).repeat_interleave(4, 1)
    for name, ref in (("to_source", r.source), ("to_target", r.target)):
        err = (r.result - ref).pow(2).mean(1)  # [n, H, W]
        per = r.metrics[name]["per_pair"]
        torch.testing.assert_close(torch.tensor(per["inside"]), err[:, pix].mean(1), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(torch.tensor(per["outside"]), err[:, ~pix].mean(1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
def test_full_transport_writes_the_whole_source_stream_at_every_site(tiny_flux, every_channel, mode):
    # The identity on images could hold through norm_out's copy alone; every site must carry it.
    cfg = TransportConfig(generation=GEN, channels=every_channel, mode=mode, copy_norm_out=True,
                          sites=list(NEXT), progress=False)
    seen = _streams(tiny_flux, lambda: transport(tiny_flux, SRC, TGT, None, cfg))
    for s in NEXT:
        for i, rows in enumerate(_by_role(seen[s], mode, len(TGT), GEN.steps)):
            assert torch.equal(rows["res"], rows["src"]), (s, i)
            assert not torch.equal(rows["tgt"], rows["src"])


def test_a_bad_token_mask_lists_every_accepted_kind(tmp_path):
    for spec in (str(tmp_path / "missing.npy"), 3.5):
        with pytest.raises(MassactError, match="accepted: 'all', 'target', 'source', 'union', "):
            resolve_token_mask(spec, (8, 8), 1, {})


def test_token_mask_refuses_soft_and_transposed_masks():
    grid = (2, 3)
    m = torch.tensor([[0, 1, 0], [0, 0, 1]])
    assert token_mask(m, grid).tolist() == [False, True, False, False, False, True]
    with pytest.raises(MassactError, match="values other than 0 and 1"):
        token_mask(torch.full(grid, 0.1), grid)  # .bool() would put every token inside
    with pytest.raises(MassactError, match="values other than 0 and 1"):
        token_mask(m * 255, grid)
    with pytest.raises(MassactError, match=r"shape \(3, 2\); accepted: the token grid \(2, 3\)"):
        token_mask(m.T, grid)  # same token count, tokens in the wrong places
    with pytest.raises(MassactError, match="needs the token grid"):
        token_mask(m, 6)


def test_channel_ids_must_be_integers_not_a_boolean_mask():
    bool_mask = torch.zeros(8, dtype=torch.bool)
    bool_mask[[5, 6]] = True
    with pytest.raises(MassactError, match="channel ids of dtype torch.bool; accepted: integer ids"):
        channel_mask(bool_mask, 8)  # read as ids it would select channels 0 and 1
    with pytest.raises(MassactError, match="dtype torch.float32"):
        channel_mask(torch.tensor([5.9]), 8)
    assert channel_mask(bool_mask.nonzero().flatten(), 8).tolist() == bool_mask.tolist()


def test_full_blend_keeps_the_targets_dtype():
    t = torch.zeros(1, 2, 2, dtype=torch.bfloat16)
    s = torch.ones(1, 2, 2, dtype=torch.float32)
    m = torch.ones(2, 2, dtype=torch.bool)
    for alpha in (1.0, 0.5):
        assert blend(t, s, m, alpha).dtype == torch.bfloat16


def test_no_pairs_is_refused_with_a_clear_error(tiny_flux, every_channel):
    with pytest.raises(MassactError, match="no target prompts given; accepted: one or more"):
        cfg = TransportConfig(channels=every_channel, judge=False, progress=False)
        transport(tiny_flux, [], [], None, cfg)


def test_cli_channels_with_a_segmentation_mask_uses_the_stats_for_the_mask(
    tiny_flux_dir, tiny_flux, stats_dir, tmp_path
):
    import json as _json

    chans = {s.module: [0, 1] for s in sites_of(tiny_flux)}
    (tmp_path / "ch.json").write_text(_json.dumps(chans))
    code = cli(["transport", "--model", str(tiny_flux_dir), "--stats", str(stats_dir), "--channels",
                str(tmp_path / "ch.json"), "--mask", "target", "--num-steps", "2", "--height", "32",
                "--width", "32", "--source-prompt", SRC[0], "--target-prompt", TGT[0], "--out",
                str(tmp_path / "o")])
    assert code == 0
    back = TransportResult.load(tmp_path / "o")
    assert back.channels[sites_of(tiny_flux)[0].module].tolist() == [0, 1]
    assert 0 < back.token_mask.sum() < back.token_mask.numel()  # the segmentation's mask, not all


def test_image_conditioned_transport_takes_per_pair_lists(tiny_flux, stats_dir):
    src = ImageSource(torch.rand(3, 32, 32) * 2 - 1, "a red cat")

    def cfg(extra: dict) -> TransportConfig:
        gen = GenerationConfig(steps=2, height=32, width=32, extra={**GEN.extra, **extra})
        return TransportConfig(generation=gen, k=4, mode="two_pass", progress=False, judge=False)

    negs = ["blurry", "dark"]
    both = transport(tiny_flux, src, TGT, stats_dir, cfg({"negative_prompt": negs}))
    one = transport(tiny_flux, src, TGT[1:], stats_dir, replace(cfg({"negative_prompt": negs[1]}),
                    generation=replace(cfg({"negative_prompt": negs[1]}).generation, seed=1)))
    assert both.result.shape == (2, 3, 32, 32)
    torch.testing.assert_close(both.result[1], one.result[0], rtol=1e-4, atol=1e-5)


def test_cli_image_source_defaults_to_two_pass(tiny_flux_dir, stats_dir, tmp_path, capsys):
    save_png(tmp_path / "src.png", torch.rand(3, 32, 32))
    code = cli(["transport", "--model", str(tiny_flux_dir), "--stats", str(stats_dir), "--num-steps", "1",
                "--height", "32", "--width", "32", "--source-image", str(tmp_path / "src.png"),
                "--source-caption", "a red cat", "--target-prompt", "a dog", "--out", str(tmp_path / "o")])
    assert code == 0 and TransportResult.load(tmp_path / "o").meta["mode"] == "two_pass"
    assert "stored " in capsys.readouterr().out  # two-pass prints what it stored


def test_a_transport_save_that_dies_midway_is_refused_on_load(tiny_flux, every_channel, tmp_path,
                                                             monkeypatch):
    import massact_nn.tracing.probes.transport as tr_mod

    cfg = TransportConfig(generation=GEN, channels=every_channel, judge=False, progress=False)
    r = transport(tiny_flux, SRC[0], TGT[0], None, cfg)
    save_transport(r, tmp_path)
    assert TransportResult.load(tmp_path).meta["target_prompts"] == [TGT[0]]

    def killed(*_a, **_k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tr_mod, "write_pngs", killed)
    with pytest.raises(KeyboardInterrupt):
        save_transport(r, tmp_path)  # dies while writing the images, over the older run
    with pytest.raises(MassactError):
        TransportResult.load(tmp_path)  # not the older run's metadata over newer files


def test_per_pair_second_encoder_prompts_are_refused(tiny_flux, stats_dir):
    # One entry per pair would reach the source row too, whose prompt is not the target's.
    gen = GenerationConfig(steps=1, height=32, width=32, extra={**GEN.extra, "prompt_2": ["x", "y"]})
    cfg = TransportConfig(generation=gen, k=4, progress=False, judge=False)
    with pytest.raises(MassactError, match=r"prompt_2 is a list of 2; transport takes no per-pair "
                                           r"prompt_2.*accepted: one string for every row"):
        transport(tiny_flux, SRC[:2], TGT[:2], stats_dir, cfg)
