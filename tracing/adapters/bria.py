"""Bria 3.x: ``BriaTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_bria.py``, ``pipeline_bria.py``) and by
running a tiny random pipeline (tests/test_families.py):

- ``BriaTransformerBlock.forward`` and ``BriaSingleTransformerBlock.forward`` both return
  ``(encoder_hidden_states, hidden_states)`` (the single block concatenates and splits inside).
- ``BriaPipeline``'s ``vae_scale_factor`` is ``2 ** len(block_out_channels)`` (16), with the 2×2
  packing already inside it: one token per ``vae_scale_factor`` pixels.
- CFG: ``guidance_scale > 1`` (default 5) runs one batched call on ``[uncond; cond]``.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, scale_above_one, vae_scale


def _grid(pipe, height: int, width: int) -> tuple[int, int]:
    f = vae_scale(pipe)
    return height // f, width // f


ADAPTER = Adapter(
    name="bria",
    transformer_classes=("BriaTransformer2DModel",),
    blocks=(
        BlockList("transformer_blocks", "double", "pair_text_image"),
        BlockList("single_transformer_blocks", "single", "pair_text_image"),
    ),
    guidance=Guidance("batched", scale_above_one("guidance_scale")),
    grid=_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("BriaPipeline",),
    notes="Bria 3.x text-to-image (BriaPipeline).",
)
