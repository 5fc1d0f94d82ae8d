"""The segmentation probe's result: token masks per channel set, site and step, and aggregated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import load_json, load_tensors, save_json, save_tensors
from .errors import MassactError, choice_error
from .images import overlay
from .masks import check_mask_shape, iou, upsample_nearest

RESULT_FILE, META_FILE = "result.safetensors", "meta.json"


@dataclass
class SegmentationResult:
    """Foreground masks of one image from K=2 clustering of its tokens on chosen channels.

    Attributes:
        aggregated: Per channel set (``top``, ``all``, ``random``, ``low``, ...): the mask
            aggregated over every site and step. Shapes: [rows, cols] bool each.
        per_block: Per ``"<set>/<module>/<step>"``: that block's own mask. Shapes: [rows, cols].
        channels: Per ``"<set>/<module>"``: the channel ids used. Shapes: [k] int64 each.
        baselines: Trivial masks for comparison (``all_foreground``, ``centre``, ``input``: the
            transformer's noisy input tokens clustered the same way). Shapes: [rows, cols].
        primary: The channel set whose mask is :attr:`mask`.
        image_size: ``(H, W)`` in pixels.
        image: The image segmented (generated, or the real input), RGB in [0, 1], or ``None``.
            Shapes: [3, H, W].
        meta: Model, versions, source (prompt or image + caption + t), seed, sites, steps,
            features, foreground rule, aggregation, k.
    """

    aggregated: dict[str, torch.Tensor]
    per_block: dict[str, torch.Tensor]
    channels: dict[str, torch.Tensor]
    baselines: dict[str, torch.Tensor] = field(default_factory=dict)
    primary: str = "top"
    image_size: tuple[int, int] = (0, 0)
    image: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the token grid."""
        m = next(iter(self.aggregated.values()))
        return int(m.shape[0]), int(m.shape[1])

    @property
    def mask(self) -> torch.Tensor:
        """The primary foreground token mask. Shapes: [rows, cols] bool."""
        return self.set_mask(self.primary)

    @property
    def background(self) -> torch.Tensor:
        """The primary mask's complement. Shapes: [rows, cols] bool."""
        return ~self.mask

    def set_mask(self, name: str) -> torch.Tensor:
        """The aggregated mask of one channel set or baseline. Shapes: [rows, cols] bool."""
        if name in self.aggregated:
            return self.aggregated[name]
        if name in self.baselines:
            return self.baselines[name]
        raise choice_error("channel set", name, [*self.aggregated, *self.baselines])

    def pixel_mask(self, name: str | None = None) -> torch.Tensor:
        """A mask upsampled (nearest) to image resolution. Shapes: [H, W] bool."""
        return upsample_nearest(self.set_mask(name or self.primary), *self.image_size)

    def iou(self, truth: torch.Tensor) -> dict[str, float]:
        """IoU of every channel set and baseline against a true mask at image resolution.

        Shapes:
            truth: [H, W] bool.
        """
        t = check_mask_shape(truth, self.image_size, "ground-truth mask")
        names = [*self.aggregated, *self.baselines]
        return {n: iou(self.pixel_mask(n), t) for n in names}

    def overlay(self, strength: float = 0.45) -> torch.Tensor:
        """The image with the primary foreground tinted red (a grey canvas without an image).

        Shapes:
            -> [3, H, W] in [0, 1].
        """
        h, w = self.image_size
        base = self.image.float().clamp(0, 1) if self.image is not None else torch.full((3, h, w), 0.5)
        return overlay(base, self.pixel_mask(), strength=strength)

    # -- persistence ----------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``result.safetensors`` and ``meta.json`` into ``folder`` (atomically).

        safetensors keeps no key order, so ``meta.json`` records each dict's (``tensor_order``):
        :meth:`load` gives back the channel sets in the order they were run, the baselines and
        blocks in theirs, and the image in its own dtype.
        """
        folder = Path(folder)
        (folder / META_FILE).unlink(missing_ok=True)  # written last: a half-saved folder is refused
        t = {f"aggregated/{k}": v.bool().clone() for k, v in self.aggregated.items()}
        t.update({f"block/{k}": v.bool().clone() for k, v in self.per_block.items()})
        t.update({f"channels/{k}": v.long().clone() for k, v in self.channels.items()})
        t.update({f"baseline/{k}": v.bool().clone() for k, v in self.baselines.items()})
        if self.image is not None:
            t["image"] = self.image  # in its own dtype
        save_tensors(folder / RESULT_FILE, t)
        order = {p: list(getattr(self, a)) for p, a in _PARTS.items()}
        meta = {"primary": self.primary, "image_size": list(self.image_size), **self.meta, ORDER_KEY: order}
        save_json(folder / META_FILE, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SegmentationResult:
        """Read a folder written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / RESULT_FILE).is_file() or not (folder / META_FILE).is_file():
            raise MassactError(
                f"no segmentation result in {str(folder)!r}; expected {RESULT_FILE} and {META_FILE} "
                "(written by `massact segment --out DIR`)"
            )
        t, meta = load_tensors(folder / RESULT_FILE), load_json(folder / META_FILE)
        if "primary" not in meta or "image_size" not in meta:
            raise MassactError(f"{str(folder)!r} holds another kind of result, not a segmentation; "
                               "accepted: a folder written by `massact segment --out DIR`")
        primary, size = meta.pop("primary"), tuple(int(x) for x in meta.pop("image_size"))
        order = meta.pop(ORDER_KEY, None)
        recorded = order is not None
        if not recorded:  # written before the order was recorded: the sets in the order they ran
            order = {"aggregated": list(meta.get("channel_sets") or [])}
        if not isinstance(order, dict):
            raise MassactError(f"{str(folder / META_FILE)!r}: {ORDER_KEY!r} is {order!r}; accepted: "
                               f"{{part: [names]}} with parts {', '.join(_PARTS)}")
        parts = {p: _ordered(t, p, order.get(p) or [], folder, strict=recorded) for p in _PARTS}
        return cls(
            aggregated=parts["aggregated"], per_block=parts["block"], channels=parts["channels"],
            baselines=parts["baseline"], primary=primary, image_size=size,
            image=t.get("image"), meta=meta,
        )


ORDER_KEY = "tensor_order"
"""``meta.json`` key of each dict's key order (safetensors sorts its keys)."""
_PARTS = {"aggregated": "aggregated", "block": "per_block", "channels": "channels", "baseline": "baselines"}


def _ordered(t: dict[str, torch.Tensor], prefix: str, names: list, folder: Path,
             strict: bool = True) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix/`` in the recorded order (any not recorded follow, as stored)."""
    have = {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + "/")}
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MassactError(f"{str(folder / META_FILE)!r}: the order of {prefix!r} is {names!r}; "
                           "accepted: a list of names")
    first = [n for n in names if n in have]
    out = {n: have[n] for n in [*first, *(n for n in have if n not in first)]}
    missing = [n for n in names if n not in have]
    if missing and strict:
        raise MassactError(f"{str(folder / RESULT_FILE)!r} lacks {prefix} {missing[0]!r} listed in "
                           f"{META_FILE}; accepted: one of {', '.join(out) or 'none'}")
    return out
