"""The segmentation probe and the real-image path on a tiny FLUX.1, against planted ground truth
and plain-PyTorch hooks on diffusers' own pipelines."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.probes.real_image import (
    decode_latents,
    encode_image,
    noise_to,
    noised_image,
    real_image_activations,
    trajectory_t_values,
)
from massact_nn.tracing.probes.segmentation import SegmentConfig, segment
from massact_nn.tracing.sites import sites_of
from massact_nn.tracing.stats import StatsConfig, collect_stats
from massact_nn.tracing.toy.export import is_shipped

from massact_nn.clustering import segment_tokens
from massact_nn.errors import MassactError
from massact_nn.masks import centre_blob, check_complement, load_png_mask, save_png_mask, upsample_nearest
from massact_nn.segmentation_result import SegmentationResult
from massact_nn.world import World

EXTRA = {"max_sequence_length": 16, "guidance_scale": 0.0}
GEN = GenerationConfig(steps=3, seed=5, height=32, width=32, extra=EXTRA)
PLANT_SITE, PLANT_CHANNEL, A = "transformer_blocks.0", 11, 100.0
REGION = torch.zeros(8, 8, dtype=torch.bool)
REGION[2:6, 1:4] = True  # 12 of 64 tokens, off the border: minority and inside the frame


@pytest.fixture(scope="module")
def world_image():
    wb = World(0).sample(1, seed=3)
    return torch.from_numpy(wb.images), wb.captions[0], torch.from_numpy(wb.masks[0])


@pytest.fixture(scope="module")
def planted(tiny_flux):
    """The tiny Flux with +A on REGION and -A elsewhere written onto one channel at one site
    by an nnsight edit (replayed on every later trace, at every transformer call), and the
    statistics measured on it."""
    pattern = torch.where(REGION.flatten(), A, -A)
    with tiny_flux.edit() as (tracer, edited):
        for _ in tracer.iter[: GEN.steps]:
            out = edited.transformer.get(PLANT_SITE).output
            img = out[1].clone()
            img[:, :, PLANT_CHANNEL] = pattern
            edited.transformer.get(PLANT_SITE).output = (out[0], img)
    stats = collect_stats(edited, ["a red cat", "a blue sea"],
                          StatsConfig(generation=GEN, k=2, progress=False))
    return edited, stats


# -- planted ground truth ------------------------------------------------------------------------
def test_planted_channel_is_selected_from_statistics(planted):
    _, stats = planted
    assert stats.top(PLANT_SITE, 1).tolist() == [PLANT_CHANNEL]


# The edit was recorded for GEN.steps transformer calls; the real-image path makes only one.
@pytest.mark.filterwarnings("ignore:.*was never reached")
@pytest.mark.parametrize("source", ["prompt", "image"])
def test_segmentation_recovers_the_planted_region(planted, world_image, source):
    model, stats = planted
    img, caption, _ = world_image
    # Steps belong to a generated trajectory; a real image is one call (steps are refused there).
    src = ({"prompt": "a red cat", "steps": "0:3"} if source == "prompt"
           else {"image": img, "caption": caption})
    cfg = SegmentConfig(stats=stats, k=1, sites=[PLANT_SITE, "transformer_blocks.1"], generation=GEN, **src)
    inputs: list[torch.Tensor] = []  # what the transformer consumed at each call, by a plain hook
    hook = model.pipeline.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: inputs.append(kwargs["hidden_states"][0].detach().float().clone()),
        with_kwargs=True)
    try:
        r = segment(model, cfg)
    finally:
        hook.remove()
    assert r.channels[f"top/{PLANT_SITE}"].tolist() == [PLANT_CHANNEL]
    assert torch.equal(r.mask, REGION)
    for key in (f"top/{PLANT_SITE}/0", "top/transformer_blocks.1/0"):
        assert torch.equal(r.per_block[key], REGION), key
    check_complement(r.mask, r.background)
    for name in ("all", "random", "low", "all_foreground", "centre", "input"):
        m = r.set_mask(name)
        assert m.shape == (8, 8) and m.dtype == torch.bool
    assert r.set_mask("all_foreground").all() and torch.equal(r.set_mask("centre"), centre_blob(8, 8))
    # The input baseline clusters the noisy tokens the transformer read, like the activations.
    assert len(inputs) == len(r.meta["steps"])
    want, _ = segment_tokens(inputs, 8, 8, cfg.features, cfg.foreground, cfg.aggregation, cfg.kmeans_seed)
    assert torch.equal(r.set_mask("input"), want)
    # the random control never draws the site's top-k
    assert PLANT_CHANNEL not in r.channels[f"random/{PLANT_SITE}"].tolist()
    assert r.meta["steps"] == ([0, 1, 2] if source == "prompt" else [0])


def test_without_the_plant_the_region_is_not_found(tiny_flux, planted):
    # The same channel on the unedited model carries no region: the test above can fail.
    _, stats = planted
    r = segment(tiny_flux, SegmentConfig(stats=stats, prompt="a red cat", k=1, sites=[PLANT_SITE],
                                         steps="1", generation=GEN))
    assert not torch.equal(r.mask, REGION)


# -- the real-image path -------------------------------------------------------------------------
def test_encode_decode_shapes_and_noising_at_zero(tiny_flux, world_image):
    img, _, _ = world_image
    z = encode_image(tiny_flux, img)
    assert z.shape == (1, 4, 16, 16)  # tiny VAE: factor 2
    assert decode_latents(tiny_flux, z).shape == (1, 3, 32, 32)
    noise = torch.randn_like(z)
    assert torch.equal(noise_to(z, 0.0, noise), z)
    assert torch.equal(noise_to(z, 1.0, noise), noise)
    n = noised_image(tiny_flux, img, [0.0, 0.5], 32, 32, seed=1)
    assert n.noisy.shape == (2, 64, 16)
    assert torch.equal(n.noisy[0], n.clean[0])
    with pytest.raises(MassactError, match="t=.*accepted: 0 <= t <= 1"):
        noise_to(z, 1.5, noise)
    with pytest.raises(MassactError, match=r"t=\[nan\] is out of range"):
        noise_to(z, float("nan"), noise)


def test_pil_images_of_any_mode_are_taken_as_rgb(tiny_flux, world_image):
    from massact_nn.tracing.probes.real_image import image_tensor
    from PIL import Image

    img, _, _ = world_image  # [1, 3, 32, 32] in [-1, 1]
    rgb = Image.fromarray(((img[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    want = image_tensor(tiny_flux, rgb, 32, 32)
    assert torch.equal(image_tensor(tiny_flux, rgb.convert("RGBA"), 32, 32), want)
    pal = rgb.convert("P")  # a palette image: its own (quantised) colours
    as_rgb = image_tensor(tiny_flux, pal.convert("RGB"), 32, 32)
    assert torch.equal(image_tensor(tiny_flux, pal, 32, 32), as_rgb)
    grey = image_tensor(tiny_flux, rgb.convert("L"), 32, 32)
    assert grey.shape == want.shape and torch.equal(grey[:, 0], grey[:, 1])


def test_16_bit_greyscale_images_keep_their_tones(tiny_flux, tmp_path):
    from massact_nn.tracing.probes.real_image import image_tensor, load_image
    from PIL import Image

    ramp16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    ramp8 = np.rint(ramp16 / 257.0).astype(np.uint8)
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    for mode_of_file in (load_image(tmp_path / "g16.png"), Image.open(tmp_path / "g16.png")):
        got = image_tensor(tiny_flux, mode_of_file, 32, 32)
        want = image_tensor(tiny_flux, Image.fromarray(ramp8, "L"), 32, 32)
        assert torch.equal(got, want)  # PIL's own convert("RGB") would clip it to white
        assert abs(float(got.mean())) < 0.01
    # Mode "I" holding 8-bit values (an in-memory convert("I")) keeps them as they are.
    as_i = Image.fromarray(ramp8, "L").convert("I")
    assert torch.equal(image_tensor(tiny_flux, as_i, 32, 32),
                       image_tensor(tiny_flux, Image.fromarray(ramp8, "L"), 32, 32))


def test_photos_load_upright_by_their_exif_orientation(tiny_flux, tmp_path):
    from massact_nn.tracing.probes.real_image import load_image
    from PIL import Image

    from massact_nn.images import load_png, mask_from_png
    from massact_nn.masks import load_png_mask

    # Stored 48 wide x 32 high, white on the left; Orientation 6 = shown rotated 90° clockwise:
    # 32 wide x 48 high, white on top.
    arr = np.zeros((32, 48), np.uint8)
    arr[:, :24] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).convert("RGB").save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "phone.jpg").size == (32, 48)
    assert load_png(tmp_path / "phone.jpg").shape == (3, 48, 32)
    mask = load_png_mask(tmp_path / "phone.jpg")
    assert mask.shape == (48, 32) and mask[:20].all() and not mask[28:].any()
    assert mask_from_png(tmp_path / "phone.jpg", (6, 4)).tolist() == [[True] * 4] * 3 + [[False] * 4] * 3


def test_palette_and_16_bit_masks_read_their_colours(tmp_path):
    from PIL import Image

    from massact_nn.masks import load_png_mask

    want = np.zeros((32, 32), bool)
    want[8:20, 4:12] = True
    pal = Image.fromarray(want.astype(np.uint8), "P")  # pixels are palette indices 0 and 1
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(want.astype(np.uint16) * 65535).save(tmp_path / "m16.png")
    Image.fromarray(want.astype(np.uint16) * 200).save(tmp_path / "dark16.png")  # 200 of 65535: dark
    assert np.array_equal(load_png_mask(tmp_path / "pal.png").numpy(), want)
    (tmp_path / "cut.png").write_bytes((tmp_path / "pal.png").read_bytes()[:-40])  # truncated
    with pytest.raises(MassactError, match="cannot be read as an image"):
        load_png_mask(tmp_path / "cut.png")
    assert np.array_equal(load_png_mask(tmp_path / "m16.png").numpy(), want)
    assert not load_png_mask(tmp_path / "dark16.png").any()


def test_bad_image_tensors_and_noise_levels_are_refused(tiny_flux, world_image):
    from massact_nn.tracing.probes.real_image import image_tensor

    img, _, _ = world_image
    with pytest.raises(MassactError, match=r"dtype uint8 .*accepted: a float tensor in \[-1, 1\]"):
        image_tensor(tiny_flux, ((img + 1) * 127.5).to(torch.uint8), 32, 32)
    with pytest.raises(MassactError, match=r"span \[0, 255\]; accepted: \[-1, 1\]"):
        image_tensor(tiny_flux, torch.linspace(0, 255, 3 * 32 * 32).reshape(1, 3, 32, 32), 32, 32)
    with pytest.raises(MassactError, match=r"shape \(32, 32, 3\); accepted"):
        image_tensor(tiny_flux, img[0].permute(1, 2, 0), 32, 32)
    for bad, needle in ((0.5, "t_values=0.5 is not a list"), (torch.tensor(0.5), "is not a list"),
                        (["x"], "t='x' is not a number"),
                        ([1.002], "t=1.002 is out of range"), ([-0.1], "t=-0.1 is out of range"),
                        ([], "no noise levels")):
        with pytest.raises(MassactError, match=re.escape(needle)):
            noised_image(tiny_flux, img, bad, 32, 32)


def _input_hooks(tr, store):
    """What the transformer consumes (packed latents, timestep x1000, text embeddings) and one
    block's image stream, first call only, by plain PyTorch hooks."""

    def keep(key, value):
        store.setdefault(key, value.detach().clone())

    return [
        tr.x_embedder.register_forward_pre_hook(lambda m, a: keep("x", a[0])),
        tr.time_text_embed.register_forward_pre_hook(lambda m, a: keep("t", a[0])),
        tr.context_embedder.register_forward_pre_hook(lambda m, a: keep("c", a[0])),
        tr.get_submodule("transformer_blocks.1").register_forward_hook(lambda m, a, o: keep("h", o[1])),
    ]


