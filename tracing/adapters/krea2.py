"""Krea 2: ``Krea2Transformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_krea2.py``, ``pipeline_krea2.py``) and by
running a tiny random pipeline (tests/test_families.py):

- The text goes through the model's own text-fusion blocks (``text_fusion.*``: text only, no
  sites), then ONE joint sequence ``cat([text, image])`` runs through ``transformer_blocks``,
  each returning one tensor; the text is padded to a fixed length, so the image stream is the
  last ``n_image`` tokens of every row.
- ``Krea2Pipeline`` packs ``patch_size`` × ``patch_size`` latent pixels per token (its config,
  default 2); ``vae_scale_factor`` is ``2 ** len(vae.temperal_downsample)`` (8).
- CFG: ``guidance_scale > 0`` (default 4.5) calls the transformer twice per step, conditional
  first, then the negative prompt.
"""

from __future__ import annotations

from .base import Adapter, BlockList, Guidance, call_arg, vae_scale


def _grid(pipe, height: int, width: int) -> tuple[int, int]:
    f = vae_scale(pipe) * int(pipe.patch_size)
    return height // f, width // f


def _cfg(pipe, kw: dict) -> bool:
    scale = call_arg(pipe, kw, "guidance_scale")
    return scale is not None and float(scale) > 0


ADAPTER = Adapter(
    name="krea2",
    transformer_classes=("Krea2Transformer2DModel",),
    blocks=(BlockList("transformer_blocks", "joint", "concat_text_image"),),
    guidance=Guidance("two_calls", _cfg),
    grid=_grid,
    width=lambda cfg: cfg.num_attention_heads * cfg.attention_head_dim,
    pipelines=("Krea2Pipeline",),
    notes="Krea 2 text-to-image (base and distilled).",
)
