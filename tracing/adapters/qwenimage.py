"""Qwen-Image: ``QwenImageTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_qwenimage.py``, ``pipeline_qwenimage.py``)
and by running a tiny random pipeline (tests/test_families.py):

- ``QwenImageTransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``.
- ``QwenImagePipeline`` packs 2×2 latent pixels per token; ``vae_scale_factor`` is
  ``2 ** len(vae.temperal_downsample)`` (8).
- True CFG: ``true_cfg_scale > 1`` (default 4.0) AND a negative prompt (or its embeddings) runs
  the transformer twice per step, conditional first.
- The text encoder's first 34 tokens (the system template) are dropped from the prompt
  embeddings (``prompt_template_encode_start_idx``).
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, call_arg, packed_grid


def _true_cfg(pipe, kw: dict) -> bool:
    neg = kw.get("negative_prompt") is not None or kw.get("negative_prompt_embeds") is not None
    scale = call_arg(pipe, kw, "true_cfg_scale")
    return neg and scale is not None and float(scale) > 1


ADAPTER = Adapter(
    name="qwenimage",
    transformer_classes=("QwenImageTransformer2DModel",),
    blocks=(BlockList("transformer_blocks", "double", "pair_text_image"),),
    guidance=Guidance("two_calls", _true_cfg),
    grid=packed_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("QwenImagePipeline",),
    notes="Qwen-Image text-to-image; true CFG (two calls) only with a negative prompt.",
)
