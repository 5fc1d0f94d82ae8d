"""Z-Image (Turbo, base): ``ZImageTransformer2DModel``.

Verified by reading diffusers 0.42.1 (``transformer_z_image.py``, ``pipeline_z_image.py``) and by
running a tiny random pipeline (tests/test_families.py):

- Every block (``ZImageTransformerBlock.forward``) returns ONE tensor.
- ``noise_refiner`` runs on the image tokens alone, padded to a multiple of 32
  (``SEQ_MULTI_OF``): image = the first ``n_image`` tokens.
- ``context_refiner`` runs on the text alone: no image stream, so no sites.
- ``layers`` run on a per-sample ``[image (+ its padding); text]`` sequence (text-to-image,
  "basic" mode): image = the first ``n_image`` tokens, at the same offset in every row.
- The pipeline packs 2×2 latent pixels per token (``vae_scale_factor * 2`` pixels per token).
- CFG runs when ``guidance_scale > 0`` as ONE batched call with rows ``[cond; uncond]`` (the
  conditional rows FIRST, unlike the other batched families), and ``cfg_truncation`` can switch
  it off for later steps (the batch then shrinks). This library's row bookkeeping assumes
  ``[uncond; cond]`` with a fixed batch, so guidance is refused: use ``guidance_scale=0``, which
  is Z-Image-Turbo's own setting.
"""

from __future__ import annotations

from massact_nn.errors import MassactError

from .base import Adapter, BlockList, Guidance, call_arg, packed_grid


def _refuse_cfg(pipe, kw: dict) -> bool:
    scale = call_arg(pipe, kw, "guidance_scale")
    if scale is not None and float(scale) > 0:
        raise MassactError(
            f"guidance_scale={scale!r}: Z-Image's CFG batches [cond; uncond] rows and may drop them per "
            "step, which this library does not track; accepted: guidance_scale=0 (Z-Image-Turbo's setting)"
        )
    return False


ADAPTER = Adapter(
    name="zimage",
    transformer_classes=("ZImageTransformer2DModel",),
    blocks=(
        BlockList("noise_refiner", "refiner", "image_then_pad"),
        BlockList("layers", "joint", "concat_image_text"),
    ),
    guidance=Guidance("none", _refuse_cfg),
    grid=packed_grid,
    width=lambda cfg: cfg.dim,
    pipelines=("ZImagePipeline",),
    notes="Z-Image text-to-image without CFG (guidance_scale=0, as Z-Image-Turbo runs); omni mode "
    "not verified.",
)
