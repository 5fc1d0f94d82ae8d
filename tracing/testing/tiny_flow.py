"""Tiny random pipelines of FLUX.2 (klein, dev), Qwen-Image, Chroma and CogView4.

See :mod:`.tiny` for the registry.

Each builder saves a real diffusers pipeline with 2 (+2) blocks of width 32 to ``folder``;
``plant=(channel, scale)`` edits the first block's weights so that channel carries a large,
same-signed value on every image token from that block on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .parts import (
    pin_gate,
    plant_bias,
    plant_swiglu,
    tiny_glm,
    tiny_mistral3,
    tiny_qwen3,
    tiny_qwen25_vl,
    tiny_t5,
    tiny_vae,
    tiny_vae_flux2,
    tiny_vae_qwen,
)
from .tokenizers import CONTENT_LIST_TEMPLATE, byte_tokenizer, t5_tokenizer

HEADS, HEAD_DIM = 2, 16
WIDTH = HEADS * HEAD_DIM


def _save(pipe, folder: str | Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def build_flux2(folder: str | Path, *, seed: int = 0, plant: tuple[int, float] | None = None) -> Path:
    """A tiny ``Flux2KleinPipeline`` (not distilled: ``guidance_scale > 1`` runs true CFG).

    The text encoder is a 27-layer, 16-wide Qwen3 so the pipeline's default
    ``text_encoder_out_layers=(9, 18, 27)`` works; the tokenizer is byte-level with a chat template.
    FLUX.2 has no biases, so the plant uses :func:`plant_swiglu` on the first double block.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_flux2(), text_encoder=tiny_qwen3(len(tok)),
        tokenizer=tok, transformer=_flux2_transformer(plant, guidance_embeds=False), is_distilled=False,
    )
    return _save(pipe, folder)


def build_flux2dev(folder: str | Path, *, seed: int = 0, plant: tuple[int, float] | None = None) -> Path:
    """A tiny ``Flux2Pipeline`` (FLUX.2-dev: guidance embedding, one call per step).

    The text encoder is a 30-layer, 16-wide Mistral3 (the pipeline reads layers 10, 20, 30); the
    "processor" is the byte-level tokenizer with a chat template that reads Mistral-style content
    lists, which is all the pipeline asks of it for text-to-image.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(seed)
    tok = byte_tokenizer(chat_template=CONTENT_LIST_TEMPLATE)
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_flux2(),
        text_encoder=tiny_mistral3(len(tok)), tokenizer=tok,
        transformer=_flux2_transformer(plant, guidance_embeds=True),
    )
    return _save(pipe, folder)


def _flux2_transformer(plant: tuple[int, float] | None, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )
    if plant is not None:
        ff = transformer.transformer_blocks[0].ff
        hidden = ff.linear_out.weight.shape[1]
        w = ff.linear_in.weight.data
        plant_swiglu(w[:hidden], w[hidden:], ff.linear_out, *plant)
    return transformer


def build_qwenimage(folder: str | Path, *, seed: int = 0, plant: tuple[int, float] | None = None) -> Path:
    """A tiny ``QwenImagePipeline`` (one-layer Qwen2.5-VL text encoder, byte-level tokenizer).

    The pipeline drops the first 34 tokens of its templated prompt: bytes of the real template here.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    )
    if plant is not None:
        block = transformer.transformer_blocks[0]
        plant_bias(block.img_mlp.net[2], *plant)
        # img_mod emits (shift, scale, gate) for attention, then for the MLP: gate_mlp is slot 5.
        pin_gate(block.img_mod[1], 5 * WIDTH + plant[0])
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_qwen(),
        text_encoder=tiny_qwen25_vl(len(tok)), tokenizer=tok, transformer=transformer,
    )
    return _save(pipe, folder)


def build_chroma(folder: str | Path, *, seed: int = 0, plant: tuple[int, float] | None = None) -> Path:
    """A tiny ``ChromaPipeline`` (T5 only)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )
    if plant is not None:
        # Chroma's gates come from a shared approximator (no per-block bias to pin); a large
        # ff bias times a token-constant, nonzero gate still dominates.
        plant_bias(transformer.transformer_blocks[0].ff.net[2], *plant)
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(latent_channels=4),
        text_encoder=tiny_t5(len(t5)), tokenizer=t5, transformer=transformer,
    )
    return _save(pipe, folder)


def build_cogview4(folder: str | Path, *, seed: int = 0, plant: tuple[int, float] | None = None) -> Path:
    """A tiny ``CogView4Pipeline`` (two-layer GLM text encoder).

    The tokenizer is a T5 one: its EOS token keeps the empty negative prompt non-empty, as GLM's
    prefix tokens do (an empty sequence breaks the text encoder).
    """
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
        pos_embed_max_size=16, sample_size=16, rope_axes_dim=(8, 8),
    )
    if plant is not None:
        plant_bias(transformer.transformer_blocks[0].ff.net[2], *plant)
    pipe = CogView4Pipeline(
        tokenizer=tok, text_encoder=tiny_glm(len(tok)), vae=tiny_vae(), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _save(pipe, folder)
