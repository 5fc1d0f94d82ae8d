"""Build the components of the miniature FLUX.1 pipeline for the shapes world.

Everything is built offline from the world's vocabulary: a tiny CLIP and a tiny T5 text
encoder (random init, frozen: they are fixed deterministic functions of the tokens), a
one-level ``AutoencoderKL`` (``vae_scale_factor`` 1, so the 32x32 latent grid is the pixel
grid and Flux's 2x2 packing gives 256 image tokens), a small ``FluxTransformer2DModel``
without guidance embedding (it behaves like FLUX.1-schnell) and a flow-matching Euler
scheduler without resolution-dependent shift.

The saved folder loads with ``FluxPipeline.from_pretrained(folder)`` and nnsight's
``DiffusionModel(folder)``; the call defaults live in ``massact_toy.json`` beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from massact_nn import world as W
from massact_nn._io import save_json

DEFAULTS_FILE = "massact_toy.json"

MAX_SEQUENCE_LENGTH = 16  # captions are 8 T5 tokens; keeps the joint sequence short
LATENT_CHANNELS = 4

PIPELINE_DEFAULTS: dict[str, Any] = {
    "height": W.SIZE,
    "width": W.SIZE,
    "num_inference_steps": 20,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
    "guidance_scale": 1.0,  # ignored: guidance_embeds is False (schnell-like)
}
"""Keyword arguments every caller should pass to the pipeline."""

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 28, 28),
}
"""Small and wide Flux: 2 double + 2 single blocks, width 128 (design notes: best on CPU)."""


def vocabulary() -> list[str]:
    """Every word a world caption can use, in a fixed order."""
    words = ["a", "on", "background", *W.COLOURS, *W.SHAPES]
    for w in W.BG_COLOURS:
        if w not in words:
            words.append(w)
    return words


def build_tokenizers() -> tuple[CLIPTokenizer, T5Tokenizer]:
    """Word-level CLIP (BPE with per-word merges) and T5 (unigram) tokenizers.

    Unknown words map to the tokenizers' unknown tokens, so any prompt still encodes.
    """
    words = vocabulary()
    # CLIP BPE: characters, then merges that rebuild each whole word ("red</w>").
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(words))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        cur = parts[0]
        for part in parts[1:]:
            if (cur, part) not in merges:
                merges.append((cur, part))
            cur += part
            vocab.setdefault(cur, len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_SEQUENCE_LENGTH)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)
    return clip, t5


def build_text_encoders(
    clip_tok: CLIPTokenizer, t5_tok: T5Tokenizer, seed: int = 0
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """One-layer random-init encoders sized to the transformer's conditioning inputs."""
    torch.manual_seed(seed)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=TRANSFORMER_CONFIG["pooled_projection_dim"],
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_SEQUENCE_LENGTH,
        projection_dim=TRANSFORMER_CONFIG["pooled_projection_dim"],
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=TRANSFORMER_CONFIG["joint_attention_dim"],
        d_kv=32,
        d_ff=128,
        num_layers=1,
        num_heads=2,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )
    clip, t5 = CLIPTextModel(clip_cfg).eval(), T5EncoderModel(t5_cfg).eval()
    for p in [*clip.parameters(), *t5.parameters()]:
        p.requires_grad_(False)
    return clip, t5


def build_vae(seed: int = 0) -> AutoencoderKL:
    """One-level KL autoencoder: 3 RGB channels <-> LATENT_CHANNELS at full resolution."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=W.SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
        mid_block_add_attention=False,  # 1024-token attention would dominate the cost
    )


def train_vae(
    vae: AutoencoderKL, seconds: float = 120.0, seed: int = 0, log: Any = print
) -> dict[str, float]:
    """Train the VAE to reconstruct world images, then set its latent shift and scale.

    Reconstruction MSE plus a small KL term (keeps the latent smooth and well scaled for the
    flow model). Afterwards ``shift_factor``/``scaling_factor`` are set so that
    ``(z - shift) * scale`` has zero mean and unit variance on world images, the
    convention ``FluxPipeline`` inverts before decoding.

    Returns:
        Final reconstruction MSE (on [-1, 1] images), shift and scale.
    """
    world = W.World(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    start, step, mse = time.time(), 0, float("nan")
    while time.time() - start < seconds:
        x = torch.from_numpy(world.sample(16).images)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse_t = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = mse_t + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        mse = 0.95 * mse + 0.05 * mse_t.item() if step > 1 else mse_t.item()
        if step % 100 == 0:
            log(f"vae step {step} mse {mse:.5f} kl {kl.item():.4f}")
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        x = torch.from_numpy(W.World(seed + 2).sample(512).images)
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        test_mse = torch.nn.functional.mse_loss(rec, x).item()
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"vae done: {step} steps, test mse {test_mse:.5f}, shift {shift:.4f}, scale {scale:.4f}")
    return {"mse": test_mse, "shift": shift, "scale": scale, "steps": step}


def build_transformer(seed: int = 0, **overrides: Any) -> FluxTransformer2DModel:
    """A fresh small Flux transformer; ``overrides`` change TRANSFORMER_CONFIG entries."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Euler flow matching with no timestep shift: 256 tokens is the Flux base length."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )


def assemble(
    transformer: FluxTransformer2DModel,
    vae: AutoencoderKL,
    encoders: tuple[CLIPTextModel, T5EncoderModel],
    tokenizers: tuple[CLIPTokenizer, T5Tokenizer],
) -> FluxPipeline:
    """Put the components together into an in-memory ``FluxPipeline``."""
    return FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        transformer=transformer,
    )


def save_pipeline(
    pipe: FluxPipeline, folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Save as safetensors plus ``massact_toy.json`` (pipeline call defaults and metadata)."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, extra)
    return folder


def write_defaults(folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``massact_toy.json``: ``{"call": PIPELINE_DEFAULTS, **extra}``."""
    meta = {"call": PIPELINE_DEFAULTS, **(extra or {})}
    save_json(Path(folder, DEFAULTS_FILE), meta)


def read_defaults(folder: str | Path) -> dict[str, Any]:
    """Pipeline call defaults stored in a toy folder (PIPELINE_DEFAULTS if absent)."""
    path = Path(folder, DEFAULTS_FILE)
    if not path.exists():
        return dict(PIPELINE_DEFAULTS)
    return dict(json.loads(path.read_text())["call"])


def build_base(seed: int = 0, vae_seconds: float = 120.0, log: Any = print) -> FluxPipeline:
    """Every component, with the VAE already trained and the transformer freshly initialised."""
    tokenizers = build_tokenizers()
    encoders = build_text_encoders(*tokenizers, seed=seed)
    vae = build_vae(seed)
    train_vae(vae, seconds=vae_seconds, seed=seed, log=log)
    return assemble(build_transformer(seed), vae, encoders, tokenizers)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return int(sum(p.numel() for p in module.parameters()))

