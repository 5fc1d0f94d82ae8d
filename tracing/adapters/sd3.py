"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_sd3.py``, ``attention.py``'s
``JointTransformerBlock``, ``pipeline_stable_diffusion_3.py``) and by running a tiny random
pipeline (tests/test_families.py):

- ``JointTransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``; the last
  block (``context_pre_only``) returns ``(None, hidden_states)``.
- The transformer patchifies the latent by ``patch_size`` (2); ``vae_scale_factor`` 8.
- CFG: ``guidance_scale > 1`` (default 7.0) runs one batched call on ``[uncond; cond]``.
  Skip-layer guidance (``skip_guidance_layers``) adds transformer calls on some steps: refused.
"""

from __future__ import annotations

from massact_nn.errors import MassactError

from .base import Adapter, BlockList, Guidance, call_arg, patch_grid


def _cfg(pipe, kw: dict) -> bool:
    if kw.get("skip_guidance_layers"):
        raise MassactError(
            f"skip_guidance_layers={kw['skip_guidance_layers']!r} adds transformer calls on some steps, "
            "which this library does not schedule; accepted: None"
        )
    scale = call_arg(pipe, kw, "guidance_scale")
    return scale is not None and float(scale) > 1


ADAPTER = Adapter(
    name="sd3",
    transformer_classes=("SD3Transformer2DModel",),
    blocks=(BlockList("transformer_blocks", "joint", "pair_text_image"),),
    guidance=Guidance("batched", _cfg),
    grid=patch_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("StableDiffusion3Pipeline",),
    notes="SD3-medium, SD3.5-medium/large/large-turbo; the dual-attention (MMDiT-X) blocks of "
    "SD3.5-medium return the same pair.",
)