def test_transformer_input_at_t_matches_diffusers_img2img(tiny_flux, world_image):
    from diffusers import FluxImg2ImgPipeline

    img, caption, _ = world_image
    pipe = tiny_flux.pipeline
    ref, ours = {}, {}
    handles = _input_hooks(pipe.transformer, ref)
    try:  # 4 steps at strength 0.5 start at sigma 0.5; img2img samples the posterior, then noise
        FluxImg2ImgPipeline(**pipe.components)(
            prompt=caption, image=(img + 1) / 2, strength=0.5, num_inference_steps=4, height=32,
            width=32, generator=torch.Generator().manual_seed(7), output_type="latent", **EXTRA)
    finally:
        [h.remove() for h in handles]
    handles = _input_hooks(pipe.transformer, ours)
    try:
        act = real_image_activations(tiny_flux, img, caption, [0.5], sites=["transformer_blocks.1"],
                                     generation=GEN, seed=7, posterior="sample")
    finally:
        [h.remove() for h in handles]
    for key in ("x", "t", "c", "h"):
        assert torch.equal(ref[key], ours[key]), key
    assert float(ref["t"][0]) == 500.0
    assert torch.equal(act.tokens["transformer_blocks.1"], ref["h"])


def test_trajectory_t_values_are_what_the_pipeline_feeds(tiny_flux):
    seen = []
    h = tiny_flux.pipeline.transformer.time_text_embed.register_forward_pre_hook(
        lambda m, a: seen.append(float(a[0][0]) / 1000))
    try:
        tiny_flux.pipeline("a cat", num_inference_steps=4, height=32, width=32, output_type="latent",
                           **EXTRA)
    finally:
        h.remove()
    got = trajectory_t_values(tiny_flux, GenerationConfig(steps=4, height=32, width=32, extra=EXTRA))
    assert got == pytest.approx(seen, abs=1e-6) and len(got) == 4


