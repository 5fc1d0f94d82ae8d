"""A synthetic "shapes world" with exact ground truth, for the embedded toy model.

Every image shows one large foreground shape of one colour on a background of another
colour, e.g. "a red circle on a blue background". Images are rendered vectorised in
numpy, so tens of thousands per minute are cheap, and every image comes with its exact
boolean foreground mask and integer attributes.

Design choices (why): an earlier attempt learnt colours quickly but shapes stayed near
chance, so shapes here are large (half-extent 9-12 px on a 32 px canvas), only four and
mutually very distinct, close to the centre, and drawn in flat colour. The background has a
gentle brightness gradient and faint pixel noise so that background and foreground are
not trivially the same kind of region.

This module is deliberately pure numpy/torch-free: it must not import diffusers,
transformers, nnsight or plotly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BG_COLOURS",
    "COLOURS",
    "RGB",
    "SHAPES",
    "SIZE",
    "World",
    "WorldBatch",
    "all_captions",
    "caption_for",
    "parse_caption",
    "render",
]

SIZE = 32
"""Image height and width in pixels."""

COLOURS: list[str] = ["red", "green", "blue", "yellow", "white", "black"]
"""Foreground colour names; index = attribute value."""

BG_COLOURS: list[str] = list(COLOURS)
"""Background colour names (same palette; a background never equals its foreground)."""

SHAPES: list[str] = ["circle", "square", "triangle", "cross"]
"""Shape names; index = attribute value."""

RGB = np.array(
    [
        [220, 40, 40],  # red
        [40, 175, 60],  # green
        [45, 75, 225],  # blue
        [240, 215, 40],  # yellow
        [240, 240, 240],  # white
        [25, 25, 25],  # black
    ],
    dtype=np.float32,
) / 127.5 - 1.0
"""Palette in [-1, 1]. Shapes: [len(COLOURS), 3]."""

_MIN_HALF, _MAX_HALF = 9, 12  # shape half-extent in px (inclusive range)
_MAX_SHIFT = 3  # centre jitter in px, each axis
_GRAD_MAX = 0.2  # max background brightness change across the image
_NOISE_STD = 0.02  # faint per-pixel background noise


@dataclass
class WorldBatch:
    """A batch of world samples.

    Attributes:
        images: float32 RGB in [-1, 1]. Shapes: [n, 3, H, W].
        masks: True on foreground pixels. Shapes: [n, H, W].
        captions: one caption per image.
        attributes: int arrays of length n: ``fg_colour``, ``shape``, ``bg_colour``,
            ``half`` (half-extent px), ``dx``, ``dy`` (centre offset px); and float arrays
            ``grad_x``, ``grad_y`` (background gradient). Shapes: [n] each.
    """

    images: np.ndarray
    masks: np.ndarray
    captions: list[str]
    attributes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.captions)


def caption_for(fg_colour: int, shape: int, bg_colour: int) -> str:
    """Caption of one attribute triple, e.g. ``"a red circle on a blue background"``."""
    return f"a {COLOURS[fg_colour]} {SHAPES[shape]} on a {BG_COLOURS[bg_colour]} background"


def parse_caption(text: str) -> dict[str, int]:
    """Inverse of :func:`caption_for`.

    Raises:
        ValueError: if the text is not a world caption (one with the same foreground and
            background colour included: the world never draws it).
    """
    words = text.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a world caption: {text!r}")
    try:
        out = {
            "fg_colour": COLOURS.index(words[1]),
            "shape": SHAPES.index(words[2]),
            "bg_colour": BG_COLOURS.index(words[5]),
        }
    except ValueError:
        raise ValueError(f"unknown word in caption: {text!r}") from None
    if words[1] == words[5]:  # the world never draws a shape in its background's colour
        raise ValueError(f"not a world caption: {text!r} (foreground and background are both {words[1]})")
    return out


def all_captions() -> list[str]:
    """Every caption the world can produce (fg != bg), in a fixed order."""
    return [
        caption_for(f, s, b)
        for f in range(len(COLOURS))
        for s in range(len(SHAPES))
        for b in range(len(BG_COLOURS))
        if f != b
    ]


def _masks(attrs: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Foreground masks for the given geometry. Shapes: [n, size, size] bool."""
    centre = size / 2.0
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    yy = coords[None, :, None]
    xx = coords[None, None, :]
    half = attrs["half"].astype(np.float32)[:, None, None]
    dx = xx - (centre + attrs["dx"][:, None, None])
    dy = yy - (centre + attrs["dy"][:, None, None])
    adx, ady = np.abs(dx), np.abs(dy)
    # Circle a bit smaller than the square and the cross so that their outlines differ more.
    circle = dx * dx + dy * dy <= (0.9 * half) ** 2
    # Full-extent square: an area-matched one differs from the circle in only ~5% of pixels.
    square = (adx <= half) & (ady <= half)
    # Upward triangle: apex at top, base at dy = +half, base half-width 1.15 * half.
    triangle = (dy <= half) & (adx <= 1.15 * (dy + half) / 2.0)
    arm = 0.3 * half
    cross = ((adx <= arm) & (ady <= half)) | ((ady <= arm) & (adx <= half))
    stack = np.stack([circle, square, triangle, cross])  # [4, n, H, W]
    return stack[attrs["shape"], np.arange(len(attrs["shape"]))]


