"""K=2 k-means over image tokens restricted to chosen channels: a foreground/background split.

Feature options (per channel, over the tokens of one site and step):

- ``raw``: the activations as they are.
- ``centred``: minus the per-channel mean. K-means is translation-invariant, so this gives
  the same partition as ``raw`` (kept as an option because it documents that fact).
- ``standardised``: centred and divided by the per-channel standard deviation (channels with
  zero spread are left at zero), so every channel weighs the same.

Which of the two clusters is the foreground is not given by k-means; a rule names it:

- ``border`` (default): the cluster holding fewer tokens of the grid's outer ring (an object
  sits inside the frame; the background surrounds it). Ties fall back to ``minority``.
- ``minority``: the smaller cluster. Ties fall back to ``magnitude``.
- ``magnitude``: the cluster with the larger mean L2 norm of its raw features on the chosen
  channels. Ties fall back to k-means label 1.

Aggregation over several sites and/or steps:

- ``vote`` (default): every (site, step) is clustered and named on its own; a token is
  foreground when a strict majority of them say so (ties go to the background).
- ``concat``: the per-block features (after the feature option) are concatenated along the
  channel axis and clustered once; with ``raw`` features the block with the largest values
  dominates the distances.

A single cluster (every token has the same features) gives an all-background mask: no split
was found, and saying so is more honest than an arbitrary one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .errors import MassactError, choice_error
from .masks import border_tokens

FEATURES = ("raw", "centred", "standardised")
FOREGROUND_RULES = ("border", "minority", "magnitude")
AGGREGATIONS = ("vote", "concat")

__all__ = [
    "AGGREGATIONS", "FEATURES", "FOREGROUND_RULES", "cluster_mask", "kmeans2", "name_foreground",
    "prepare_features", "segment_tokens", "vote",
]


def _check(name: str, value: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise choice_error(name, value, accepted)


def prepare_features(x: torch.Tensor, mode: str = "raw") -> np.ndarray:
    """Per-channel feature transform of one block's tokens, as float64 for scikit-learn.

    Shapes:
        x: [tokens, channels] -> [tokens, channels].
    """
    _check("feature option", mode, FEATURES)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise MassactError(f"features have shape {tuple(x.shape)}; accepted: [tokens>=2, channels>=1]")
    f = x.detach().to("cpu", torch.float64).numpy().copy()
    if not np.isfinite(f).all():
        raise MassactError("features contain non-finite values; try --dtype float32")
    if mode in ("centred", "standardised"):
        f -= f.mean(0, keepdims=True)
    if mode == "standardised":
        sd = f.std(0, keepdims=True)
        f = np.divide(f, sd, out=np.zeros_like(f), where=sd > 0)
    return f


def kmeans2(features: np.ndarray, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """K=2 k-means labels (scikit-learn, seeded); all zeros when there is only one distinct point.

    Shapes:
        features: [tokens, d] -> [tokens] (int64, values 0/1).
    """
    from sklearn.cluster import KMeans

    if np.unique(features, axis=0).shape[0] < 2:
        return np.zeros(features.shape[0], dtype=np.int64)
    with warnings.catch_warnings():
        # Near-duplicate points can make sklearn warn about fewer distinct clusters; the
        # labels are still a valid partition, and an empty cluster is handled by the caller.
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit(features)
    return km.labels_.astype(np.int64)


def name_foreground(
    labels: np.ndarray, raw: np.ndarray, rows: int, cols: int, rule: str = "border"
) -> int | None:
    """Which k-means label is the foreground, by the documented rule (module docstring).

    Args:
        labels: K-means labels in row-major token order.
        raw: Raw (untransformed) features, for the ``magnitude`` rule.
        rows: Token grid rows.
        cols: Token grid columns.
        rule: One of :data:`FOREGROUND_RULES`.

    Returns:
        0 or 1; ``None`` when only one cluster is present.

    Shapes:
        labels: [tokens]; raw: [tokens, d].
    """
    _check("foreground rule", rule, FOREGROUND_RULES)
    if labels.shape[0] != rows * cols:
        raise MassactError(f"{labels.shape[0]} labels do not fill the token grid {rows}x{cols}")
    present = set(np.unique(labels).tolist())
    if len(present) < 2:
        return None
    chain = {"border": ("border", "minority", "magnitude"), "minority": ("minority", "magnitude"),
             "magnitude": ("magnitude",)}[rule]
    for r in chain:
        if r == "border":
            ring = border_tokens(rows, cols).flatten().numpy()
            score = [-int(((labels == c) & ring).sum()) for c in (0, 1)]
        elif r == "minority":
            score = [-int((labels == c).sum()) for c in (0, 1)]
        else:
            norms = np.linalg.norm(raw, axis=1)
            score = [float(norms[labels == c].mean()) for c in (0, 1)]
        if score[0] != score[1]:
            return int(np.argmax(score))
    return 1


def cluster_mask(
    x: torch.Tensor,
    rows: int,
    cols: int,
    features: str = "raw",
    foreground: str = "border",
    seed: int = 0,
) -> torch.Tensor:
    """Foreground token mask of one block's tokens restricted to chosen channels.

    Args:
        x: Image tokens on the chosen channels (row-major token order).
        rows: Token grid rows.
        cols: Token grid columns.
        features: One of :data:`FEATURES`.
        foreground: One of :data:`FOREGROUND_RULES`.
        seed: K-means seed.

    Shapes:
        x: [rows * cols, channels] -> [rows, cols] bool.
    """
    return segment_tokens([x], rows, cols, features, foreground, "vote", seed)[0]


def vote(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Strict-majority vote of several foreground masks (ties go to the background).

    Shapes:
        masks: n × [rows, cols] -> [rows, cols] bool.
    """
    if not masks:
        raise MassactError("no masks to aggregate; accepted: at least one site and step")
    stack = torch.stack([torch.as_tensor(m).bool() for m in masks]).float()
    return stack.mean(0) > 0.5


