"""Tiny random-weight diffusers pipelines, saved to a folder, for offline tests and benchmarks.

Each builder makes a real diffusers pipeline of one family with a few small blocks, locally made
tokenizers and tiny text encoders, and saves it with ``save_pretrained`` so that it loads exactly
as a Hub checkpoint would (``DiffusionModel(folder)``, ``Pipeline.from_pretrained(folder)``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from .parts import tiny_clip as _tiny_clip
from .parts import tiny_t5 as _tiny_t5
from .parts import tiny_vae as _tiny_vae
from .tiny_dit import build_auraflow, build_pixart, build_pixartalpha, build_sana, build_sanasprint, build_sd3
from .tiny_flow import build_chroma, build_cogview4, build_flux2, build_flux2dev, build_qwenimage
from .tiny_more import build_bria, build_cogview3plus, build_hunyuandit, build_krea2, build_ovis, build_zimage
from .tokenizers import clip_tokenizer, t5_tokenizer

#: Keyword arguments that make a tiny pipeline's call cheap and valid, by family.
#: ``guidance_scale`` is left to each test: the families differ in what turns guidance on.
CALL_DEFAULTS: dict[str, dict] = {
    "flux": {"max_sequence_length": 16, "guidance_scale": 0.0},
    "flux2": {"max_sequence_length": 64},
    # Byte-level tokens: FLUX.2-dev's system message alone is ~170 tokens.
    "flux2dev": {"max_sequence_length": 256},
    # Byte-level tokens: the system template left after Qwen-Image drops its first 34 tokens is
    # ~120 tokens long, and the prompt only comes after it.
    "qwenimage": {"max_sequence_length": 256},
    "sana": {"max_sequence_length": 32, "complex_human_instruction": None, "use_resolution_binning": False},
    "sanasprint": {
        "max_sequence_length": 32, "complex_human_instruction": None, "use_resolution_binning": False,
    },
    "pixart": {"max_sequence_length": 16, "use_resolution_binning": False, "clean_caption": False},
    "pixartalpha": {"max_sequence_length": 16, "use_resolution_binning": False, "clean_caption": False},
    "sd3": {"max_sequence_length": 16},
    "chroma": {"max_sequence_length": 16},
    "cogview4": {"max_sequence_length": 32},
    "auraflow": {"max_sequence_length": 16},
    "zimage": {"max_sequence_length": 64, "guidance_scale": 0.0},
    "bria": {"max_sequence_length": 16},
    "cogview3plus": {},
    "hunyuandit": {"use_resolution_binning": False},
    "ovis": {"max_sequence_length": 160},
    # Byte-level tokens: Krea 2's system prefix alone is ~140 tokens (the prompt comes after it).
    "krea2": {"max_sequence_length": 192},
}


def build_flux(
    folder: str | Path,
    *,
    seed: int = 0,
    double: int = 2,
    single: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    plant: tuple[int, float] | None = None,
) -> Path:
    """Build and save a tiny ``FluxPipeline``.

    Args:
        folder: Where to save the pipeline.
        seed: Seed of the random weights.
        double: Number of double-stream blocks.
        single: Number of single-stream blocks.
        heads: Attention heads (width = heads * head_dim).
        head_dim: Head dimension (must be divisible by 4 for the 3-axis rotary embedding).
        plant: ``(channel, scale)``: multiply the first double block's output-gate bias on that
            channel so the channel carries a planted massive activation from that block on.

    Returns:
        The folder.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=rope,
    )
    if plant is not None:
        _plant_flux(transformer, *plant)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(),
        text_encoder=_tiny_clip(len(clip)),
        tokenizer=clip,
        text_encoder_2=_tiny_t5(len(t5)),
        tokenizer_2=t5,
        transformer=transformer,
    )
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def _plant_flux(transformer: torch.nn.Module, channel: int, scale: float) -> None:
    # The adaLN-zero output gate of the first double block scales what the feed-forward adds
    # to the residual stream; a large bias on one channel of the ff output writes a large,
    # nearly token-constant value there, which the residual stream then carries onward.
    block = transformer.transformer_blocks[0]
    with torch.no_grad():
        block.ff.net[-1].bias[channel] = scale
        dim = transformer.inner_dim
        # norm1 emits (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
        block.norm1.linear.bias[5 * dim + channel] = 1.0


def _declaring_defaults(family: str, build: Callable[..., Path]) -> Callable[..., Path]:
    # The folder declares its cheap, valid call in massact.json, so `massact stats --model FOLDER`
    # runs it as the tests do (generation.resolve forwards these keys to the pipeline).
    @functools.wraps(build)
    def wrapped(folder: str | Path, **kwargs) -> Path:
        out = Path(build(folder, **kwargs))
        (out / "massact.json").write_text(json.dumps({"call_defaults": CALL_DEFAULTS[family]}, indent=2))
        return out

    return wrapped


#: One builder per covered family: ``build(folder, *, seed=0, plant=None) -> folder``. All but the
#: FLUX.1 one also write the family's ``CALL_DEFAULTS`` to ``massact.json`` in the folder.
BUILDERS: dict[str, Callable[..., Path]] = {"flux": build_flux} | {
    family: _declaring_defaults(family, build)
    for family, build in {
        "flux2": build_flux2, "flux2dev": build_flux2dev, "qwenimage": build_qwenimage, "sana": build_sana,
        "pixart": build_pixart, "pixartalpha": build_pixartalpha, "sanasprint": build_sanasprint,
        "sd3": build_sd3, "chroma": build_chroma, "cogview4": build_cogview4, "auraflow": build_auraflow,
        "zimage": build_zimage, "bria": build_bria, "cogview3plus": build_cogview3plus,
        "hunyuandit": build_hunyuandit, "ovis": build_ovis, "krea2": build_krea2,
    }.items()
}
