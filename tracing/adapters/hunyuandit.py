"""Hunyuan-DiT: ``HunyuanDiT2DModel``.

Verified by reading diffusers 0.42.1 (``hunyuan_transformer_2d.py``, ``pipeline_hunyuandit.py``)
and by running a tiny random pipeline (tests/test_families.py):

- ``HunyuanDiTBlock.forward`` returns one tensor (text enters by cross-attention to BERT and mT5
  embeddings).
- The second half of ``blocks`` takes a long skip from the first half: such a block first
  REPLACES its input by ``skip_linear(skip_norm(cat([hidden, skip])))``, so a channel carried by
  the residual stream of the first half need not survive into the second.
- The transformer patchifies the latent by ``patch_size`` (2); ``vae_scale_factor`` 8.
- CFG: ``guidance_scale > 1`` (default 5.0) runs one batched call on ``[uncond; cond]``.
- Tiny sizes need ``use_resolution_binning=False``.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, patch_grid, scale_above_one

ADAPTER = Adapter(
    name="hunyuandit",
    transformer_classes=("HunyuanDiT2DModel",),
    blocks=(BlockList("blocks", "block", "tensor"),),
    guidance=Guidance("batched", scale_above_one("guidance_scale")),
    grid=patch_grid,
    width=lambda cfg: cfg.hidden_size,
    pipelines=("HunyuanDiTPipeline",),
    notes="Hunyuan-DiT v1.x text-to-image.",
)
