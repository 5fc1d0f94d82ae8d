"""Every covered DiT family, end to end on a tiny random pipeline.

`collect_stats` (nnsight) is compared with an independent plain-PyTorch computation: forward
hooks on the plain diffusers pipeline that take the image tokens from the layout knowledge
written below (read from the diffusers 0.42.1 sources), not from the library's adapters.
"""

from __future__ import annotations

import pytest
import torch
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.stats import StatsConfig, collect_stats
from massact_nn.tracing.testing.tiny import BUILDERS, CALL_DEFAULTS

PROMPTS = ["a red cat", "a large blue square on the left"]
STEPS, SIZE, SEED = 2, 32, 3


def _second(out, n):
    return out[1]


def _first(out, n):
    return out[0]


def _tensor(out, n):
    return out


def _last_n(out, n):
    assert out.shape[1] > n, "a joint text+image tensor must hold more than the image tokens"
    return out[:, -n:]


def _first_n(out, n):
    return out[:, :n]


def _first_n_joint(out, n):
    assert out.shape[1] > n, "a joint image+text tensor must hold more than the image tokens"
    return out[:, :n]


# Where each block list's image stream is, per family: the test's own reading of the sources.
IMAGE_OF = {
    "flux": {"transformer_blocks": _second, "single_transformer_blocks": _second},
    "flux2": {"transformer_blocks": _second, "single_transformer_blocks": _last_n},
    "flux2dev": {"transformer_blocks": _second, "single_transformer_blocks": _last_n},
    "qwenimage": {"transformer_blocks": _second},
    "sana": {"transformer_blocks": _tensor},
    "sanasprint": {"transformer_blocks": _tensor},
    "pixart": {"transformer_blocks": _tensor},
    "pixartalpha": {"transformer_blocks": _tensor},
    "sd3": {"transformer_blocks": _second},
    "chroma": {"transformer_blocks": _second, "single_transformer_blocks": _last_n},
    "cogview4": {"transformer_blocks": _first},
    "auraflow": {"joint_transformer_blocks": _second, "single_transformer_blocks": _last_n},
    "zimage": {"noise_refiner": _first_n, "layers": _first_n_joint},
    "bria": {"transformer_blocks": _second, "single_transformer_blocks": _second},
    "cogview3plus": {"transformer_blocks": _first},
    "hunyuandit": {"blocks": _tensor},
    "ovis": {"transformer_blocks": _second, "single_transformer_blocks": _second},
    "krea2": {"transformer_blocks": _last_n},
}
FAMILIES = sorted(IMAGE_OF)

