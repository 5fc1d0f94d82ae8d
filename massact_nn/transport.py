"""Transport of channels between trajectories under a joint mask ``M = p mᵀ``, and its result.

``X_t ← X_t (1 − αM) + X_s αM``, with ``p`` a token mask (which image tokens) and ``m`` a channel
mask (which channels). ``α = 1`` is hard replacement, ``α = 0`` leaves the target untouched.
Pure tensor math: no nnsight, no diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import load_json, load_tensors, save_run
from .disruption import _read_meta
from .errors import MassactError, channel_ids
from .masks import binary_mask


def channel_mask(channels: torch.Tensor, width: int) -> torch.Tensor:
    """A boolean channel mask from channel ids.

    Shapes:
        channels: [k] -> [width] bool.
    """
    ch = channel_ids(channels, width)
    m = torch.zeros(width, dtype=torch.bool)
    m[ch] = True
    return m


def token_mask(mask: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """A flat token mask from a token-grid mask (row-major, the order DiTs pack tokens in).

    Args:
        mask: A bool or 0/1 mask (soft masks are refused: ``.bool()`` would put every nonzero
            value inside).
        grid: The image stream's token grid ``(rows, cols)``, or its token count for a flat mask.
            A 2-D mask needs the grid: with a count alone a transposed ``[cols, rows]`` mask
            would pass and put its tokens in the wrong places.

    Shapes:
        mask: [rows, cols] or [tokens] -> [tokens] bool.
    """
    p = binary_mask(mask, "token mask")
    n_tokens = grid[0] * grid[1] if isinstance(grid, tuple) else grid
    if p.ndim == 2:
        if not isinstance(grid, tuple):
            raise MassactError(f"a 2-D token mask of shape {tuple(p.shape)} needs the token grid; "
                               "accepted: token_mask(mask, (rows, cols))")
        if tuple(p.shape) != tuple(grid):
            raise MassactError(f"token mask of shape {tuple(p.shape)}; accepted: the token grid "
                               f"{tuple(grid)} (rows, cols)")
    elif p.ndim != 1:
        raise MassactError(f"token mask of shape {tuple(p.shape)}; accepted: [rows, cols] or [tokens]")
    p = p.flatten()
    if p.numel() != n_tokens:
        raise MassactError(
            f"token mask of shape {tuple(mask.shape)} has {p.numel()} tokens; the image stream has "
            f"{n_tokens}; accepted: a mask on the model's token grid"
        )
    return p


def joint_mask(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``M = p mᵀ``: true where the token is in ``p`` and the channel in ``m``.

    Shapes:
        p: [tokens] bool; m: [channels] bool -> [tokens, channels] bool.
    """
    if p.ndim != 1 or m.ndim != 1:
        raise MassactError(f"p and m must be 1-D masks, got {tuple(p.shape)} and {tuple(m.shape)}")
    return p.bool()[:, None] & m.bool()[None, :]


