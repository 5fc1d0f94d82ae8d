"""Tiny components (text encoders, VAEs) and weight plants shared by the tiny pipeline builders.

Everything is random-weight and small enough to run a few denoising steps on one CPU thread.
"""

from __future__ import annotations

import torch


def tiny_t5(vocab_size: int, d_model: int = 32, umt5: bool = False):
    """A one-layer ``T5EncoderModel`` (or ``UMT5EncoderModel``)."""
    if umt5:
        from transformers import UMT5Config as Config
        from transformers import UMT5EncoderModel as Model
    else:
        from transformers import T5Config as Config
        from transformers import T5EncoderModel as Model

    cfg = Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
    )
    return Model(cfg)


def tiny_clip(vocab_size: int, hidden: int = 32, max_pos: int = 77, projection: bool = False):
    """A one-layer ``CLIPTextModel`` (``CLIPTextModelWithProjection`` when ``projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=max_pos, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_qwen3(vocab_size: int, hidden: int = 16, layers: int = 27, causal_lm: bool = True):
    """A narrow ``Qwen3ForCausalLM``, deep enough for FLUX.2-klein's default layers.

    The pipeline reads hidden states (9, 18, 27) by default, so 27 layers let it run unchanged.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg)


def tiny_qwen25_vl(vocab_size: int, hidden: int = 16):
    """A one-layer ``Qwen2_5_VLForConditionalGeneration`` (the vision tower is built but unused)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0], window_size=16, patch_size=14, spatial_merge_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                           video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                           vision_end_token_id=vocab_size - 4)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def tiny_bert(vocab_size: int, hidden: int = 16):
    """A one-layer ``BertModel`` (HunyuanDiT's first text encoder)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    return BertModel(cfg, add_pooling_layer=False)


def tiny_qwen3_vl(vocab_size: int, hidden: int = 16, layers: int = 2):
    """A narrow ``Qwen3VLModel`` (the vision tower is built but unused)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
            "mrope_interleaved": True}
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        rope_parameters=rope, bos_token_id=0, eos_token_id=0,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                        video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                        vision_end_token_id=vocab_size - 4)
    return Qwen3VLModel(cfg)


def tiny_mistral3(vocab_size: int, hidden: int = 16, layers: int = 30):
    """A narrow ``Mistral3ForConditionalGeneration`` (FLUX.2-dev's text encoder class).

    Deep enough for the pipeline's default hidden-state layers (10, 20, 30); the Pixtral tower is
    built but unused.
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, patch_size=14, image_size=56)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=vocab_size - 1,
                         spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(cfg)


def tiny_gemma2(vocab_size: int, hidden: int = 16):
    """A one-layer ``Gemma2Model`` (SANA's text encoder class)."""
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        pad_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2,
    )
    return Gemma2Model(cfg)


def tiny_glm(vocab_size: int, hidden: int = 16):
    """A two-layer ``GlmModel`` (CogView4 reads the second-to-last hidden state)."""
    from transformers import GlmConfig, GlmModel

    cfg = GlmConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        pad_token_id=vocab_size - 1,
    )
    return GlmModel(cfg)


def tiny_vae(latent_channels: int = 4, levels: int = 2):
    """An ``AutoencoderKL`` with ``2 ** (levels - 1)`` downsampling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=1.0, shift_factor=0.0,
    )


def tiny_vae_flux2(latent_channels: int = 4, levels: int = 2):
    """An ``AutoencoderKLFlux2`` (FLUX.2's VAE, with its latent batch-norm statistics)."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )


def tiny_vae_qwen(z_dim: int = 4):
    """An ``AutoencoderKLQwenImage`` (3 downsamplings: ``vae_scale_factor`` 8)."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )


def tiny_vae_dc(latent_channels: int = 4):
    """An ``AutoencoderDC`` with two stages (``vae_scale_factor`` 2)."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
        decoder_norm_types="rms_norm", decoder_act_fns="silu",
    )


# Plants: weight edits that make one residual-stream channel massive from the edited block on.
# They edit weights only; no forward is replaced.


@torch.no_grad()
def plant_bias(linear: torch.nn.Linear, channel: int, scale: float) -> None:
    """Set one output bias of a linear that writes into the residual stream.

    That is a token-constant offset on the channel (times whatever token-constant gate the block
    applies).
    """
    linear.bias[channel] = scale


@torch.no_grad()
def pin_gate(linear: torch.nn.Linear, row: int) -> None:
    """Make one output of an adaLN modulation linear exactly 1 (zero weights, bias 1).

    The gate it feeds then lets a planted value through unchanged at every timestep.
    """
    linear.weight[row] = 0.0
    linear.bias[row] = 1.0


@torch.no_grad()
def plant_swiglu(
    w_gate: torch.Tensor, w_up: torch.Tensor, out: torch.nn.Linear, channel: int, scale: float
) -> None:
    """Plant in a bias-free SwiGLU feed-forward ``out(silu(x W_gate) * (x W_up))``.

    With ``W_up = W_gate`` every hidden unit is ``silu(a) * a >= -0.28``, positive on average; an
    output row of ``scale / hidden`` then averages them: a large, same-signed value on ``channel``
    for every token, which is what a bias would give in a model that has none.

    Shapes:
        w_gate, w_up: [hidden, dim] weight views (edited in place); out.weight: [dim, hidden].
    """
    w_up.copy_(w_gate)
    out.weight[channel] = scale / out.weight.shape[1]
