"""Tiny random-weight diffusers pipelines, saved to a folder, for offline tests and benchmarks.

Each builder makes a real diffusers pipeline of one family with a few small blocks, locally made
tokenizers and tiny text encoders, and saves it with ``save_pretrained`` so that it loads exactly
as a Hub checkpoint would (``DiffusionModel(folder)``, ``Pipeline.from_pretrained(folder)``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .tokenizers import clip_tokenizer, t5_tokenizer

#: Keyword arguments that make a tiny pipeline's call cheap and valid, by family.
CALL_DEFAULTS: dict[str, dict] = {
    "flux": {"max_sequence_length": 16, "guidance_scale": 0.0},
}


def _tiny_t5(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
    )
    return T5EncoderModel(cfg)


def _tiny_clip(vocab_size: int, hidden: int = 32, max_pos: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=max_pos, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return CLIPTextModel(cfg)


def _tiny_vae(latent_channels: int = 4, levels: int = 2):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=1.0, shift_factor=0.0,
    )


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


BUILDERS: dict[str, Callable[..., Path]] = {"flux": build_flux}
