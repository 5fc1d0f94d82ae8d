"""CogView4: ``CogView4Transformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_cogview4.py``, ``pipeline_cogview4.py``) and
by running a tiny random pipeline (tests/test_families.py):

- ``CogView4TransformerBlock.forward`` returns ``(hidden_states, encoder_hidden_states)``: the
  image stream comes FIRST.
- The transformer patchifies the latent by ``patch_size`` (2); ``vae_scale_factor`` 8.
- CFG: ``guidance_scale > 1`` (default 5.0) calls the transformer twice per step, conditional
  first, then the negative prompt.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, patch_grid, scale_above_one

ADAPTER = Adapter(
    name="cogview4",
    transformer_classes=("CogView4Transformer2DModel",),
    blocks=(BlockList("transformer_blocks", "double", "pair_image_text"),),
    guidance=Guidance("two_calls", scale_above_one("guidance_scale")),
    grid=patch_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("CogView4Pipeline",),
    notes="CogView4 text-to-image (CogView4Pipeline); the Control pipeline is not verified.",
)
