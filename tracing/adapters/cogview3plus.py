"""CogView3-Plus: ``CogView3PlusTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_cogview3plus.py``,
``pipeline_cogview3plus.py``) and by running a tiny random pipeline (tests/test_families.py):

- ``CogView3PlusTransformerBlock.forward`` returns ``(hidden_states, encoder_hidden_states)``:
  the image stream comes FIRST.
- The transformer patchifies the latent by ``patch_size`` (2); ``vae_scale_factor`` 8.
- CFG: ``guidance_scale > 1`` (default 5.0) runs one batched call on ``[uncond; cond]``.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, patch_grid, scale_above_one

ADAPTER = Adapter(
    name="cogview3plus",
    transformer_classes=("CogView3PlusTransformer2DModel",),
    blocks=(BlockList("transformer_blocks", "double", "pair_image_text"),),
    guidance=Guidance("batched", scale_above_one("guidance_scale")),
    grid=patch_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("CogView3PlusPipeline",),
    notes="CogView3-Plus text-to-image (CogView3PlusPipeline).",
)