# -- CLI and bad input ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_files(tiny_flux_dir, planted, world_image, tmp_path_factory):
    from massact_nn.images import save_png

    d = tmp_path_factory.mktemp("seg_cli")
    planted[1].save(d / "stats")
    img, caption, mask = world_image
    save_png(d / "img.png", (img[0] + 1) / 2)
    save_png_mask(d / "gt.png", mask)
    save_png_mask(d / "gt_small.png", mask[:16, :16])
    base = ["segment", "--model", str(tiny_flux_dir), "--stats", str(d / "stats"), "--height", "32",
            "--width", "32"]
    return d, caption, base


def test_cli_writes_the_run_folder(run_files, capsys):
    d, caption, base = run_files
    out = d / "out"
    code = cli([*base, "--image", str(d / "img.png"), "--caption", caption, "--t", "0.5",
                "--k", "2", "--sites", "3", "--gt-mask", str(d / "gt.png"), "--out", str(out)])
    assert code == 0
    for f in ("mask.png", "mask.npy", "overlay.png", "metrics.json", "result.safetensors", "meta.json"):
        assert (out / f).is_file(), f
    r = SegmentationResult.load(out)
    tokens = np.load(out / "mask.npy")
    assert tokens.dtype == bool and tokens.shape == (8, 8) and np.array_equal(tokens, r.mask.numpy())
    assert torch.equal(load_png_mask(out / "mask.png", (32, 32)), upsample_nearest(r.mask, 32, 32))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["iou"]) == {"top", "all", "random", "low", "all_foreground", "centre", "input"}
    assert metrics["iou"] == pytest.approx(r.iou(load_png_mask(d / "gt.png")))
    assert metrics["gt_mask"] == str((d / "gt.png").resolve())  # found from any working folder
    assert r.meta["t"] == 0.5 and r.meta["caption"] == caption