def segment_tokens(
    blocks: Sequence[torch.Tensor],
    rows: int,
    cols: int,
    features: str = "raw",
    foreground: str = "border",
    aggregation: str = "vote",
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cluster several blocks (sites and/or steps) of one image and aggregate them.

    Args:
        blocks: Per (site, step): image tokens on that site's chosen channels.
        rows: Token grid rows.
        cols: Token grid columns.
        features: One of :data:`FEATURES`.
        foreground: One of :data:`FOREGROUND_RULES`.
        aggregation: One of :data:`AGGREGATIONS`.
        seed: K-means seed.

    Returns:
        ``(aggregated, per_block)``: the final foreground mask, and each block's own mask
        (for ``concat`` these are still computed separately, for inspection).

    Shapes:
        blocks: n × [rows * cols, channels_i] -> ([rows, cols], n × [rows, cols]) bool.
    """
    _check("feature option", features, FEATURES)
    _check("foreground rule", foreground, FOREGROUND_RULES)
    _check("aggregation", aggregation, AGGREGATIONS)
    if not blocks:
        raise MassactError("no features to cluster; accepted: at least one site and step")
    per_block, feats, raws = [], [], []
    for x in blocks:
        if x.ndim != 2 or x.shape[0] != rows * cols:
            raise MassactError(
                f"features have shape {tuple(x.shape)}; accepted: [{rows * cols} tokens, channels]"
            )
        f = prepare_features(x, features)
        raw = x.detach().to("cpu", torch.float64).numpy()
        per_block.append(_mask(kmeans2(f, seed), raw, rows, cols, foreground))
        feats.append(f)
        raws.append(raw)
    if aggregation == "vote":
        return vote(per_block), per_block
    f, raw = np.concatenate(feats, 1), np.concatenate(raws, 1)
    return _mask(kmeans2(f, seed), raw, rows, cols, foreground), per_block


def _mask(labels: np.ndarray, raw: np.ndarray, rows: int, cols: int, rule: str) -> torch.Tensor:
    fg = name_foreground(labels, raw, rows, cols, rule)
    if fg is None:
        return torch.zeros(rows, cols, dtype=torch.bool)
    return torch.from_numpy(labels == fg).reshape(rows, cols)
