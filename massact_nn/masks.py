"""Token masks and pixel masks: resampling, IoU, checks, PNG input/output, trivial baselines.

A *token mask* is a boolean ``[rows, cols]`` grid over a DiT's image tokens (row-major, the
order FLUX packs latents in); a *pixel mask* is a boolean ``[H, W]`` image. Each token covers a
``H // rows`` by ``W // cols`` block of pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import MassactError
from .images import open_image, upright, upsample_mask

__all__ = [
    "border_tokens", "centre_blob", "check_complement", "check_mask_shape", "colour_mask",
    "binary_mask", "downsample_majority", "iou", "load_png_mask", "save_png_mask", "token_grid_of",
    "upsample_nearest",
]


def _as_bool(mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
    return binary_mask(t)


def binary_mask(m: torch.Tensor | np.ndarray, what: str = "mask") -> torch.Tensor:
    """A bool mask from a bool or 0/1 array; anything else (a soft mask, 0/255) is refused.

    ``.bool()`` alone would make every nonzero value inside: a soft mask of 0.1s covers the image.

    Raises:
        MassactError: naming a few of the values that are neither 0 nor 1.
    """
    m = torch.as_tensor(m)
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise MassactError(f"{what} is complex; accepted: a bool or 0/1 mask")
    if not ((m == 0) | (m == 1)).all():
        shown = sorted({float(v) for v in m.flatten()[:10_000].tolist()} - {0.0, 1.0})[:3]
        raise MassactError(f"{what} has values other than 0 and 1 (e.g. {shown}); accepted: a bool or "
                           "0/1 mask (threshold a soft mask first, e.g. m >= 0.5)")
    return m == 1


def check_mask_shape(mask: torch.Tensor, shape: tuple[int, int], what: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor after checking that it is exactly ``shape``.

    Raises:
        MassactError: naming the shape given and the one accepted.
    """
    m = _as_bool(mask)
    if tuple(m.shape) != tuple(shape):
        raise MassactError(f"{what} has shape {tuple(m.shape)}; accepted: {tuple(shape)}")
    return m


def token_grid_of(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A flat token mask ``[rows * cols]`` as its ``[rows, cols]`` grid (row-major).

    Shapes:
        mask: [rows * cols] -> [rows, cols].
    """
    m = _as_bool(mask)
    if m.numel() != rows * cols:
        raise MassactError(f"token mask has {m.numel()} tokens; accepted: {rows}x{cols}={rows * cols}")
    return m.reshape(rows, cols)


def upsample_nearest(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A token mask at image resolution: each token fills its block of pixels.

    Shapes:
        mask: [rows, cols] -> [height, width].

    Raises:
        MassactError: when the image size is not a whole multiple of the grid.
    """
    return upsample_mask(_as_bool(mask), (height, width))


def downsample_majority(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A pixel mask on the token grid: a token is foreground when at least half its pixels are.

    Ties (exactly half) count as foreground, so a thin shape is not lost at coarse grids.

    Shapes:
        mask: [H, W] -> [rows, cols].
    """
    m = _as_bool(mask)
    h, w = m.shape
    if h % rows or w % cols:
        raise MassactError(f"mask {h}x{w} is not a whole multiple of the token grid {rows}x{cols}")
    frac = m.float().reshape(rows, h // rows, cols, w // cols).mean(dim=(1, 3))
    return frac >= 0.5


def iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty).

    Shapes:
        pred, truth: [...] (same shape).
    """
    a, b = _as_bool(pred), _as_bool(truth)
    if a.shape != b.shape:
        raise MassactError(f"mask shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def check_complement(foreground: torch.Tensor, background: torch.Tensor) -> None:
    """Raise unless the two masks are disjoint and together cover every token.

    Shapes:
        foreground, background: [rows, cols].
    """
    f, b = _as_bool(foreground), _as_bool(background)
    if f.shape != b.shape:
        raise MassactError(f"mask shapes differ: {tuple(f.shape)} vs {tuple(b.shape)}")
    if (f & b).any():
        raise MassactError(f"foreground and background overlap on {int((f & b).sum())} tokens")
    if not (f | b).all():
        raise MassactError(f"{int((~(f | b)).sum())} tokens are in neither foreground nor background")


def border_tokens(rows: int, cols: int) -> torch.Tensor:
    """Tokens on the outermost ring of the grid.

    Shapes:
        -> [rows, cols] bool.
    """
    b = torch.zeros(rows, cols, dtype=torch.bool)
    b[0, :] = b[-1, :] = True
    b[:, 0] = b[:, -1] = True
    return b


def centre_blob(rows: int, cols: int, radius: float = 0.3) -> torch.Tensor:
    """The trivial "object in the middle" baseline: tokens whose centre lies within a disc.

    Args:
        rows: Grid rows.
        cols: Grid columns.
        radius: Disc radius as a fraction of the shorter side (0.3 covers about 28% of a
            square grid, close to a centred object's usual share).

    Shapes:
        -> [rows, cols] bool.
    """
    y = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows - 0.5
    x = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols - 0.5
    scale = min(rows, cols)
    dy, dx = y[:, None] * rows / scale, x[None, :] * cols / scale
    return dy * dy + dx * dx <= radius * radius


def colour_mask(image: torch.Tensor, fg_rgb: torch.Tensor, bg_rgb: torch.Tensor) -> torch.Tensor:
    """Pixels nearer to the foreground colour than to the background colour.

    A pseudo ground truth for generated images of a flat-colour world whose caption names
    both colours (the generated image itself has no true mask).

    Shapes:
        image: [3, H, W] (same value range as the colours); fg_rgb, bg_rgb: [3] -> [H, W] bool.
    """
    img = torch.as_tensor(image).float()
    fg = torch.as_tensor(fg_rgb).float().reshape(3, 1, 1)
    bg = torch.as_tensor(bg_rgb).float().reshape(3, 1, 1)
    return ((img - fg) ** 2).sum(0) < ((img - bg) ** 2).sum(0)


def load_png_mask(path: str | Path, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a mask PNG: any pixel brighter than half of full scale is foreground.

    Args:
        path: PNG file (greyscale at 1, 8 or 16 bits, palette, RGB or RGBA: the first colour
            channel is used).
        shape: Required ``(H, W)``, checked when given.

    Shapes:
        -> [H, W] bool.

    Raises:
        MassactError: for a missing or unreadable file, or a wrong shape.
    """
    p = Path(path)
    if not p.is_file():
        raise MassactError(f"mask file {str(path)!r} does not exist; accepted: a PNG file")
    with open_image(p, "mask") as img:
        img = upright(img)
        # A palette image's pixels are palette indices (0, 1, ...): read the colours they stand for.
        arr = np.asarray(img.convert("RGB") if img.mode in ("P", "PA") else img)
    if arr.ndim == 3:
        arr = arr[..., 0]
    full = 1 if arr.dtype == bool else 255
    m = torch.from_numpy(arr.astype(np.float32) > full / 2)
    return check_mask_shape(m, shape, f"mask {p.name}") if shape is not None else m


def save_png_mask(path: str | Path, mask: torch.Tensor) -> None:
    """Write a boolean mask as an 8-bit greyscale PNG (255 = foreground), atomically.

    Shapes:
        mask: [H, W].
    """
    from PIL import Image

    from ._io import atomic_write

    arr = (_as_bool(mask).numpy().astype(np.uint8)) * 255
    atomic_write(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
