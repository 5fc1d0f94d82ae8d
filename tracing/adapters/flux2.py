"""FLUX.2 (dev, klein): ``Flux2Transformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_flux2.py``, ``pipeline_flux2.py``,
``pipeline_flux2_klein.py``) and by running tiny random klein and dev pipelines (tests/test_families.py):

- ``Flux2TransformerBlock.forward`` returns ``(encoder_hidden_states, hidden_states)``.
- The model concatenates ``[text; image]`` once before the single blocks, and
  ``Flux2SingleTransformerBlock.forward`` (called with ``encoder_hidden_states=None``) returns ONE
  joint tensor: the image stream is its last ``n_image`` tokens. Text-to-image only: with
  reference images the pipelines append the reference latents after the generated ones.
- Both pipelines pack 2×2 latent pixels per token (``vae_scale_factor * 2`` pixels per token).
- ``Flux2Pipeline`` (dev) is guidance-distilled: one call per step. ``Flux2KleinPipeline`` with
  ``guidance_scale > 1`` and ``is_distilled=False`` calls the transformer twice per step,
  conditional first, then the negative (empty) prompt.
- No biases anywhere (planting a channel needs weights, not a bias).
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, call_arg, packed_grid


def _klein_cfg(pipe, kw: dict) -> bool:
    # Flux2Pipeline has no `is_distilled` config entry and never runs CFG; klein registers it.
    distilled = getattr(pipe.config, "is_distilled", None)
    if distilled is None or distilled:
        return False
    scale = call_arg(pipe, kw, "guidance_scale")
    return scale is not None and float(scale) > 1


ADAPTER = Adapter(
    name="flux2",
    transformer_classes=("Flux2Transformer2DModel",),
    blocks=(
        BlockList("transformer_blocks", "double", "pair_text_image"),
        BlockList("single_transformer_blocks", "single", "concat_text_image"),
    ),
    guidance=Guidance("two_calls", _klein_cfg),
    grid=packed_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("Flux2Pipeline", "Flux2KleinPipeline"),
    notes="FLUX.2-dev (one call, guidance embedding) and FLUX.2-klein (true CFG, two calls).",
)