def render(
    attrs: dict[str, np.ndarray], rng: np.random.Generator | None = None, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Render images for an attribute set.

    Args:
        attrs: int arrays ``fg_colour``, ``shape``, ``bg_colour`` (required), optional
            ``half``, ``dx``, ``dy`` (default: 10, 0, 0) and float ``grad_x``, ``grad_y``
            (default 0). Shapes: [n] each.
        rng: source of the faint background noise; None renders without noise.
        size: canvas size in pixels.

    Returns:
        ``(images, masks)``. Shapes: [n, 3, size, size] float32 in [-1, 1]; [n, size, size] bool.
    """
    n = len(attrs["fg_colour"])
    full = {
        "half": np.full(n, 10),
        "dx": np.zeros(n, dtype=np.int64),
        "dy": np.zeros(n, dtype=np.int64),
        "grad_x": np.zeros(n, dtype=np.float32),
        "grad_y": np.zeros(n, dtype=np.float32),
    }
    full.update({k: np.asarray(v) for k, v in attrs.items()})
    masks = _masks(full, size)
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5  # [-0.5, 0.5]
    shade = (
        full["grad_x"][:, None, None].astype(np.float32) * ramp[None, None, :]
        + full["grad_y"][:, None, None].astype(np.float32) * ramp[None, :, None]
    )  # [n, H, W]
    bg = RGB[full["bg_colour"]][:, :, None, None] + shade[:, None]
    if rng is not None:
        bg = bg + rng.normal(0.0, _NOISE_STD, size=bg.shape).astype(np.float32)
    fg = np.broadcast_to(RGB[full["fg_colour"]][:, :, None, None], bg.shape)
    images = np.where(masks[:, None], fg, bg)
    return np.clip(images, -1.0, 1.0).astype(np.float32), masks


class World:
    """Seeded generator of captioned shape images.

    Args:
        seed: seed of the internal generator used when :meth:`sample` gets no seed.
        size: canvas size in pixels.
    """

    def __init__(self, seed: int = 0, size: int = SIZE) -> None:
        self.size = size
        self._rng = np.random.default_rng(seed)

    def sample_attributes(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Draw n attribute sets (uniform, fg colour never equal to bg colour)."""
        fg = rng.integers(0, len(COLOURS), n)
        # Draw bg among the other colours so every (fg, bg) pair is equally likely.
        bg = (fg + rng.integers(1, len(BG_COLOURS), n)) % len(BG_COLOURS)
        angle = rng.uniform(0.0, 2.0 * np.pi, n)
        amp = rng.uniform(0.0, _GRAD_MAX, n)
        return {
            "fg_colour": fg,
            "shape": rng.integers(0, len(SHAPES), n),
            "bg_colour": bg,
            "half": rng.integers(_MIN_HALF, _MAX_HALF + 1, n),
            "dx": rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, n),
            "dy": rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, n),
            "grad_x": (amp * np.cos(angle)).astype(np.float32),
            "grad_y": (amp * np.sin(angle)).astype(np.float32),
        }

    def sample(self, n: int, seed: int | np.random.Generator | None = None) -> WorldBatch:
        """Draw a batch; the same ``seed`` always gives the same batch.

        Args:
            n: number of images.
            seed: an int seed or a Generator; None draws from the world's own generator.

        Returns:
            A :class:`WorldBatch` (images [n, 3, H, W], masks [n, H, W]).
        """
        if seed is None:
            rng = self._rng
        elif isinstance(seed, np.random.Generator):
            rng = seed
        else:
            rng = np.random.default_rng(seed)
        attrs = self.sample_attributes(n, rng)
        images, masks = render(attrs, rng, self.size)
        captions = [
            caption_for(f, s, b)
            for f, s, b in zip(attrs["fg_colour"], attrs["shape"], attrs["bg_colour"], strict=True)
        ]
        return WorldBatch(images=images, masks=masks, captions=captions, attributes=attrs)
