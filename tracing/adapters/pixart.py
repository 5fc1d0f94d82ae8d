"""PixArt-α / PixArt-Σ: ``PixArtTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``pixart_transformer_2d.py``, ``attention.py``'s
``BasicTransformerBlock``, ``pipeline_pixart_alpha.py``, ``pipeline_pixart_sigma.py``) and by
running tiny random PixArt-Σ and PixArt-α pipelines (tests/test_families.py):

- ``BasicTransformerBlock.forward`` returns one tensor (text enters by cross-attention).
- The transformer patchifies the latent by ``patch_size`` (2); ``vae_scale_factor`` 8.
- CFG: ``guidance_scale > 1`` (default 4.5) runs one batched call on ``[uncond; cond]``.
- Tiny sizes need ``use_resolution_binning=False``; offline use needs ``clean_caption=False``.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, patch_grid, scale_above_one

ADAPTER = Adapter(
    name="pixart",
    transformer_classes=("PixArtTransformer2DModel",),
    blocks=(BlockList("transformer_blocks", "block", "tensor"),),
    guidance=Guidance("batched", scale_above_one("guidance_scale")),
    grid=patch_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    notes="PixArt-α and PixArt-Σ text-to-image.",
)