def blend(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``target (1 − αM) + source αM`` as a new tensor (inputs are never edited).

    With ``α = 1`` the masked entries are copied exactly (no arithmetic), so a full transport is
    bit-exact; elsewhere ``target`` is returned untouched.

    Shapes:
        target, source: [rows, tokens, channels]; mask: [tokens, channels] (shared) or
        [rows, tokens, channels] (one per row) bool -> like target.
    """
    if target.shape != source.shape:
        raise MassactError(f"source and target image streams differ in shape: {tuple(source.shape)} "
                           f"vs {tuple(target.shape)}; accepted: the same size, seed layout and model")
    if mask.shape != target.shape[1:] and mask.shape != target.shape:
        raise MassactError(f"joint mask shape {tuple(mask.shape)} does not match the image stream "
                           f"{tuple(target.shape)}; accepted: [tokens, channels] = {tuple(target.shape[1:])}")
    check_alpha(alpha)
    m = mask.to(target.device)
    if alpha == 1.0:
        # In target's dtype, as for alpha < 1: torch.where would promote to the wider of the two.
        return torch.where(m, source.to(target.dtype), target)
    mixed = target * (1 - alpha) + source.to(target.dtype) * alpha
    return torch.where(m, mixed, target)


def gather(
    h: torch.Tensor, tokens: torch.Tensor, channels: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Only the masked entries of an image stream (what a two-pass transport stores).

    One indexing kernel, whatever the number of rows, tokens and channels.

    Shapes:
        h: [R, tokens, channels]; tokens: [n_p] ids; channels: [k] ids; rows: [r] ids (``None``:
        every row) -> [r, n_p, k].
    """
    dev = h.device
    ti, ci = tokens.to(dev), channels.to(dev)
    if rows is None:
        return h[:, ti[:, None], ci[None, :]]
    return h[rows.to(dev)[:, None, None], ti[None, :, None], ci[None, None, :]]


def scatter_blend_(
    out: torch.Tensor,
    stored: torch.Tensor,
    tokens: torch.Tensor,
    channels: torch.Tensor,
    alpha: float = 1.0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blend stored entries (from :func:`gather`) into ``out`` in place, and return ``out``.

    ``out[rows][:, p, m] ← out[rows][:, p, m] (1 − α) + stored α``: only the ``|p| × k`` entries
    are touched, so the cost does not grow with the width of the model. With ``α = 1`` they are
    copied exactly.

    Shapes:
        out: [R, tokens, channels]; stored: [r, n_p, k]; tokens: [n_p]; channels: [k];
        rows: [r] ids (``None``: every row, r = R).
    """
    r, n_p, k = stored.shape
    want = out.shape[0] if rows is None else rows.numel()
    if r != want or n_p != tokens.numel() or k != channels.numel():
        raise MassactError(f"stored source entries {tuple(stored.shape)} do not fit the target "
                           f"{tuple(out.shape)} with {want} rows x {tokens.numel()} tokens x "
                           f"{channels.numel()} channels")
    check_alpha(alpha)
    dev = out.device
    ti, ci = tokens.to(dev), channels.to(dev)
    if rows is None:
        idx = (slice(None), ti[:, None], ci[None, :])
    else:
        idx = (rows.to(dev)[:, None, None], ti[None, :, None], ci[None, None, :])
    src = stored.to(dev, out.dtype)
    out[idx] = src if alpha == 1.0 else out[idx] * (1 - alpha) + src * alpha
    return out


def scatter_blend(
    target: torch.Tensor,
    stored: torch.Tensor,
    tokens: torch.Tensor,
    channels: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Inject stored entries (from :func:`gather`) into a new copy of ``target``.

    Equals ``blend(target, source, joint_mask(p, m), alpha)`` where ``stored = gather(source, ...)``.

    Shapes:
        target: [rows, tokens, channels]; stored: [rows, n_p, k] -> like target.
    """
    return scatter_blend_(target.clone(), stored, tokens, channels, alpha)


def check_alpha(alpha: float) -> float:
    """Check ``0 <= alpha <= 1`` and return it as a float.

    Raises:
        MassactError: for a value out of range, NaN, or not a real number (a string such as
            ``"0.5"`` would pass ``float()`` here and fail later, inside the blend).
    """
    if isinstance(alpha, (bool, str, bytes)) or not hasattr(alpha, "__float__"):
        raise MassactError(f"alpha={alpha!r} is not a number; accepted: a real number 0..1")
    if not 0.0 <= float(alpha) <= 1.0:
        raise MassactError(f"alpha={alpha!r} is out of range; accepted: 0..1")
    return float(alpha)


@dataclass
class TransportResult:
    """One transport: source, target and result images, the masks, and metrics.

    Attributes:
        source: Source image(s) (generated, or the real image's reconstruction). Shapes: [n, 3, H, W].
        target: Target without transport (``None`` for a run without the control rows).
            Shapes: [n, 3, H, W].
        result: Target with transport. Shapes: [n, 3, H, W].
        token_mask: Token mask ``p`` on the token grid. Shapes: [rows, cols] bool.
        channels: Per site module path, the transported channel ids ``m``. Shapes: [k].
        metrics: Distances of result to source and to target, inside/outside ``p``, judge readings.
        meta: Model, versions, prompts, seed, steps, sites, mode, alpha, stored bytes.
    """

    source: torch.Tensor
    target: torch.Tensor | None
    result: torch.Tensor
    token_mask: torch.Tensor
    channels: dict[str, torch.Tensor]
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors."""
        t = {"source": self.source, "result": self.result, "token_mask": self.token_mask.bool()}
        if self.target is not None:
            t["target"] = self.target
        t.update({f"channels/{m}": c.long() for m, c in self.channels.items()})
        return t

    def save(self, folder: str | Path) -> Path:
        """Write ``result.safetensors``, ``metrics.json`` and ``meta.json`` (atomically)."""
        meta = {**self.meta, "kind": "transport", "channel_sites": list(self.channels)}
        return save_run(folder, self.tensors(), self.metrics, meta)

    @classmethod
    def load(cls, folder: str | Path) -> TransportResult:
        """Read a run folder written by :meth:`save`."""
        folder = Path(folder)
        meta = _read_meta(folder, "transport")
        t = load_tensors(folder / "result.safetensors")
        order = meta.pop("channel_sites", None)
        missing = [k for k in ("source", "result", "token_mask") if k not in t]
        missing += [f"channels/{m}" for m in order or [] if f"channels/{m}" not in t]
        if order is None or missing:
            raise MassactError(f"{str(folder)!r} is not a complete transport run (missing "
                               f"{missing or ['channel_sites in meta.json']}); accepted: a folder "
                               "written by `massact transport --out DIR`")
        meta.pop("kind", None)
        return cls(
            source=t["source"], target=t.get("target"), result=t["result"], token_mask=t["token_mask"],
            channels={m: t[f"channels/{m}"] for m in order},
            metrics=load_json(folder / "metrics.json"), meta=meta,
        )