# Pipeline kwargs with guidance off, and (kwargs, mode) with guidance on.
_NEG = {"negative_prompt": [""] * len(PROMPTS)}
GUIDANCE_OFF = {f: {"guidance_scale": 1.0} for f in FAMILIES} | {
    "flux": {}, "qwenimage": {}, "zimage": {}, "krea2": {"guidance_scale": 0.0},
    "flux2dev": {},  # guidance-distilled: the default 4.0 is an embedding, one call per step
    "sanasprint": {},  # likewise
}
GUIDANCE_ON = {
    "flux": ({"true_cfg_scale": 2.0, **_NEG}, "two_calls"),
    "flux2": ({"guidance_scale": 3.0}, "two_calls"),
    "qwenimage": ({"true_cfg_scale": 3.0, **_NEG}, "two_calls"),
    "chroma": ({"guidance_scale": 3.0}, "two_calls"),
    "cogview4": ({"guidance_scale": 3.0}, "two_calls"),
    "sana": ({"guidance_scale": 3.0}, "batched"),
    "pixart": ({"guidance_scale": 3.0}, "batched"),
    "pixartalpha": ({"guidance_scale": 3.0}, "batched"),
    "sd3": ({"guidance_scale": 3.0}, "batched"),
    "auraflow": ({"guidance_scale": 3.0}, "batched"),
    "bria": ({"guidance_scale": 3.0}, "batched"),
    "cogview3plus": ({"guidance_scale": 3.0}, "batched"),
    "hunyuandit": ({"guidance_scale": 3.0}, "batched"),
    "ovis": ({"guidance_scale": 3.0}, "two_calls"),
    "krea2": ({"guidance_scale": 3.0}, "two_calls"),
}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``get(family, plant=None)``: the family's tiny pipeline folder loaded as a DiffusionModel
    (built and loaded once per session)."""
    from massact_nn.tracing.model import load_model

    cache: dict = {}

    def get(family: str, plant: tuple[int, float] | None = None):
        key = (family, plant)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            BUILDERS[family](folder, seed=0 if plant is None else 1, plant=plant)
            cache[key] = (folder, load_model(folder))
        return cache[key]

    return get


def _extra(family: str, guidance: dict) -> dict:
    return {**CALL_DEFAULTS[family], **guidance}


def _stats(model, family: str, guidance: dict, include_uncond: bool = False):
    extra = _extra(family, guidance)
    scale = extra.pop("guidance_scale", None)  # the library's own knob (the folder may declare one)
    gen = GenerationConfig(steps=STEPS, seed=SEED, height=SIZE, width=SIZE, guidance_scale=scale, extra=extra)
    return collect_stats(model, PROMPTS, StatsConfig(gen, include_uncond=include_uncond, progress=False))


def hook_stats(folder, family: str, guidance: dict, mode: str = "none", branch: str = "cond"):
    """The statistics by plain forward hooks on the plain diffusers pipeline.

    ``branch`` picks what is counted under guidance: ``"cond"``, ``"uncond"`` or ``"both"``.

    Returns ``({module: {"abs_mean", "mean_abs", "max_abs"}}, calls, rows_per_call)``.
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    tr = pipe.transformer
    n = len(PROMPTS)
    state = {"call": -1, "n_img": 0, "rows": set()}
    acc: dict[str, dict] = {}

    def pre(module, args, kwargs):
        state["call"] += 1
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if isinstance(hs, list):  # Z-Image: one [C, frames, H, W] latent per sample, 2×2 patches
            state["n_img"] = (hs[0].shape[-2] // 2) * (hs[0].shape[-1] // 2)
        elif hs.ndim == 3:  # packed token sequence: every token is an image token
            state["n_img"] = hs.shape[1]
        else:  # latent image [B, C, H, W], patchified inside the transformer
            p = tr.config.patch_size
            state["n_img"] = (hs.shape[-2] // p) * (hs.shape[-1] // p)

    def make_hook(name, image_of):
        def hook(module, args, out):
            h = image_of(out, state["n_img"]).detach().float()
            state["rows"].add(h.shape[0])
            if mode == "two_calls":  # conditional call first, then the unconditional one
                if branch != "both" and (state["call"] % 2 == 0) != (branch == "cond"):
                    return
            elif mode == "batched" and branch != "both":
                h = h[n:] if branch == "cond" else h[:n]  # rows are [uncond; cond]
            a = acc.setdefault(name, {"m": [], "mean_abs": [], "max": []})
            a["m"].append(h.mean(1).abs())
            a["mean_abs"].append(h.abs().mean(1))
            a["max"].append(h.abs().amax((0, 1)))

        return hook

    handles = [tr.register_forward_pre_hook(pre, with_kwargs=True)]
    for attr, image_of in IMAGE_OF[family].items():
        for i, block in enumerate(getattr(tr, attr)):
            handles.append(block.register_forward_hook(make_hook(f"{attr}.{i}", image_of)))
    gens = [torch.Generator().manual_seed(SEED + i) for i in range(n)]
    with torch.no_grad():
        pipe(prompt=PROMPTS, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=gens,
             **_extra(family, guidance))
    for h in handles:
        h.remove()
    out = {
        name: {
            "abs_mean": torch.cat(a["m"]).mean(0),
            "mean_abs": torch.cat(a["mean_abs"]).mean(0),
            "max_abs": torch.stack(a["max"]).amax(0),
        }
        for name, a in acc.items()
    }
    return out, state["call"] + 1, state["rows"]


RTOL, ATOL = 1e-5, 1e-6


def _assert_same(stats, ref):
    assert [s.module for s in stats.sites] == list(ref)
    for module, r in ref.items():
        for key, expected in r.items():
            torch.testing.assert_close(stats.stat(module, key), expected, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, module=module, key=key: f"{module} {key}: {m}")


def _matches(stats, ref) -> bool:
    return all(
        torch.allclose(stats.stat(m, key), v, rtol=RTOL, atol=ATOL)
        for m, r in ref.items()
        for key, v in r.items()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_hooks_without_guidance(family, family_model):
    folder, model = family_model(family)
    stats = _stats(model, family, GUIDANCE_OFF[family])
    ref, calls, rows = hook_stats(folder, family, GUIDANCE_OFF[family])
    assert calls == STEPS and rows == {len(PROMPTS)}, "guidance should be off"
    assert stats.meta["calls_per_step"] == 1 and stats.meta["guidance"] == "none"
    _assert_same(stats, ref)


def test_metadata_records_the_guidance_the_pipeline_defaulted_to(family_model):
    # No guidance_scale given: SANA runs its own default (> 1, so batched CFG); the run says so.
    import inspect

    _, model = family_model("sana")
    default = inspect.signature(type(model.pipeline).__call__).parameters["guidance_scale"].default
    gen = GenerationConfig(steps=1, seed=SEED, height=SIZE, width=SIZE, extra=CALL_DEFAULTS["sana"])
    st = collect_stats(model, PROMPTS[:1], StatsConfig(gen, progress=False))
    assert st.meta["guidance_scale"] is None and default > 1
    assert st.meta["guidance_scale_used"] == default and st.meta["guidance"] == "batched [uncond; cond]"


@pytest.mark.parametrize("family", sorted(GUIDANCE_ON))
def test_guidance_measures_conditional_rows_and_counts_both_on_request(family, family_model):
    folder, model = family_model(family)
    guidance, mode = GUIDANCE_ON[family]
    cond = _stats(model, family, guidance)
    ref, calls, rows = hook_stats(folder, family, guidance, mode)
    # Guidance really ran, in the structure the family's pipeline uses.
    n = len(PROMPTS)
    assert (calls, rows) == ((2 * STEPS, {n}) if mode == "two_calls" else (STEPS, {2 * n}))
    assert cond.meta["calls_per_step"] == (2 if mode == "two_calls" else 1)
    assert cond.meta["guidance"] == ("two calls per step (cond, then uncond)" if mode == "two_calls"
                                     else "batched [uncond; cond]")
    for key in ("guidance_scale", "true_cfg_scale"):
        if key in guidance:
            assert cond.meta[f"{key}_used"] == guidance[key]
    _assert_same(cond, ref)

    # The unconditional branch alone does not pass the same check: the check tells them apart.
    assert not _matches(cond, hook_stats(folder, family, guidance, mode, branch="uncond")[0])

    both = _stats(model, family, guidance, include_uncond=True)
    ref_both, _, _ = hook_stats(folder, family, guidance, mode, branch="both")
    _assert_same(both, ref_both)
    assert not _matches(both, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_channel_is_top1_at_every_site(family, family_model):
    channel = 5
    _, model = family_model(family, plant=(channel, 1000.0))
    stats = _stats(model, family, GUIDANCE_OFF[family])
    # The plant is written by the first block and carried by the residual stream to every later
    # one, except past a Hunyuan-DiT long-skip block, which replaces its input by a projection.
    tr = model.pipeline.transformer
    reached = [s for s in stats.sites if getattr(tr.get_submodule(s.module), "skip_linear", None) is None]
    assert len(reached) >= 2
    for s in reached:
        assert stats.top(s.module, 1).tolist() == [channel], s.module


def test_zimage_guidance_is_refused_with_the_accepted_setting(family_model):
    from massact_nn.errors import MassactError

    _, model = family_model("zimage")
    with pytest.raises(MassactError, match=r"guidance_scale=3\.0: .*accepted: guidance_scale=0"):
        _stats(model, "zimage", {"guidance_scale": 3.0})


# FLUX.1's tiny folder declares no call defaults; its CLI run is tested in test_stats_flux.py.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "flux"])
def test_cli_stats_matches_hooks(family, family_model, tmp_path):
    """``massact stats`` on the folder alone (its massact.json) matches the hooks."""
    from massact_nn.tracing.cli.main import main as cli

    from massact_nn.stats import ChannelStats

    folder, _ = family_model(family)
    argv = ["stats", "--model", str(folder), "--steps", str(STEPS), "--seed", str(SEED),
            "--height", str(SIZE), "--width", str(SIZE), "--out", str(tmp_path / "run")]
    for p in PROMPTS:
        argv += ["--prompt", p]
    if "guidance_scale" in GUIDANCE_OFF[family]:
        argv += ["--guidance-scale", str(GUIDANCE_OFF[family]["guidance_scale"])]
    assert cli(argv) == 0
    ref, calls, _ = hook_stats(folder, family, GUIDANCE_OFF[family])
    assert calls == STEPS
    _assert_same(ChannelStats.load(tmp_path / "run"), ref)


def _grid_of_input(tr, args, kwargs) -> tuple[int, int]:
    """The image token grid as the transformer's own input lays it out (rows, cols).

    Unpacked latents give it by their shape; packed token sequences by the row and column ids
    diffusers passes alongside them (FLUX-style ``img_ids``, Qwen-Image's ``img_shapes``).
    """
    hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if isinstance(hs, list):  # Z-Image: one [C, frames, H, W] latent per sample, 2x2 patches
        return hs[0].shape[-2] // 2, hs[0].shape[-1] // 2
    if hs.ndim == 4:  # [B, C, H, W], patchified inside the transformer
        p = tr.config.patch_size
        return hs.shape[-2] // p, hs.shape[-1] // p
    n = hs.shape[1]
    if "img_shapes" in kwargs:  # Qwen-Image: (frames, rows, cols) per sample
        _, rows, cols = kwargs["img_shapes"][0][0]
        return rows, cols
    ids = kwargs["img_ids"] if "img_ids" in kwargs else kwargs["position_ids"]
    ids = ids.reshape(-1, ids.shape[-1])
    ids = ids[-n:] if "img_ids" not in kwargs else ids  # Krea 2: [text; image] positions
    assert ids.shape[0] == n, "one id row per image token"
    rows, cols = len(ids[:, 1].unique()), len(ids[:, 2].unique())
    assert rows * cols == n
    return rows, cols


# AuraFlow's tiny build embeds positions up to an 8 x 8 grid.
NON_SQUARE = {"auraflow": (SIZE // 2, SIZE)}


@pytest.mark.parametrize("family", FAMILIES)
def test_token_grid_is_the_transformers_own_at_a_non_square_size(family, family_model):
    # Rows and columns swapped would pass every square test: here the image is twice as wide.
    from diffusers import DiffusionPipeline
    from massact_nn.tracing.model import model_adapter

    folder, model = family_model(family)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    height, width = NON_SQUARE.get(family, (SIZE, 2 * SIZE))
    seen: list[tuple[int, int]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(_grid_of_input(mod, args, kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt=PROMPTS[:1], num_inference_steps=STEPS, height=height, width=width,
                 generator=[torch.Generator().manual_seed(SEED)], output_type="latent",
                 **_extra(family, GUIDANCE_OFF[family]))
    finally:
        hook.remove()
    rows, cols = model_adapter(model).grid(model.pipeline, height, width)
    assert cols == 2 * rows, (rows, cols)
    assert set(seen) == {(rows, cols)}, (family, seen, (rows, cols))


def _input_tokens_by_hand(tr, args, kwargs, row: int) -> torch.Tensor:
    """The test's own reading of the transformer's image input for one row: [tokens, features]."""
    hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    x = hs[row]
    if x.ndim == 2:  # packed tokens
        return x
    if isinstance(hs, list):  # Z-Image: [C, frames, H, W], 2x2 patches
        x, p = x.flatten(0, 1), 2
    else:
        p = tr.config.patch_size
    return torch.nn.functional.unfold(x[None].float(), kernel_size=p, stride=p)[0].T


@pytest.mark.parametrize("family", FAMILIES)
def test_segmentation_runs_and_clusters_the_transformers_own_input(family, family_model):
    # The "input" baseline clusters the noisy latent tokens: whichever way the pipeline hands them
    # over (packed, a latent patchified inside, a list; by keyword or position).
    from massact_nn.tracing.probes.segmentation import SegmentConfig, segment

    from massact_nn.clustering import segment_tokens

    _, model = family_model(family)
    extra = _extra(family, GUIDANCE_OFF[family])
    scale = extra.pop("guidance_scale", None)
    gen = GenerationConfig(steps=STEPS, seed=SEED, height=SIZE, width=SIZE, guidance_scale=scale, extra=extra)
    stats = collect_stats(model, PROMPTS[:1], StatsConfig(gen, k=2, progress=False))
    seen: list[torch.Tensor] = []
    tr = model.pipeline.transformer
    hook = tr.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(_input_tokens_by_hand(mod, args, kwargs, 0).detach().float()),
        with_kwargs=True)
    try:
        cfg = SegmentConfig(stats=stats, prompt=PROMPTS[0], k=2, controls=("top",), generation=gen)
        r = segment(model, cfg)
    finally:
        hook.remove()
    rows, cols = r.mask.shape
    assert len(seen) == STEPS and seen[0].shape[0] == rows * cols
    assert r.meta["steps"] == [STEPS // 2]
    want, _ = segment_tokens([seen[STEPS // 2]], rows, cols, cfg.features, cfg.foreground, cfg.aggregation,
                             cfg.kmeans_seed)
    assert torch.equal(r.set_mask("input"), want)


def test_per_prompt_negative_prompts_follow_their_prompts_into_batches(family_model):
    # SANA runs [uncond; cond] in one call; counting the uncond rows makes the negatives matter.
    from massact_nn.errors import MassactError

    _, model = family_model("sana")
    prompts = ["a red cat", "a blue dog", "a green tree"]
    negs = ["blurry", "a cat", "dark"]

    def run(batch_size: int, negatives, ps=prompts):
        extra = {**CALL_DEFAULTS["sana"], "negative_prompt": negatives}
        gen = GenerationConfig(steps=1, seed=SEED, height=SIZE, width=SIZE, guidance_scale=3.0,
                               batch_size=batch_size, extra=extra)
        return collect_stats(model, ps, StatsConfig(gen, include_uncond=True, progress=False))

    whole, chunked = run(8, negs), run(2, negs)
    for key, x in whole.tensors.items():
        torch.testing.assert_close(chunked.tensors[key], x, rtol=1e-5, atol=1e-6, msg=key)
    other = run(8, ["blurry", "dark", "a cat"])  # the negatives do change what is measured
    assert not torch.allclose(other.tensors["abs_mean/transformer_blocks.0"],
                              whole.tensors["abs_mean/transformer_blocks.0"])
    with pytest.raises(MassactError, match="negative_prompt has 2 entries for 3 prompts"):
        run(2, negs[:2])


@pytest.mark.parametrize("family", ["zimage", "krea2"])
def test_transport_on_families_without_norm_out(family, family_model):
    # Their final layer is not called norm_out: the transport must not look for one unless asked.
    from massact_nn.tracing.probes.transport import TransportConfig, transport
    from massact_nn.tracing.sites import sites_of

    from massact_nn.errors import MassactError

    _, model = family_model(family)
    extra = _extra(family, GUIDANCE_OFF[family])
    scale = extra.pop("guidance_scale", None)
    gen = GenerationConfig(steps=STEPS, seed=SEED, height=SIZE, width=SIZE, guidance_scale=scale, extra=extra)
    every = {s.module: torch.arange(s.channels) for s in sites_of(model)}
    cfg = TransportConfig(generation=gen, channels=every, progress=False)
    r = transport(model, PROMPTS[0], PROMPTS[1], None, cfg)
    assert not torch.equal(r.source, r.target) and torch.equal(r.result, r.source)
    with pytest.raises(MassactError, match="copy_norm_out=True, but .* has no norm_out"):
        transport(model, PROMPTS[0], PROMPTS[1], None, TransportConfig(generation=gen, channels=every,
                                                                       copy_norm_out=True, progress=False))


def test_per_prompt_negative_prompts_reach_their_rows_in_disruption_and_transport(family_model):
    # SANA's [uncond; cond] call makes each row's negative prompt matter to the image.
    from massact_nn.tracing.probes.disruption import DisruptionConfig, disrupt
    from massact_nn.tracing.probes.transport import TransportConfig, transport

    from massact_nn.errors import MassactError

    _, model = family_model("sana")
    prompts, negs = ["a red cat", "a blue dog", "a green tree"], ["blurry", "a cat", "dark"]

    def gen(negatives, batch_size=8, seed=SEED):
        extra = {**CALL_DEFAULTS["sana"], "negative_prompt": negatives}
        return GenerationConfig(steps=1, seed=seed, height=SIZE, width=SIZE, guidance_scale=3.0,
                                batch_size=batch_size, extra=extra)

    stats = collect_stats(model, prompts, StatsConfig(gen(negs), progress=False))
    dcfg = lambda g: DisruptionConfig(g, k=2, controls=("top",), judge=False, progress=False)  # noqa: E731
    whole = disrupt(model, prompts, stats, dcfg(gen(negs))).images
    chunked = disrupt(model, prompts, stats, dcfg(gen(negs, batch_size=2))).images
    alone = disrupt(model, prompts[1:2], stats, dcfg(gen(negs[1], seed=SEED + 1))).images
    for name, x in whole.items():
        torch.testing.assert_close(chunked[name], x, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(alone[name][0], x[1], rtol=1e-4, atol=1e-5, msg=name)
    swapped = disrupt(model, prompts, stats, dcfg(gen(negs[::-1]))).images
    assert not torch.allclose(swapped["none"][0], whole["none"][0])

    sources, targets = ["a red cat", "a blue dog"], ["a green tree", "a yellow car"]
    tcfg = lambda g, mode: TransportConfig(generation=g, k=2, mode=mode, judge=False,  # noqa: E731
                                           progress=False)
    for mode in ("batched", "two_pass"):
        both = transport(model, sources, targets, stats, tcfg(gen(negs[:2], batch_size=1), mode))
        second = transport(model, sources[1], targets[1], stats, tcfg(gen(negs[1], seed=SEED + 1), mode))
        for part in ("source", "target", "result"):
            torch.testing.assert_close(getattr(second, part)[0], getattr(both, part)[1], rtol=1e-4,
                                       atol=1e-5, msg=f"{mode} {part}")
    with pytest.raises(MassactError, match="negative_prompt has 3 entries for 2 pairs"):
        transport(model, sources, targets, stats, tcfg(gen(negs), "batched"))
