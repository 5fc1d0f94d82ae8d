"""Adapters as data: layouts, registry, guidance rules, site tables of real configs, loud failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from massact_nn.tracing.adapters import (
    ADAPTERS,
    LAYOUTS,
    adapter_for_class,
    read_image,
    supported_classes,
    transformer_class_name,
    write_image,
)
from massact_nn.tracing.cli.main import main as cli
from massact_nn.tracing.sites import sites_from_folder

from massact_nn.errors import MassactError

CONFIGS = Path(__file__).parent / "data" / "configs"
B, TXT, IMG, C = 2, 5, 12, 8


def _pair():
    return torch.randn(B, TXT, C), torch.randn(B, IMG, C)


# --- layouts -------------------------------------------------------------------------------


def test_read_image_takes_the_right_tensor_of_every_layout():
    txt, img = _pair()
    joint = torch.cat([txt, img], dim=1)
    assert read_image("pair_text_image", (txt, img), IMG) is img
    assert read_image("pair_image_text", (img, txt), IMG) is img
    assert read_image("tensor", img, IMG) is img
    got = read_image("concat_text_image", joint, IMG)
    assert torch.equal(got, img)
    # A view, not a copy: reading every block every step must stay cheap.
    assert got.untyped_storage().data_ptr() == joint.untyped_storage().data_ptr()
    # SD3's last block has no text output.
    assert read_image("pair_text_image", (None, img), IMG) is img
    # Z-Image: image first at a fixed offset, then text / padding.
    assert torch.equal(read_image("concat_image_text", torch.cat([img, txt], dim=1), IMG), img)
    padded = torch.cat([img, torch.zeros(B, 4, C)], dim=1)
    assert torch.equal(read_image("image_then_pad", padded, IMG), img)
    assert read_image("image_then_pad", img, IMG).shape == img.shape  # no padding needed


@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_then_read_round_trip_keeps_the_text_stream(layout):
    txt, img = _pair()
    out = {
        "pair_text_image": (txt, img), "pair_image_text": (img, txt), "tensor": img,
        "concat_text_image": torch.cat([txt, img], dim=1),
        "concat_image_text": torch.cat([img, txt], dim=1),
        "image_then_pad": torch.cat([img, txt], dim=1),
    }[layout]
    new = torch.randn(B, IMG, C)
    written = write_image(layout, out, new, IMG)
    assert torch.equal(read_image(layout, written, IMG), new)
    assert written is not out  # a new object (in-place edits are lost under several invokes)
    if layout == "concat_text_image":
        assert torch.equal(written[:, :TXT], txt)
    elif layout in ("concat_image_text", "image_then_pad"):
        assert torch.equal(written[:, IMG:], txt)
    elif layout != "tensor":
        assert written[0 if layout == "pair_text_image" else 1] is txt


@pytest.mark.parametrize(
    "layout, out, why",
    [
        ("pair_text_image", torch.randn(B, IMG, C), "expected a pair"),
        ("pair_text_image", (torch.randn(B, TXT, C),) * 3, "expected a pair"),
        ("pair_text_image", (torch.randn(B, IMG, C), torch.randn(B, TXT, C)), f"expected {IMG} image tokens"),
        ("pair_image_text", (torch.randn(B, TXT, C), torch.randn(B, IMG, C)), f"expected {IMG} image tokens"),
        ("tensor", (torch.randn(B, TXT, C), torch.randn(B, IMG, C)), "expected one tensor"),
        ("tensor", torch.randn(B, IMG + TXT, C), f"expected {IMG} image tokens"),
        ("concat_text_image", (torch.randn(B, TXT, C), torch.randn(B, IMG, C)), "expected one tensor"),
        # Image tokens alone, no text in front: not the joint tensor this layout promises.
        ("concat_text_image", torch.randn(B, IMG, C), "expected text tokens before"),
        ("concat_text_image", torch.randn(B, IMG), "expected text tokens before"),
        ("concat_image_text", torch.randn(B, IMG, C), "expected text tokens after"),
        ("concat_image_text", (torch.randn(B, IMG, C), torch.randn(B, TXT, C)), "expected one tensor"),
        ("image_then_pad", torch.randn(B, IMG - 1, C), f"expected {IMG} image tokens"),
    ],
)
def test_mismatched_structure_fails_loudly_naming_the_site(layout, out, why):
    with pytest.raises(MassactError, match=rf"block single_transformer_blocks\.7: output .*{why}"):
        read_image(layout, out, IMG, "single_transformer_blocks.7")


def test_unknown_layout_lists_the_known_ones():
    with pytest.raises(MassactError, match="unknown layout 'joint'; accepted: " + ", ".join(LAYOUTS)):
        read_image("joint", torch.randn(B, IMG, C), IMG)


# --- registry and guidance rules -----------------------------------------------------------


def test_every_adapter_names_real_diffusers_classes_and_known_layouts():
    import diffusers

    names = [a.name for a in ADAPTERS]
    assert len(names) == len(set(names))
    for a in ADAPTERS:
        for cls in a.transformer_classes:
            assert hasattr(diffusers, cls), cls
            assert adapter_for_class(cls) is a
        assert a.blocks and all(bl.layout in LAYOUTS for bl in a.blocks)
        assert a.guidance.mode in ("none", "batched", "two_calls")
        assert all(hasattr(diffusers, p) for p in a.pipelines)
    assert set(supported_classes()) >= {
        "FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
        "SanaTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel",
    }


def test_unsupported_class_lists_every_supported_one():
    with pytest.raises(MassactError) as e:
        adapter_for_class("UNet2DConditionModel")
    msg = str(e.value)
    assert "\n" not in msg and "unsupported transformer class 'UNet2DConditionModel'" in msg
    assert all(cls in msg for cls in supported_classes())


def test_legacy_pixart_config_name_maps_to_the_class_diffusers_loads():
    assert transformer_class_name({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"}) == (
        "PixArtTransformer2DModel"
    )
    # DiT (ada_norm_zero) and plain Transformer2DModel stay unsupported rather than misread.
    assert transformer_class_name({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}) == (
        "Transformer2DModel"
    )
    for config in ({"_class_name": "Transformer2DModel"}, {"_class_name": "Transformer2DModel",
                                                           "norm_type": "layer_norm"}):
        assert transformer_class_name(config) == "Transformer2DModel"
    assert transformer_class_name({"_class_name": "FluxTransformer2DModel"}) == "FluxTransformer2DModel"


def test_write_image_refuses_an_unknown_layout():
    from massact_nn.tracing.adapters.base import write_image

    with pytest.raises(MassactError, match="unknown layout 'sideways'; accepted: "):
        write_image("sideways", torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), 4)


def _bare(pipeline_cls, **config):
    # A pipeline object with its class (for __call__ defaults) and config, without components.
    from diffusers.configuration_utils import FrozenDict

    pipe = object.__new__(pipeline_cls)
    pipe._internal_dict = FrozenDict(config)
    return pipe


def _adapter(name):
    return next(a for a in ADAPTERS if a.name == name)


def test_guidance_rules_follow_each_pipeline_call_and_its_defaults():
    import diffusers as d

    sana, sd3 = _adapter("sana"), _adapter("sd3")
    # Left out, guidance_scale is the pipeline's default (4.5, 7.0): CFG runs, batched.
    assert sana.batched_cfg(_bare(d.SanaPipeline), {})
    assert sd3.batched_cfg(_bare(d.StableDiffusion3Pipeline), {})
    assert not sana.batched_cfg(_bare(d.SanaPipeline), {"guidance_scale": 1.0})
    assert sana.calls_per_step(_bare(d.SanaPipeline), {}) == 1
    assert not sana.batched_cfg(_bare(d.SanaSprintPipeline), {"guidance_scale": 4.5})  # an embedding

    qwen = _adapter("qwenimage")
    pipe = _bare(d.QwenImagePipeline)
    assert qwen.calls_per_step(pipe, {}) == 1  # true_cfg_scale defaults to 4 but needs a negative prompt
    assert qwen.calls_per_step(pipe, {"negative_prompt": ""}) == 2
    assert qwen.calls_per_step(pipe, {"negative_prompt": "", "true_cfg_scale": 1.0}) == 1

    flux2 = _adapter("flux2")
    assert flux2.calls_per_step(_bare(d.Flux2KleinPipeline, is_distilled=False), {}) == 2  # default 4.0
    assert flux2.calls_per_step(_bare(d.Flux2KleinPipeline, is_distilled=True), {"guidance_scale": 4.0}) == 1
    assert flux2.calls_per_step(_bare(d.Flux2Pipeline), {"guidance_scale": 4.0}) == 1  # guidance-distilled

    zimage = _adapter("zimage")
    assert zimage.calls_per_step(_bare(d.ZImagePipeline), {"guidance_scale": 0.0}) == 1
    with pytest.raises(MassactError, match=r"guidance_scale=5\.0: .*accepted: guidance_scale=0"):
        zimage.calls_per_step(_bare(d.ZImagePipeline), {})  # the pipeline's default: CFG on

    for name, pipeline in (("chroma", d.ChromaPipeline), ("cogview4", d.CogView4Pipeline)):
        assert _adapter(name).calls_per_step(_bare(pipeline), {}) == 2
        assert _adapter(name).calls_per_step(_bare(pipeline), {"guidance_scale": 1.0}) == 1


def test_unverified_pipeline_of_a_covered_transformer_is_refused():
    import diffusers as d

    # PAG adds a third, perturbed batch copy.
    with pytest.raises(MassactError, match="pipeline PixArtSigmaPAGPipeline is not verified"):
        _adapter("pixart").calls_per_step(_bare(d.PixArtSigmaPAGPipeline), {})


def test_sd3_skip_layer_guidance_is_refused():
    import diffusers as d

    with pytest.raises(MassactError, match=r"skip_guidance_layers=\[7\] adds transformer calls"):
        _adapter("sd3").batched_cfg(_bare(d.StableDiffusion3Pipeline), {"skip_guidance_layers": [7]})


# --- site tables of real configs, without weights -----------------------------------------

# (folder, architecture, sites, width, first module, last module)
REAL = [
    ("flux1-dev", "flux", 57, 3072, "transformer_blocks.0", "single_transformer_blocks.37"),
    ("flux1-schnell", "flux", 57, 3072, "transformer_blocks.0", "single_transformer_blocks.37"),
    ("flux2-dev", "flux2", 8 + 48, 6144, "transformer_blocks.0", "single_transformer_blocks.47"),
    ("flux2-klein-4b", "flux2", 5 + 20, 3072, "transformer_blocks.0", "single_transformer_blocks.19"),
    ("qwen-image", "qwenimage", 60, 3072, "transformer_blocks.0", "transformer_blocks.59"),
    ("sana1.5-1.6b", "sana", 20, 2240, "transformer_blocks.0", "transformer_blocks.19"),
    ("sd3.5-large", "sd3", 38, 2432, "transformer_blocks.0", "transformer_blocks.37"),
    ("sd3.5-medium", "sd3", 24, 1536, "transformer_blocks.0", "transformer_blocks.23"),
    ("pixart-sigma", "pixart", 28, 1152, "transformer_blocks.0", "transformer_blocks.27"),
    ("z-image-turbo", "zimage", 2 + 30, 3840, "noise_refiner.0", "layers.29"),
]


@pytest.mark.parametrize("folder, arch, n, width, first, last", REAL, ids=[r[0] for r in REAL])
def test_sites_of_real_configs_without_weights(folder, arch, n, width, first, last):
    # FLUX.2-dev's transformer alone is ~32B parameters: building it for real is impossible here,
    # so finishing at all shows the meta build.
    adapter, sites = sites_from_folder(CONFIGS / folder)
    assert adapter.name == arch and len(sites) == n
    assert {s.channels for s in sites} == {width}
    assert (sites[0].module, sites[-1].module) == (first, last)
    assert [s.layer for s in sites] == list(range(n))


def test_site_table_of_a_32b_model_allocates_no_weights():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    _, sites = sites_from_folder(CONFIGS / "flux2-dev")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert len(sites) == 56
    assert grown < 2 * 1024 * 1024, f"peak memory grew by {grown / 1024:.0f} MiB"  # the weights: ~120 GiB


def test_flux1_dev_site_kinds_in_execution_order():
    _, sites = sites_from_folder(CONFIGS / "flux1-dev")
    assert [s.kind for s in sites] == ["double"] * 19 + ["single"] * 38
    assert sites[19].module == "single_transformer_blocks.0"


def test_cli_sites_json_for_flux1_dev_configs(capsys):
    assert cli(["sites", "--model", str(CONFIGS / "flux1-dev"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"] == "flux" and len(out["sites"]) == 57
    assert {s["channels"] for s in out["sites"]} == {3072}
    assert out["sites"][56] == {"layer": 56, "module": "single_transformer_blocks.37", "channels": 3072,
                                "streams": ["image", "text"], "kind": "single"}


def test_cli_sites_unsupported_class_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "dit"
    shutil.copytree(CONFIGS / "pixart-sigma", folder)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg["norm_type"] = "ada_norm_zero"  # a DiT-XL config: loads as DiTTransformer2DModel, not covered
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg))
    assert cli(["sites", "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("massact: error: unsupported transformer class")
    assert all(cls in err[0] for cls in supported_classes())


# --- a block whose return structure differs, inside a real run ------------------------------


class _ReturnsPair(torch.nn.Module):
    """Wraps a FLUX.2 single block and returns (text, image) instead of the joint tensor, as
    a different diffusers release might."""

    def __init__(self, inner: torch.nn.Module, n_text: int) -> None:
        super().__init__()
        self.inner, self.n_text = inner, n_text

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out[:, : self.n_text], out[:, self.n_text:]


def test_block_with_a_different_return_layout_fails_naming_the_site(tmp_path):
    from massact_nn.tracing.generation import GenerationConfig
    from massact_nn.tracing.stats import StatsConfig, collect_stats
    from massact_nn.tracing.testing.tiny import CALL_DEFAULTS, build_flux2
    from nnsight.modeling.diffusion import DiffusionModel

    build_flux2(tmp_path / "flux2")

    class Swapped(DiffusionModel):
        # Replace the block before nnsight builds its envoy tree, so the envoy wraps the wrapper.
        def _load(self, repo_id, *args, **kwargs):
            module = super()._load(repo_id, *args, **kwargs)
            blocks = self.pipeline.transformer.single_transformer_blocks
            blocks[1] = _ReturnsPair(blocks[1], n_text=8)
            return module

    model = Swapped(str(tmp_path / "flux2"), dispatch=True)
    model.pipeline.set_progress_bar_config(disable=True)
    extra = {**CALL_DEFAULTS["flux2"], "guidance_scale": 1.0}
    gen = GenerationConfig(steps=1, height=32, width=32, extra=extra)
    where = r"block single_transformer_blocks\.1: output tuple\[.*'concat_text_image'"
    with pytest.raises(MassactError, match=where):
        collect_stats(model, ["a red cat"], StatsConfig(gen, progress=False))


def test_prompts_file_skips_blank_and_comment_lines_indented_or_not(tmp_path):
    import argparse

    from massact_nn.tracing.cli.common import prompts_from

    f = tmp_path / "p.txt"
    f.write_text("a red cat\n\n# a comment\n   # an indented comment\n  a blue dog  \n")
    args = argparse.Namespace(prompt=["first"], prompts_file=str(f))
    assert prompts_from(args) == ["first", "a red cat", "a blue dog"]
    with pytest.raises(MassactError, match="does not exist"):
        prompts_from(argparse.Namespace(prompt=None, prompts_file=str(tmp_path / "none.txt")))
