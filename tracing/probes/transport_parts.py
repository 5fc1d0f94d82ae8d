"""Pieces of the transport probe: sources, token masks, batch rows, metrics, real-image capture."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from massact_nn.errors import MassactError
from massact_nn.images import mask_from_png, upsample_mask
from massact_nn.masks import binary_mask
from massact_nn.metrics import inside_outside, summarise

from ..generation import per_prompt_rows
from .common import judge_readings


@dataclass
class ImageSource:
    """A real image as the transport source (image-conditioned transport).

    Attributes:
        image: A path, PIL image, or ``[1, 3, H, W]`` tensor in [-1, 1].
        caption: Text the source trajectory is conditioned on.
        posterior: VAE posterior: ``mode`` (deterministic) or ``sample``.
    """

    image: Any
    caption: str
    posterior: str = "mode"


def rows_of(copy: int, n: int, copies: int, batched_cfg: bool) -> torch.Tensor:
    """Batch rows of one copy (source/target/result) of ``n`` pairs laid out copy-major.

    Under batched CFG the batch is ``[uncond rows; cond rows]`` (docs/nnsight-pitfalls.md, 7), so each
    pair has two rows, returned unconditional first.

    Shapes:
        -> [n] or [2n].
    """
    base = copy * n + torch.arange(n)
    return torch.cat([base, base + copies * n]) if batched_cfg else base


def mask_groups(p: torch.Tensor, per_pair: bool = False) -> list[tuple[list[int], torch.Tensor]]:
    """Pairs grouped by identical token mask, with the mask's token ids.

    One group when every pair shares ``p`` (the usual case), so a site's edit is one gather and
    one scatter for the whole batch; ``per_pair`` keeps one group per pair.

    Shapes:
        p: [pairs, rows, cols] bool -> tokens: [n_p] per group.
    """
    flat = p.reshape(p.shape[0], -1)
    groups: list[tuple[list[int], torch.Tensor]] = []
    for j in range(flat.shape[0]):
        for pairs, _ in ([] if per_pair else groups):
            if torch.equal(flat[pairs[0]], flat[j]):
                pairs.append(j)
                break
        else:
            groups.append(([j], flat[j].nonzero().flatten()))
    return groups


def group_rows(pairs: list[int], copy: int, n: int, copies: int, batched_cfg: bool) -> torch.Tensor:
    """Batch rows of one copy for a group of pairs, in the order :func:`gather` stores them.

    Under batched CFG: the pairs' unconditional rows, then their conditional rows.

    Shapes:
        -> [len(pairs)] or [2 len(pairs)].
    """
    every = rows_of(copy, n, copies, batched_cfg)
    pos = pairs + [j + n for j in pairs] if batched_cfg else pairs
    return every[pos]


#: Token masks computed by the segmentation probe: the target's or the source's foreground, or both.
MASK_KEYWORDS = ("target", "source", "union")


def mask_keywords(spec: Any) -> set[str]:
    """The segmentation keywords a token-mask spec uses."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    return {s for s in items if isinstance(s, str) and s in MASK_KEYWORDS}


