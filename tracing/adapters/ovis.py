"""Ovis-Image: ``OvisImageTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_ovis_image.py``, ``pipeline_ovis_image.py``)
and by running a tiny random pipeline (tests/test_families.py):

- ``OvisImageTransformerBlock.forward`` and ``OvisImageSingleTransformerBlock.forward`` both
  return ``(encoder_hidden_states, hidden_states)``.
- ``OvisImagePipeline`` packs 2×2 latent pixels per token, like FLUX.1.
- CFG: ``guidance_scale > 1`` (default 5.0) calls the transformer twice per step, conditional
  first, then the negative prompt.
- The text encoder's first 28 tokens (chat template and system prompt) are dropped.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, packed_grid, scale_above_one

ADAPTER = Adapter(
    name="ovis",
    transformer_classes=("OvisImageTransformer2DModel",),
    blocks=(
        BlockList("transformer_blocks", "double", "pair_text_image"),
        BlockList("single_transformer_blocks", "single", "pair_text_image"),
    ),
    guidance=Guidance("two_calls", scale_above_one("guidance_scale")),
    grid=packed_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("OvisImagePipeline",),
    notes="Ovis-Image text-to-image.",
)
