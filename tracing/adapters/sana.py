"""SANA (1.0, 1.5): ``SanaTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``sana_transformer.py``, ``pipeline_sana.py``) and by
running a tiny random pipeline (tests/test_families.py):

- ``SanaTransformerBlock.forward`` returns one tensor (text enters by cross-attention).
- The transformer patchifies the DC-AE latent by ``patch_size`` (1 for the released models);
  ``vae_scale_factor`` is 32 for DC-AE.
- CFG: ``guidance_scale > 1`` (default 4.5) runs one batched call on ``[uncond; cond]``.
- ``complex_human_instruction`` (a long prompt prefix) is prepended unless it is ``None``.
- ``SanaSprintPipeline`` (``pipeline_sana_sprint.py``) runs the same transformer (with
  ``guidance_embeds``) once per step: ``guidance_scale`` is an embedding there, never CFG.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, patch_grid, scale_above_one

_cfg_scale = scale_above_one("guidance_scale")


def _cfg(pipe, kw: dict) -> bool:
    # SANA-Sprint is guidance-distilled: one call per step whatever guidance_scale says.
    return type(pipe).__name__ != "SanaSprintPipeline" and _cfg_scale(pipe, kw)

ADAPTER = Adapter(
    name="sana",
    transformer_classes=("SanaTransformer2DModel",),
    blocks=(BlockList("transformer_blocks", "block", "tensor"),),
    guidance=Guidance("batched", _cfg),
    grid=patch_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("SanaPipeline", "SanaSprintPipeline"),
    notes="SANA/SANA 1.5 (SanaPipeline) and SANA-Sprint (SanaSprintPipeline) text-to-image; PAG not "
    "verified.",
)