def resolve_token_mask(
    spec: Any, grid: tuple[int, int], pairs: int, named: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """A token mask for every pair from a spec (see ``TransportConfig.token_mask``).

    Args:
        spec: ``"all"``, a keyword of :data:`MASK_KEYWORDS` (looked up in ``named``), a tensor or
            array, a path, or a list of these (their union).
        grid: Token grid ``(rows, cols)``.
        pairs: Source/target pairs.
        named: Precomputed masks per keyword, ``[pairs, rows, cols]`` each.

    Shapes:
        -> [pairs, rows, cols] bool.
    """
    rows, cols = grid
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise MassactError("empty list of token masks; accepted: one or more masks (their union)")
        out = resolve_token_mask(spec[0], grid, pairs, named)
        for s in spec[1:]:
            out = out | resolve_token_mask(s, grid, pairs, named)
        return out
    if isinstance(spec, str) and spec in MASK_KEYWORDS:
        if not named or spec not in named:
            raise MassactError(f"token mask {spec!r} needs the segmentation probe's masks, which were "
                               "not computed; accepted: call transport(), which computes them")
        m = named[spec]
    elif isinstance(spec, str) and spec == "all":
        m = torch.ones(rows, cols, dtype=torch.bool)
    elif isinstance(spec, (str, Path)):
        m = _mask_file(Path(spec), grid)
    elif isinstance(spec, (torch.Tensor, np.ndarray)):
        m = binary_mask(torch.as_tensor(spec), "token mask")
    else:
        raise MassactError(f"token mask {spec!r} not understood; accepted: 'all', 'target', 'source', "
                           "'union', a [rows, cols] bool tensor, a segmentation run folder, a .npy file "
                           "or a PNG")
    given = tuple(m.shape)
    if m.ndim == 2:
        m = m[None].expand(pairs, -1, -1)
    if tuple(m.shape) != (pairs, rows, cols):
        raise MassactError(f"token mask has shape {given}; accepted: [{rows}, {cols}] or "
                           f"[{pairs}, {rows}, {cols}] (the model's token grid at this size)")
    return m.clone()


def _mask_file(p: Path, grid: tuple[int, int]) -> torch.Tensor:
    if p.is_dir():
        if not (p / "mask.npy").is_file():
            raise MassactError(f"{str(p)!r} holds no mask.npy; accepted: a segmentation run folder")
        if not (p / "meta.json").is_file():
            raise MassactError(f"{str(p)!r} has a mask.npy but no meta.json: an unfinished segmentation "
                               "run; accepted: a complete segmentation run folder (rerun it)")
        p = p / "mask.npy"
    if not p.is_file():
        raise MassactError(f"token mask file {str(p)!r} does not exist; accepted: 'all', 'target', "
                           "'source', 'union', a segmentation run folder, a .npy file or a PNG")
    if p.suffix == ".npy":
        try:
            arr = np.load(p)
        except (ValueError, OSError) as e:
            raise MassactError(f"token mask file {str(p)!r} cannot be read as a numeric array "
                               f"({e})") from None
        return binary_mask(torch.from_numpy(np.asarray(arr)), f"token mask {p.name}")
    return mask_from_png(p, grid)


def segmentation_masks(
    model: Any, plan: Any, keywords: set[str], sources: list[str], targets: list[str],
    image_source: ImageSource | None, stats: Any, k: int, t: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Foreground token masks of the targets and/or sources from the segmentation probe.

    Each trajectory is segmented with the probe's defaults (top-k channels at the model's last
    site, middle step; a real image at noise level ``t``), with the pair's own seed.

    Shapes:
        -> {keyword: [pairs, rows, cols] bool}.
    """
    from .segmentation import SegmentConfig, segment

    if stats is None:
        raise MassactError(f"token mask {sorted(keywords)} needs a statistics run for the segmentation "
                           "probe; accepted: --stats DIR")
    need = {"target", "source"} if "union" in keywords else set(keywords)
    out: dict[str, list[torch.Tensor]] = {w: [] for w in need}
    for j, tgt in enumerate(targets):
        # Pair j's seed and its entries of per-pair lists (a negative prompt per pair).
        gen = per_prompt_rows(replace(plan.gen, seed=plan.gen.seed + j), [j])
        base = dict(stats=stats, k=k, controls=("top",), generation=gen)
        if "target" in need:
            out["target"].append(segment(model, SegmentConfig(prompt=tgt, **base)).mask)
        if "source" in need:
            cfg = (SegmentConfig(image=image_source.image, caption=image_source.caption, t=t,
                                 posterior=image_source.posterior, **base)
                   if image_source is not None else SegmentConfig(prompt=sources[j], **base))
            out["source"].append(segment(model, cfg).mask)
    masks = {w: torch.stack(v).bool() for w, v in out.items()}
    if "union" in keywords:
        masks["union"] = masks["target"] | masks["source"]
    return masks


def transport_metrics(
    source: torch.Tensor, target: torch.Tensor | None, result: torch.Tensor, p: torch.Tensor,
    judge: Any = None,
) -> dict:
    """Distances of the result to source and target, inside and outside ``p``; judge readings.

    With a judge: ``moved`` is the fraction of pairs whose result shows the source's foreground
    colour / shape, ``kept`` the fraction keeping the target's background colour, and
    ``already`` the same fractions for the untouched target (the baseline to beat). Without the
    untouched target (``target=None``) only ``to_source`` and ``moved`` are reported.

    Shapes:
        source, target, result: [n, 3, H, W]; p: [n, rows, cols] bool.
    """
    h, w = result.shape[-2:]
    pix = torch.stack([upsample_mask(m, (h, w)) for m in p])
    out: dict = {"token_fraction": float(p.float().mean())}
    for name, ref in (("to_source", source), ("to_target", target)):
        if ref is None:
            continue
        d = inside_outside(result, ref, pix)
        out[name] = {k: summarise(v) for k, v in d.items()}
        out[name]["per_pair"] = {k: v.tolist() for k, v in d.items()}
    readings = {k: judge_readings(judge, x) if x is not None else None
                for k, x in (("source", source), ("target", target), ("result", result))}
    if readings["result"] is not None:
        out["judge"] = {k: v for k, v in readings.items() if v is not None}
        out["moved"] = _agree(readings["result"], readings["source"], ("fg_colour", "shape"))
        if target is None:
            return out
        out["kept"] = _agree(readings["result"], readings["target"], ("bg_colour",))
        out["already"] = {**_agree(readings["target"], readings["source"], ("fg_colour", "shape")),
                          **_agree(readings["source"], readings["target"], ("bg_colour",))}
    return out


def _agree(a: list[dict], b: list[dict], attrs: Sequence[str]) -> dict:
    return {k: sum(x[k] == y[k] for x, y in zip(a, b)) / max(len(a), 1) for k in attrs}


def capture_real_image(
    model: Any, plan: Any, source: ImageSource, n: int, channels: dict[str, torch.Tensor],
    p: torch.Tensor, copy_norm_out: bool,
) -> tuple[torch.Tensor, dict, dict]:
    """Pass 1 of image-conditioned transport: the real image's masked entries per call.

    For pair j the image is noised with seed ``seed + j`` (the noise the target of pair j starts
    from, drawn before any posterior sample) to each step's t, and the transformer is run on it
    with the caption.

    Returns:
        ``(source images [n, 3, H, W] in [0, 1], stored entries keyed (call, module, pair),
        byte counts)``.
    """
    from .real_image import real_image_activations, trajectory_t_values

    if copy_norm_out:
        raise MassactError("copy_norm_out is not available for an image source; accepted: "
                           "copy_norm_out=False with --source-image")
    if not isinstance(source.caption, str) or not source.caption.strip():
        raise MassactError("empty source caption; accepted: a non-empty --source-caption")
    t_values = trajectory_t_values(model, plan.gen)
    modules = [s.module for s in plan.sites]
    stored: dict = {}
    count = {"stored_bytes": 0, "full_bytes": 0}
    image = None
    reps = 2 if plan.batched_cfg else 1
    for j in range(n):
        acts = real_image_activations(model, source.image, source.caption, t_values, sites=modules,
                                      channels=channels, generation=per_prompt_rows(plan.gen, [j]),
                                      seed=plan.gen.seed + j,
                                      posterior=source.posterior, noise_first=True)
        image = acts.noised.image
        p_idx = p[j].flatten().nonzero().flatten()
        for call in plan.schedule:
            if not plan.active(call):
                continue
            for s in plan.sites:
                tok = acts.tokens[s.module][call.step][None].index_select(1, p_idx).repeat(reps, 1, 1)
                stored[(call.index, s.module, j)] = tok
                count["stored_bytes"] += tok.numel() * tok.element_size()
                count["full_bytes"] += reps * plan.n_img * s.channels * tok.element_size()
    src = ((image.float().cpu() + 1) / 2).clamp(0, 1).expand(n, -1, -1, -1).contiguous()
    return src, stored, count
