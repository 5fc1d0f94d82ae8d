"""Images as tensors and PNG files: conversion, grids and token-grid masks (PIL only).

Convention everywhere in the probes: an image is a float tensor ``[3, H, W]`` in ``[0, 1]`` (what
a diffusers pipeline returns with ``output_type="pt"``), a batch is ``[n, 3, H, W]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ._io import atomic_write
from .errors import MassactError


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image to an RGB (or, for ``[H, W]``, greyscale) PIL image.

    Shapes:
        image: [3, H, W] or [H, W], values in [0, 1] (clamped; bool masks become 0/255).
    """
    x = image.detach().to("cpu")
    if x.dtype == torch.bool:
        x = x.float()
    arr = (x.float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise MassactError(f"cannot turn a tensor of shape {tuple(image.shape)} into an image; "
                           "accepted: [3, H, W] or [H, W]")
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), mode="RGB")


#: PIL modes of 16-bit pixels: 16-bit greyscale PNGs open as one of these.
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N")


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it, at 8 bits per channel.

    The EXIF orientation is applied (a phone photo stored sideways is turned upright, as
    ``diffusers.utils.load_image`` does), and 16-bit pixels are scaled to 8 bits: PIL's own
    ``convert`` clips them at 255, which turns a 16-bit greyscale image almost all white.

    Raises:
        MassactError: for 32-bit float pixels, whose full scale is unknown.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        # Mode "I" (32-bit) says nothing of the range: values up to 255 are 8-bit ones (an
        # in-memory convert("I")), larger ones 16-bit.
        full = 255.0 if img.mode == "I" and arr.max(initial=0) <= 255 else 65535.0
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        raise MassactError("image has 32-bit float pixels (PIL mode 'F'), whose full scale is unknown; "
                           "accepted: 8- or 16-bit images, or a tensor")
    return img


def open_image(path: Path, what: str = "image") -> Image.Image:
    """``Image.open`` with one clear error for a file that is no image."""
    from PIL import UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()  # a truncated file opens fine and fails here, not later in a convert()
        return img
    except (UnidentifiedImageError, OSError) as e:
        raise MassactError(f"{what} file {str(path)!r} cannot be read as an image ({e}); accepted: a "
                           "PNG or JPEG file") from None


def from_pil(img: Image.Image) -> torch.Tensor:
    """A PIL image to a float RGB tensor.

    Shapes:
        -> [3, H, W] in [0, 1].
    """
    arr = np.asarray(upright(img).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_png(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as RGB, optionally resized to ``size = (height, width)`` (bicubic).

    Shapes:
        -> [3, H, W] in [0, 1].
    """
    p = Path(path)
    if not p.is_file():
        raise MassactError(f"image file {str(path)!r} does not exist; accepted: a PNG/JPEG path")
    with open_image(p) as img:
        img = upright(img).convert("RGB")
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return from_pil(img)


def save_png(path: str | Path, image: torch.Tensor) -> Path:
    """Write one image (or a greyscale/bool map) as PNG, atomically.

    Shapes:
        image: [3, H, W] or [H, W].
    """
    p = Path(path)
    pil = to_pil(image)
    atomic_write(p, lambda tmp: pil.save(tmp, format="PNG"))
    return p


def grid(images: torch.Tensor, ncols: int | None = None, pad: int = 1, value: float = 1.0) -> torch.Tensor:
    """Tile a batch of images into one image, row-major, with ``pad`` pixels between tiles.

    Shapes:
        images: [n, 3, H, W] -> [3, rows * (H + pad) - pad, ncols * (W + pad) - pad].
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise MassactError(f"grid expects a non-empty batch [n, 3, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = torch.full((c, nrows * (h + pad) - pad, ncols * (w + pad) - pad), value, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, ncols)
        out[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[i].cpu()
    return out


def mask_from_png(path: str | Path, grid_shape: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """A user-drawn mask (white = inside) resized to a token grid.

    The image is converted to greyscale, area-averaged onto the grid and thresholded, so a token
    is inside when at least ``threshold`` of its pixels are.

    Shapes:
        -> [rows, cols] bool.
    """
    p = Path(path)
    if not p.is_file():
        raise MassactError(f"mask file {str(path)!r} does not exist; accepted: a PNG path")
    rows, cols = grid_shape
    with open_image(p, "mask") as img:
        g = upright(img).convert("L").resize((cols, rows), Image.Resampling.BOX)
        arr = np.asarray(g, dtype=np.float32) / 255.0
    return torch.from_numpy(arr >= threshold)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A token-grid mask to pixel resolution by nearest neighbour (each token a block).

    Shapes:
        mask: [rows, cols] bool -> [H, W] bool, with H, W multiples of rows, cols.
    """
    rows, cols = mask.shape
    h, w = size
    if h % rows or w % cols:
        raise MassactError(f"image size {h}x{w} is not a multiple of the token grid {rows}x{cols}")
    return mask.bool().repeat_interleave(h // rows, 0).repeat_interleave(w // cols, 1)


def overlay(image: torch.Tensor, mask: torch.Tensor, colour: tuple[float, float, float] = (1.0, 0.0, 0.0),
            strength: float = 0.45) -> torch.Tensor:
    """The image tinted by ``colour`` where the pixel mask is true.

    Shapes:
        image: [3, H, W]; mask: [H, W] bool -> [3, H, W].
    """
    c = torch.tensor(colour, dtype=image.dtype).view(3, 1, 1)
    m = mask.to(image.dtype)[None] * strength
    return image * (1 - m) + c * m
