"""AuraFlow: ``AuraFlowTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``auraflow_transformer_2d.py``, ``pipeline_aura_flow.py``)
and by running a tiny random pipeline (tests/test_families.py):

- ``AuraFlowJointTransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``.
- The model concatenates ``[registers + text; image]`` before the single blocks, and
  ``AuraFlowSingleTransformerBlock.forward`` returns ONE joint tensor (image = last ``n_image``
  tokens).
- The transformer patchifies the latent by ``patch_size`` (2); ``vae_scale_factor`` 8.
- CFG: ``guidance_scale > 1`` (default 3.5) runs one batched call on ``[uncond; cond]``.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, patch_grid, scale_above_one

ADAPTER = Adapter(
    name="auraflow",
    transformer_classes=("AuraFlowTransformer2DModel",),
    blocks=(
        BlockList("joint_transformer_blocks", "joint", "pair_text_image"),
        BlockList("single_transformer_blocks", "single", "concat_text_image"),
    ),
    guidance=Guidance("batched", scale_above_one("guidance_scale")),
    grid=patch_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("AuraFlowPipeline",),
    notes="AuraFlow v0.x text-to-image (AuraFlowPipeline).",
)