@pytest.mark.parametrize("extra, match", [
    (["--prompt", "a cat", "--gt-mask", "{d}/gt_small.png"], r"shape \(16, 16\); accepted: \(32, 32\)"),
    (["--prompt", "a cat", "--sites", "nope"], "unknown site 'nope'; accepted"),
    (["--prompt", "a cat", "--k", "999"], "k=999 is out of range; accepted: 1..32"),
    (["--image", "{d}/missing.png", "--caption", "x"], "image file .*missing.png.* does not exist"),
    (["--image", "{d}/img.png"], "needs a caption"),
    ([], "give exactly one source"),
])
def test_bad_input_one_line_nonzero_exit(run_files, capsys, extra, match):
    import re

    d, _, base = run_files
    args = [*base, "--num-steps", "2", *[a.format(d=d) for a in extra], "--out", str(d / "bad")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("massact: error:")
    assert re.search(match, err), err


# -- evaluation ----------------------------------------------------------------------------------
def test_evaluation_rows_controls_and_baseline_arithmetic(tiny_flux, planted):
    from massact_nn.tracing.probes.segmentation import evaluate_segmentation

    wb = World(0).sample(2, seed=9)
    rep = evaluate_segmentation(tiny_flux, planted[1], world_samples=wb, sites=[PLANT_SITE, 3],
                                steps=[1], t_values=(0.5,), k=2, random_draws=2, num_steps=2,
                                filter_generated=False, progress=False)
    rows = rep["rows"]
    keys = {(r["source"], r["site"], r["set"]) for r in rows}
    for src in ("real", "generated"):
        for site in (PLANT_SITE, "single_transformer_blocks.1", "vote"):
            for name in ("top-2", "all", "rest", "random-2", "low-2"):
                assert (src, site, name) in keys
        for name in ("all_foreground", "centre", "input"):
            assert (src, "-", name) in keys
    assert all(0.0 <= r["iou_mean"] <= 1.0 for r in rows)
    by = {(r["source"], r["site"], r["set"]): r for r in rows}
    assert by[("real", "vote", "random-2")]["n"] == 4 and by[("real", "vote", "top-2")]["n"] == 2
    # IoU of "everything is foreground" is the true foreground fraction: an independent check.
    frac = float(wb.masks.reshape(2, -1).mean(1).mean())
    assert by[("real", "-", "all_foreground")]["iou_mean"] == pytest.approx(frac)
    assert "| t=0.5 | vote |" in rep["markdown"] and rep["config"]["samples"] == 2


def test_generated_pseudo_truth_needs_the_caption_colours():
    from massact_nn.tracing.probes.segmentation_eval import drawn_mask

    from massact_nn import world as W

    wb = W.World(0).sample(1, seed=4)
    a = {k: int(v[0]) for k, v in wb.attributes.items() if k in ("fg_colour", "bg_colour")}
    fg, bg = W.RGB[a["fg_colour"]], W.RGB[a["bg_colour"]]
    img = torch.from_numpy(wb.images[0])
    assert torch.equal(drawn_mask(img, fg, bg), torch.from_numpy(wb.masks[0]))
    assert drawn_mask(img, bg, W.RGB[[c for c in range(6) if c not in a.values()][0]]) is None
    assert drawn_mask(torch.rand(3, 32, 32) * 2 - 1, fg, bg) is None
    assert drawn_mask(img, bg, fg) is None  # swapped colours: the "foreground" fills the frame


# -- the shipped toy -----------------------------------------------------------------------------
@pytest.mark.skipif(not is_shipped(), reason="toy weights not shipped yet")
def test_toy_massive_channels_beat_their_controls_on_real_images():
    # The claim itself, loosely: on world images at t=0.5 the top-4 channels at the last site
    # segment far better than the lowest-4 and better than random-4; all channels do well.
    from massact_nn.tracing.model import load_model
    from massact_nn.tracing.probes.segmentation import evaluate_segmentation

    from massact_nn import world as W

    toy = load_model("toy")
    stats = collect_stats(toy, W.all_captions()[::30], StatsConfig(
        generation=GenerationConfig(steps=10), progress=False))
    rep = evaluate_segmentation(toy, stats, world_samples=6, sites=[-1 + len(stats.sites)],
                                t_values=(0.5,), random_draws=2, sources=("real",), progress=False)
    iou = {r["set"]: r["iou_mean"] for r in rep["rows"]}
    assert iou["all"] > 0.7 and iou["all"] > iou["all_foreground"] + 0.2
    assert iou["top-4"] > iou["random-4"] + 0.1 and iou["top-4"] > iou["low-4"] + 0.2


def test_real_image_on_an_unsupported_family_is_one_clear_error():
    from massact_nn.tracing.probes.real_image import check_supported

    from massact_nn.errors import MassactError

    check_supported("flux")
    with pytest.raises(MassactError, match=r"not supported for the 'sana' family yet; accepted: flux"):
        check_supported("sana")


def test_evaluation_with_k_of_every_channel_leaves_out_the_empty_rest(tiny_flux, planted):
    from massact_nn.tracing.probes.segmentation import evaluate_segmentation

    width = sites_of(tiny_flux)[0].channels
    rep = evaluate_segmentation(tiny_flux, planted[1], world_samples=World(0).sample(1, seed=9),
                                sites=[PLANT_SITE], steps=[1], t_values=(0.5,), k=width,
                                random_draws=0, num_steps=2, sources=("generated",),
                                filter_generated=False, progress=False)
    sets = {r["set"] for r in rep["rows"]}
    assert f"top-{width}" in sets and "all" in sets and "rest" not in sets
    tops = {r["site"]: r["iou_mean"] for r in rep["rows"] if r["set"] == f"top-{width}"}
    alls = {r["site"]: r["iou_mean"] for r in rep["rows"] if r["set"] == "all"}
    assert tops == alls  # every channel is the top-k: the two sets are the same features


def test_real_image_channel_ids_are_checked_before_the_trace(tiny_flux):
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    site = "transformer_blocks.1"
    mask = torch.zeros(sites_of(tiny_flux)[1].channels, dtype=torch.bool)
    mask[[7, 20]] = True
    for chans, needle in (({site: mask}, "dtype torch.bool; accepted: integer ids"),
                          ({site: torch.tensor([-1])}, r"channel ids \[-1\] out of range"),
                          ({"transformer_block.1": torch.tensor([3])}, "not measured; accepted: "
                                                                       "transformer_blocks.1")):
        with pytest.raises(MassactError, match=needle):
            real_image_activations(tiny_flux, img, "a photo", [0.5], sites=[site], channels=chans,
                                   generation=GEN)


def test_a_zero_one_image_tensor_is_flagged_and_a_boolean_t_refused(tiny_flux):
    from massact_nn.tracing.probes.real_image import _t_list, image_tensor

    with pytest.warns(UserWarning, match="none negative: they are read as \\[-1, 1\\]"):
        image_tensor(tiny_flux, torch.rand(1, 3, 32, 32), 32, 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_tensor(tiny_flux, torch.rand(1, 3, 32, 32) * 2 - 1, 32, 32)  # [-1, 1]: no warning
    with pytest.raises(MassactError, match="t=True is not a number"):
        _t_list([True])
