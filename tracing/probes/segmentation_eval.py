"""Mask IoU of the segmentation probe against true masks, with controls and trivial baselines.

Two sources of images, both from the shapes world (:mod:`massact_nn.world`):

- ``real``: world images with their exact masks, encoded, noised to each t and run through
  the transformer with their captions (one batched call per image for all t).
- ``generated``: trajectories generated from world captions. A generated image has no true
  mask; its pseudo-truth is the colour mask of the final image (pixels nearer the caption's
  foreground colour than its background colour), which is sound for a flat-colour world and
  a model that draws the right colours. Images that do not (fewer than 80% of pixels within
  0.5 of either caption colour in [-1, 1] RGB, a foreground share outside 5-75%, or more than
  10% of the outermost pixel ring in the foreground colour: world shapes never touch the
  frame, so that is a drawing with swapped colours) are not scored, and the count of scored
  images is reported. Activations at earlier steps are
  scored against the final image's mask.

Every (source, noise level, site) is clustered with ``top``, ``all``, ``rest`` (all but the
top-k), ``low`` and ``random`` channel sets (``random``: several seeded draws, pooled), and
also with a strict-majority ``vote`` over the sites. Baselines: ``all_foreground``,
``centre`` (a centred disc) and ``input`` (the transformer's noisy input tokens clustered with
the same rule). IoU is computed at image resolution (token masks upsampled by nearest
neighbour).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from massact_nn import world as W
from massact_nn.clustering import segment_tokens
from massact_nn.errors import MassactError
from massact_nn.masks import centre_blob, colour_mask, iou, upsample_nearest
from massact_nn.stats import ChannelStats

from ..generation import GenerationConfig, resolve
from ..model import model_adapter
from ..sites import sites_of
from .common import load_stats, make_plan
from .segmentation import capture_generated, capture_real, select_channels, union_channels

BASELINES = ("all_foreground", "centre", "input")


def _sets(stats: ChannelStats, sites: list, k: int, draws: int, seed: int) -> dict:
    sets = select_channels(stats, sites, ("top", "all", "low"), k, seed)
    # every channel but the top-k: is the layout exclusive to the massive channels?
    sets["rest"] = {m: a[~torch.isin(a, sets["top"][m])] for m, a in sets["all"].items()}
    if any(v.numel() == 0 for v in sets["rest"].values()):
        del sets["rest"]  # k is every channel: no channel is left to cluster on
    for d in range(draws):
        sets[f"random#{d}"] = select_channels(stats, sites, ("random",), k, seed + d)["random"]
    return sets


def _score(
    tokens: dict, inputs: torch.Tensor, truth: torch.Tensor, sites: list[str], level: Any,
    union: dict, sets: dict, grid: tuple[int, int], opts: tuple, out: dict,
) -> None:
    """Cluster one image at one level for every set; append IoUs to ``out[(level, site, set)]``."""
    h, w = truth.shape
    up = lambda m: upsample_nearest(m, h, w)  # noqa: E731
    for name, per_site in sets.items():
        label = name.split("#")[0]
        blocks = [tokens[m][:, torch.searchsorted(union[m], per_site[m])] for m in sites]
        agg, each = segment_tokens(blocks, *grid, *opts)
        for m, b in zip(sites, each):
            out[(level, m, label)].append(iou(up(b), truth))
        if len(sites) > 1:
            out[(level, "vote", label)].append(iou(up(agg), truth))
    rows, cols = grid
    inp, _ = segment_tokens([inputs], rows, cols, *opts)
    for name, m in (("all_foreground", torch.ones(rows, cols, dtype=torch.bool)),
                    ("centre", centre_blob(rows, cols)), ("input", inp)):
        out[(level, "-", name)].append(iou(up(m), truth))


def evaluate_segmentation(
    model: Any,
    stats: ChannelStats | str,
    world_samples: W.WorldBatch | int = 8,
    sites: Sequence[str | int] | None = None,
    steps: Sequence[int] | None = None,
    t_values: Sequence[float] = (0.25, 0.5, 0.75),
    k: int = 4,
    random_draws: int = 3,
    num_steps: int | None = None,
    features: str = "raw",
    foreground: str = "border",
    seed: int = 2000,
    sources: Sequence[str] = ("real", "generated"),
    filter_generated: bool = True,
    progress: bool = True,
) -> dict:
    """Mask IoU for every channel set and baseline, per source, noise level and site.

    Args:
        model: An nnsight ``DiffusionModel`` whose images are world-sized (the toy).
        stats: Channel statistics (or their folder) that select the channels.
        world_samples: A :class:`~massact_nn.world.WorldBatch`, or how many to draw (``seed``).
        sites: Module paths or layer indices (``None``: every site).
        steps: Steps of the generated trajectories (``None``: about 1/4, 1/2, 3/4 through).
        t_values: Noise levels of the real images.
        k: Channels per site for top/low/random.
        random_draws: Seeded random-k draws (pooled in the table).
        num_steps: Denoising steps (``None``: the model folder's, else the pipeline's).
        features: Feature option (see :mod:`massact_nn.clustering`).
        foreground: Foreground rule.
        seed: Seed of the world draw, of the generations and of the noise.
        sources: ``real`` and/or ``generated``.
        filter_generated: Score only generated images that drew their caption's colours.
        progress: tqdm bar over images.

    Returns:
        ``{"rows": [...], "markdown": str, "config": {...}}``; each row has ``source``,
        ``level`` (``t=…`` or ``step s (t=…)``), ``site`` (module, ``vote`` or ``-``), ``set``,
        ``iou_mean``, ``iou_std`` and ``n``.
    """
    st = load_stats(stats)
    for s in sources:
        if s not in ("real", "generated"):
            raise MassactError(f"unknown source {s!r}; accepted: real, generated")
    batch = world_samples
    if isinstance(world_samples, int):
        batch = W.World(seed).sample(world_samples, seed=seed)
    size = int(batch.images.shape[-1])
    gen = resolve(GenerationConfig(steps=num_steps, seed=seed, height=size, width=size), model,
                  model_adapter(model))
    n_steps = gen.steps
    if steps is None:
        steps = sorted({round(f * (n_steps - 1)) for f in (0.25, 0.5, 0.75)})
    wanted = list(sites) if sites is not None else [s.module for s in sites_of(model)]
    plan = make_plan(model, gen, wanted, list(steps))
    modules = [s.module for s in plan.sites]
    sets = _sets(st, plan.sites, k, random_draws, seed)
    union = union_channels(sets)
    opts = (features, foreground, "vote", 0)
    scores: dict = {src: defaultdict(list) for src in sources}
    t_of_step: dict[int, list[float]] = defaultdict(list)
    scored = 0
    bar = tqdm(total=len(batch) * len(sources), desc="segmentation eval", disable=not progress)
    for i in range(len(batch)):
        truth_px = torch.from_numpy(batch.masks[i])
        if "real" in sources:
            img = torch.from_numpy(batch.images[i])[None]
            gen_i = GenerationConfig(**{**gen.to_json(), "steps": 1, "seed": seed + i})
            p = make_plan(model, gen_i, modules, None)
            tokens, inputs, _ = capture_real(model, p, img, batch.captions[i], list(t_values), union)
            for j, t in enumerate(t_values):
                tok = {m: tokens[(m, j)] for m in modules}
                _score(tok, inputs[j], truth_px, modules, f"t={t:g}", union, sets, plan.grid, opts,
                       scores["real"])
            bar.update(1)
        if "generated" in sources:
            plan.gen.seed = seed + i
            tokens, inputs, image, t_of = capture_generated(model, plan, batch.captions[i], union)
            a = W.parse_caption(batch.captions[i])
            fg, bg = W.RGB[a["fg_colour"]], W.RGB[a["bg_colour"]]
            pseudo = drawn_mask(image * 2 - 1, fg, bg) if filter_generated else colour_mask(
                image * 2 - 1, torch.from_numpy(fg), torch.from_numpy(bg))
            bar.update(1)
            if pseudo is None:
                continue
            scored += 1
            for s in plan.steps:
                t_of_step[s].append(t_of[s])
                tok = {m: tokens[(m, s)] for m in modules}
                _score(tok, inputs[s], pseudo, modules, s, union, sets, plan.grid, opts,
                       scores["generated"])
    bar.close()
    rows = []
    for src, table in scores.items():
        for (level, site, name), vals in table.items():
            if src == "generated":
                level = f"step {level} (t={np.mean(t_of_step[level]):.2f})"
            v = np.asarray(vals, dtype=np.float64)
            rows.append({"source": src, "level": level, "site": site,
                         "set": name if name in ("all", "rest", *BASELINES) else f"{name}-{k}",
                         "iou_mean": float(v.mean()), "iou_std": float(v.std()), "n": int(v.size)})
    config = {"samples": len(batch), "sites": modules, "steps": list(plan.steps),
              "t_values": list(t_values), "k": k, "random_draws": random_draws,
              "num_steps": n_steps, "features": features, "foreground": foreground, "seed": seed,
              "ground_truth": {"real": "world masks",
                               "generated": "colour mask of the final generated image"},
              "generated_scored": scored if "generated" in sources else None}
    md = to_markdown(rows, k, {"real": len(batch), "generated": scored})
    if "generated" in sources:
        md += f"\nGenerated images scored: {scored} of {len(batch)}"
        md += (" (the others did not draw their caption's two colours, so they have no "
               "pseudo-truth).\n" if scored < len(batch) else ".\n")
    return {"rows": rows, "markdown": md, "config": config}


def drawn_mask(
    image: torch.Tensor, fg: np.ndarray, bg: np.ndarray, near: float = 0.5, explained: float = 0.8,
    share: tuple[float, float] = (0.05, 0.75),
) -> torch.Tensor | None:
    """The colour mask of a generated world image, or ``None`` when it did not draw its colours.

    Shapes:
        image: [3, H, W] in [-1, 1]; fg, bg: [3] -> [H, W] bool.
    """
    f, b = torch.from_numpy(np.asarray(fg)).float(), torch.from_numpy(np.asarray(bg)).float()
    img = image.float()
    d = torch.minimum((img - f.view(3, 1, 1)).norm(dim=0), (img - b.view(3, 1, 1)).norm(dim=0))
    mask = colour_mask(img, f, b)
    ring = torch.ones_like(mask)
    ring[1:-1, 1:-1] = False
    ok = (d < near).float().mean() >= explained and share[0] <= mask.float().mean() <= share[1]
    return mask if ok and mask[ring].float().mean() <= 0.1 else None


def to_markdown(rows: list[dict], k: int, images: dict[str, int]) -> str:
    """One table per source: (level, site) rows by channel set / baseline columns (mean IoU)."""
    cols = ["top", "all", "rest", "random", "low"]
    cols = [c if c in ("all", "rest") else f"{c}-{k}" for c in cols]
    out = []
    for src in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == src]
        cell = {(r["level"], r["site"], r["set"]): r["iou_mean"] for r in mine}
        out += [f"**{src}** images (n={images[src]}; IoU at image resolution, mean over images"
                " (random: pooled over draws)):", "",
                "| level | site | " + " | ".join(cols) + " | all-fg | centre | input |",
                "|---|---|" + "---|" * (len(cols) + 3)]
        for level in dict.fromkeys(r["level"] for r in mine):
            base = [cell.get((level, "-", b)) for b in BASELINES]
            for site in dict.fromkeys(r["site"] for r in mine if r["level"] == level and r["site"] != "-"):
                vals = [cell.get((level, site, c)) for c in cols] + base
                out.append(f"| {level} | {site} | " + " | ".join(
                    "–" if v is None else f"{v:.3f}" for v in vals) + " |")
        out.append("")
    return "\n".join(out)
