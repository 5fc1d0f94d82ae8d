"""Image distances for probe results: MSE, PSNR, and distances inside/outside a mask."""

from __future__ import annotations

import math

import torch

from .errors import MassactError
from .masks import binary_mask


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise MassactError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; "
                           "accepted: two batches of the same size and resolution")
    if a.ndim != 4:
        raise MassactError(f"expected image batches [n, 3, H, W], got {tuple(a.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image.

    Shapes:
        a, b: [n, 3, H, W] -> [n].
    """
    _check_pair(a, b)
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (``inf`` for identical images).

    Shapes:
        a, b: [n, 3, H, W] -> [n].
    """
    e = mse(a, b)
    return 10.0 * torch.log10(data_range**2 / e)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image over the pixels where ``mask`` is true (NaN if none).

    Args:
        a: First batch.
        b: Second batch.
        mask: Pixel mask, bool or 0/1 (a soft mask is refused), shared by every image
            (``[H, W]``) or one per image (``[n, H, W]``).

    Shapes:
        a, b: [n, 3, H, W]; mask: [H, W] or [n, H, W] -> [n].
    """
    _check_pair(a, b)
    n, _, h, w = a.shape
    if mask.shape not in ((h, w), (n, h, w)):
        raise MassactError(f"mask shape {tuple(mask.shape)} does not fit images {tuple(a.shape)}; "
                           f"accepted: [{h}, {w}] or [{n}, {h}, {w}]")
    m = binary_mask(mask, "pixel mask").expand(n, h, w).to(a.device)
    err = (a.float() - b.float()).pow(2).mean(1)  # [n, H, W]
    count = m.flatten(1).sum(1)
    total = (err * m).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def inside_outside(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE over the whole image, inside the mask and outside it.

    Shapes:
        a, b: [n, 3, H, W]; mask: [H, W] or [n, H, W] -> each value [n].
    """
    m = binary_mask(mask, "pixel mask")
    return {"all": mse(a, b), "inside": masked_mse(a, b, m), "outside": masked_mse(a, b, ~m)}


def summarise(values: torch.Tensor) -> float | None:
    """Mean of a per-image metric as a JSON-safe float.

    NaN entries (an empty mask) are skipped; a non-finite mean (PSNR of identical images) is
    ``None``, so the JSON stays standard: read it with the MSE, which is then 0.
    """
    v = values.float()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return None
    m = float(v.mean())
    return m if math.isfinite(m) else None
