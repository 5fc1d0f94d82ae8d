"""Tiny random pipelines of SANA (and SANA-Sprint), PixArt-Σ/α, SD3 and AuraFlow.

See :mod:`.tiny` for the registry.

Each builder saves a real diffusers pipeline with 2 (+2) blocks of width 32 to ``folder``;
``plant=(channel, scale)`` edits the first block's weights so that channel carries a large,
same-signed value on every image token from that block on.
"""

from __future__ import annotations

import torch

from .parts import pin_gate, plant_bias, plant_swiglu, tiny_clip, tiny_gemma2, tiny_t5, tiny_vae, tiny_vae_dc
from .tiny_flow import HEAD_DIM, HEADS, WIDTH, _save
from .tokenizers import byte_tokenizer, clip_tokenizer, t5_tokenizer


def build_sana(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``SanaPipeline`` (one-layer Gemma2, byte-level tokenizer, two-stage DC-AE).

    Call it with ``complex_human_instruction=None`` and ``use_resolution_binning=False``
    (see ``CALL_DEFAULTS["sana"]``).
    """
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
        num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=WIDTH,
        caption_channels=16, mlp_ratio=2.0, sample_size=16, patch_size=1,
    )
    if plant is not None:
        # The cross-attention output is added to the residual stream without a gate.
        plant_bias(transformer.transformer_blocks[0].attn2.to_out[0], *plant)
    pipe = SanaPipeline(
        tokenizer=tok, text_encoder=tiny_gemma2(len(tok)), vae=tiny_vae_dc(), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _save(pipe, folder)


def build_sanasprint(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``SanaSprintPipeline`` (guidance-embedding SANA transformer with QK norms, SCM scheduler).

    Call it with 2 steps (the pipeline's own default), ``complex_human_instruction=None`` and
    ``use_resolution_binning=False``.
    """
    from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
        num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=WIDTH,
        caption_channels=16, mlp_ratio=2.0, sample_size=16, patch_size=1, guidance_embeds=True,
        qk_norm="rms_norm_across_heads",
    )
    if plant is not None:
        plant_bias(transformer.transformer_blocks[0].attn2.to_out[0], *plant)
    pipe = SanaSprintPipeline(
        tokenizer=tok, text_encoder=tiny_gemma2(len(tok)), vae=tiny_vae_dc(), transformer=transformer,
        scheduler=SCMScheduler(),
    )
    return _save(pipe, folder)


def build_pixart(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``PixArtSigmaPipeline`` (T5 only). Call it with ``use_resolution_binning=False``."""
    from diffusers import PixArtSigmaPipeline

    return _build_pixart(PixArtSigmaPipeline, folder, seed, plant)


def build_pixartalpha(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``PixArtAlphaPipeline`` (T5 only). Call it with ``use_resolution_binning=False``."""
    from diffusers import PixArtAlphaPipeline

    return _build_pixart(PixArtAlphaPipeline, folder, seed, plant)


def _build_pixart(pipeline_cls, folder, seed: int, plant: tuple[int, float] | None):
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=4, cross_attention_dim=WIDTH, sample_size=8, patch_size=2, caption_channels=32,
    )
    if plant is not None:
        plant_bias(transformer.transformer_blocks[0].attn2.to_out[0], *plant)
    pipe = pipeline_cls(
        tokenizer=t5, text_encoder=tiny_t5(len(t5)), vae=tiny_vae(), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _save(pipe, folder)


def build_sd3(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``StableDiffusion3Pipeline`` (two projected CLIPs and a T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=32, caption_projection_dim=WIDTH,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    )
    if plant is not None:
        block = transformer.transformer_blocks[0]
        plant_bias(block.ff.net[2], *plant)
        # AdaLayerNormZero emits (shift, scale, gate) for attention, then for the MLP.
        pin_gate(block.norm1.linear, 5 * WIDTH + plant[0])
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
        text_encoder=tiny_clip(len(clip), projection=True), tokenizer=clip,
        text_encoder_2=tiny_clip(len(clip), projection=True), tokenizer_2=clip,
        text_encoder_3=tiny_t5(len(t5)), tokenizer_3=t5,
    )
    return _save(pipe, folder)


def build_auraflow(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``AuraFlowPipeline`` (UMT5).

    AuraFlow has no biases: the plant uses :func:`plant_swiglu` on the first joint block's image
    feed-forward.
    """
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=32,
        caption_projection_dim=WIDTH, out_channels=4, pos_embed_max_size=64,
    )
    with torch.no_grad():
        # The adaLN modulations have no bias, and at default init their gates are ~0.01: blocks
        # would barely write into the residual stream (the text would barely matter).
        for block in [*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks]:
            block.norm1.linear.weight.mul_(20.0)
    if plant is not None:
        ff = transformer.joint_transformer_blocks[0].ff
        plant_swiglu(ff.linear_1.weight.data, ff.linear_2.weight.data, ff.out_projection, *plant)
    pipe = AuraFlowPipeline(
        tokenizer=t5, text_encoder=tiny_t5(len(t5), umt5=True), vae=tiny_vae(), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _save(pipe, folder)
