"""Channel selection per site (top-k, and the controls a careful study needs) and set stability."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .errors import check_channel_ids, check_k, choice_error

CONTROLS = ("top", "low", "random", "none")


def top_k(stat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, largest first (the paper's selection).

    Equal values keep channel order (the lower id first), on every device: ``torch.topk``
    leaves the order of ties unspecified, so a tie at the k-th place could pick different
    channels on a CPU and a GPU.

    Shapes:
        stat: [channels] -> [k] (int64).
    """
    check_k(k, stat.shape[-1])
    return torch.sort(stat.float(), descending=True, stable=True).indices[:k]


def low_k(stat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest values, smallest first (the low-statistic control).

    Equal values keep channel order (the lower id first), as in :func:`top_k`.

    Shapes:
        stat: [channels] -> [k] (int64).
    """
    check_k(k, stat.shape[-1])
    return torch.sort(stat.float(), stable=True).indices[:k]


def random_k(channels: int, k: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` channels drawn uniformly without replacement, reproducibly from ``seed``.

    Args:
        channels: Channel count.
        k: How many to draw.
        seed: Seed of a private generator (the global RNG is untouched).
        exclude: Channels never drawn (e.g. the top-k, so a random control is not contaminated).

    Shapes:
        -> [k] (int64), sorted ascending.
    """
    pool = torch.arange(channels)
    left = "the channel count"
    if exclude is not None and exclude.numel():
        ex = exclude.cpu().flatten()
        check_channel_ids(ex, channels, "exclude")  # a -1 would silently exclude the last channel
        keep = torch.ones(channels, dtype=torch.bool)
        keep[ex.long()] = False
        pool = pool[keep]
        left = f"the {pool.numel()} of {channels} channels not excluded"
    k = check_k(k, pool.numel(), what="k (random draw)", pool=left)
    g = torch.Generator().manual_seed(int(seed))
    return pool[torch.randperm(pool.numel(), generator=g)[:k]].sort().values


def control_set(
    name: str, stat: torch.Tensor, k: int, seed: int = 0, exclude_top: bool = True
) -> torch.Tensor:
    """One named channel set: ``top``, ``low``, ``random`` or ``none`` (empty).

    Shapes:
        stat: [channels] -> [k] (or [0] for ``none``).
    """
    if name == "top":
        return top_k(stat, k)
    if name == "low":
        return low_k(stat, k)
    if name == "random":
        return random_k(stat.shape[-1], k, seed, top_k(stat, k) if exclude_top else None)
    if name == "none":
        return torch.zeros(0, dtype=torch.long)
    raise choice_error("channel set", name, CONTROLS)


def jaccard(a: Sequence[int] | torch.Tensor, b: Sequence[int] | torch.Tensor) -> float:
    """Jaccard index |a ∩ b| / |a ∪ b| of two index sets (1.0 for two empty sets)."""
    sa = set(int(x) for x in (a.tolist() if isinstance(a, torch.Tensor) else a))
    sb = set(int(x) for x in (b.tolist() if isinstance(b, torch.Tensor) else b))
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def mean_pairwise_jaccard(sets: torch.Tensor | Sequence[Sequence[int]]) -> float:
    """Mean Jaccard over all unordered pairs of sets; NaN with fewer than two sets.

    Shapes:
        sets: [n, k] (or a list of n index lists).
    """
    rows = sets.tolist() if isinstance(sets, torch.Tensor) else [list(s) for s in sets]
    pairs = list(itertools.combinations(rows, 2))
    if not pairs:
        return float("nan")
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs)


def ratio_top1_median(stat: torch.Tensor) -> float:
    """The classic massive-activation ratio: largest value over the median (Sun et al. 2024).

    The median is ``torch.median``'s: for an even channel count, the lower of the two middle
    values (not their mean). Every ratio the library reports and plots uses this one.

    Shapes:
        stat: [channels].
    """
    s = stat.float()
    med = s.median().item()
    top = s.max().item()
    return float("inf") if med == 0 else top / med


def pairwise_jaccard_matrix(sets: torch.Tensor, channels: int) -> torch.Tensor:
    """All pairwise Jaccard indices of equal-size index sets, vectorised.

    Shapes:
        sets: [n, k] (int) -> [n, n] (float32).
    """
    onehot = torch.zeros(sets.shape[0], channels)
    onehot.scatter_(1, sets.long(), 1.0)
    inter = onehot @ onehot.T
    sizes = onehot.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def mean_pairwise_jaccard_fast(sets: torch.Tensor, channels: int) -> float:
    """Vectorised :func:`mean_pairwise_jaccard` for equal-size sets; NaN with fewer than two.

    Shapes:
        sets: [n, k].
    """
    n = sets.shape[0]
    if n < 2:
        return float("nan")
    m = pairwise_jaccard_matrix(sets, channels)
    iu = torch.triu_indices(n, n, offset=1)
    return float(m[iu[0], iu[1]].mean())
