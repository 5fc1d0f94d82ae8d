"""Chroma: ``ChromaTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_chroma.py``, ``pipeline_chroma.py``) and by
running a tiny random pipeline (tests/test_families.py):

- ``ChromaTransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``.
- The model concatenates ``[text; image]`` before the single blocks, and
  ``ChromaSingleTransformerBlock.forward`` returns ONE joint tensor (image = last ``n_image``
  tokens).
- ``ChromaPipeline`` packs 2×2 latent pixels per token, like FLUX.1.
- CFG: ``guidance_scale > 1`` (default 5.0) calls the transformer twice per step, conditional
  first, then the negative prompt.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, packed_grid, scale_above_one

ADAPTER = Adapter(
    name="chroma",
    transformer_classes=("ChromaTransformer2DModel",),
    blocks=(
        BlockList("transformer_blocks", "double", "pair_text_image"),
        BlockList("single_transformer_blocks", "single", "concat_text_image"),
    ),
    guidance=Guidance("two_calls", scale_above_one("guidance_scale")),
    grid=packed_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("ChromaPipeline",),
    notes="Chroma text-to-image (ChromaPipeline).",
)
