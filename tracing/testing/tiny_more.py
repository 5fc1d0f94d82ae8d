"""Tiny random pipelines of Z-Image, Bria, CogView3-Plus, HunyuanDiT, Ovis-Image and Krea 2.

See :mod:`.tiny` for the registry.

Each builder saves a real diffusers pipeline with 2 (+2) blocks of width 32 to ``folder``;
``plant=(channel, scale)`` edits the first block's weights so that channel carries a large,
same-signed value on every image token from that block on.
"""

from __future__ import annotations

import torch

from .parts import (
    pin_gate,
    plant_bias,
    plant_swiglu,
    tiny_bert,
    tiny_qwen3,
    tiny_qwen3_vl,
    tiny_t5,
    tiny_vae,
    tiny_vae_qwen,
)
from .tiny_flow import HEAD_DIM, HEADS, WIDTH, _save
from .tokenizers import bert_tokenizer, byte_tokenizer, t5_tokenizer


def build_zimage(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``ZImagePipeline`` (two-layer Qwen3 text encoder, byte-level tokenizer).

    Call it with ``guidance_scale=0`` (Z-Image-Turbo's setting; see the adapter on why CFG is
    refused). The plant goes into the first noise-refiner block, the first image-stream block.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=WIDTH, n_layers=2, n_refiner_layers=2, n_heads=HEADS, n_kv_heads=HEADS,
        cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )
    if plant is not None:
        channel, scale = plant
        block = transformer.noise_refiner[0]
        ff = block.feed_forward
        # The feed-forward output is RMS-normalised (ffn_norm2) before the gate: make the channel
        # dominate the output, then let the norm's weight set its size.
        plant_swiglu(ff.w1.weight.data, ff.w3.weight.data, ff.w2, channel, 100.0)
        with torch.no_grad():
            block.ffn_norm2.weight[channel] = scale
        # adaLN emits (scale_msa, gate_msa, scale_mlp, gate_mlp); the gates go through tanh.
        pin_gate(block.adaLN_modulation[0], 3 * WIDTH + channel)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), tokenizer=tok,
        text_encoder=tiny_qwen3(len(tok), layers=2, causal_lm=False), transformer=transformer,
    )
    return _save(pipe, folder)


def build_bria(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``BriaPipeline`` (T5 only; a three-level VAE, so ``vae_scale_factor`` is 8)."""
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
    )
    if plant is not None:
        block = transformer.transformer_blocks[0]
        plant_bias(block.ff.net[2], *plant)
        # AdaLayerNormZero emits (shift, scale, gate) for attention, then for the MLP.
        pin_gate(block.norm1.linear, 5 * WIDTH + plant[0])
    pipe = BriaPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(levels=3),
        text_encoder=tiny_t5(len(t5)), tokenizer=t5,
    )
    return _save(pipe, folder)


def build_cogview3plus(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``CogView3PlusPipeline`` (T5 only)."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        out_channels=4, text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16,
        sample_size=16,
    )
    if plant is not None:
        plant_bias(transformer.transformer_blocks[0].ff.net[2], *plant)
    pipe = CogView3PlusPipeline(
        tokenizer=t5, text_encoder=tiny_t5(len(t5)), vae=tiny_vae(), transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    return _save(pipe, folder)


def build_hunyuandit(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``HunyuanDiTPipeline`` (one-layer BERT and T5).

    Four blocks: the last one takes the long skip from the first. Call it with
    ``use_resolution_binning=False``.
    """
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(seed)
    bert, t5 = bert_tokenizer(), t5_tokenizer(max_length=256)
    transformer = HunyuanDiT2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, patch_size=2, sample_size=16,
        hidden_size=WIDTH, num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=77, text_len_t5=256,
    )
    if plant is not None:
        # The cross-attention output is added to the residual stream without a gate.
        plant_bias(transformer.blocks[0].attn2.to_out[0], *plant)
    pipe = HunyuanDiTPipeline(
        # The pipeline's rotary grid hard-codes an 8× VAE: four levels.
        vae=tiny_vae(levels=4), text_encoder=tiny_bert(len(bert)), tokenizer=bert, transformer=transformer,
        scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=tiny_t5(len(t5)), tokenizer_2=t5,
    )
    return _save(pipe, folder)


def build_ovis(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``OvisImagePipeline`` (two-layer Qwen3 text encoder, byte-level tokenizer).

    The pipeline drops 28 template tokens: bytes of the real template here, so call it with a
    ``max_sequence_length`` long enough to reach the prompt (``CALL_DEFAULTS["ovis"]``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
    )
    if plant is not None:
        block = transformer.transformer_blocks[0]
        plant_bias(block.ff.net[2], *plant)
        pin_gate(block.norm1.linear, 5 * WIDTH + plant[0])
    pipe = OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), tokenizer=tok,
        text_encoder=tiny_qwen3(len(tok), layers=2, causal_lm=False), transformer=transformer,
    )
    return _save(pipe, folder)


def build_krea2(folder, *, seed: int = 0, plant: tuple[int, float] | None = None):
    """A tiny ``Krea2Pipeline`` (two-layer Qwen3-VL text encoder tapped at layers 1 and 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=16,
        num_text_layers=2, text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )
    if plant is not None:
        block = transformer.transformer_blocks[0]
        ff = block.ff
        plant_swiglu(ff.gate.weight.data, ff.up.weight.data, ff.down, *plant)
        with torch.no_grad():
            # The gate is a shared time projection plus this block's table (row 5: post-FF gate).
            block.scale_shift_table[5, plant[0]] = 1.0
    pipe = Krea2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_qwen(),
        text_encoder=tiny_qwen3_vl(len(tok)), tokenizer=tok, transformer=transformer,
        text_encoder_select_layers=(1, 2),
    )
    return _save(pipe, folder)
