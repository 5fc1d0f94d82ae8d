"""FLUX.1 (dev, schnell, Kontext-free text-to-image): ``FluxTransformer2DModel``.

diffusers 0.42.1, ``transformer_flux.py``: ``FluxTransformerBlock.forward`` and
``FluxSingleTransformerBlock.forward`` both return ``(encoder_hidden_states, hidden_states)``.
The single block concatenates [text; image] inside and returns slices of the joint tensor (views:
clone what you keep). ``FluxPipeline`` packs 2×2 latent pixels per token; true CFG
(``true_cfg_scale > 1`` with a negative prompt) calls the transformer twice per step, conditional
first.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, packed_grid


def _true_cfg(pipe, kw: dict) -> bool:
    neg = kw.get("negative_prompt") is not None or kw.get("negative_prompt_embeds") is not None
    return float(kw.get("true_cfg_scale", 1.0)) > 1 and neg


ADAPTER = Adapter(
    name="flux",
    transformer_classes=("FluxTransformer2DModel",),
    blocks=(
        BlockList("transformer_blocks", "double", "pair_text_image"),
        BlockList("single_transformer_blocks", "single", "pair_text_image"),
    ),
    guidance=Guidance("two_calls", _true_cfg),
    grid=packed_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    notes="FLUX.1-dev/schnell; guidance-distilled (guidance_scale is an embedding, one call).",
    # FluxPipeline feeds guidance_scale only to a transformer with guidance_embeds (dev, not schnell).
    scale_ignored=lambda pipe, kw: not getattr(pipe.transformer.config, "guidance_embeds", False),
)
