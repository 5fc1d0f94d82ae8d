"""``massact demo``: statistics, the three probes and the HTML report on one model, in minutes.

On the embedded toy (the default) every claim is shown with its controls: channel statistics,
disruption of top-k vs lowest-k vs random-k channels, segmentation of a generated image and of a
world image with its exact true mask (IoU), and text-conditioned transport into the target's
foreground. ``--model`` runs the same on any pipeline folder (the tests use a tiny random Flux).
Probes are imported when they run, so a probe that is not part of this build is skipped with a
note instead of breaking the demo.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from massact_nn._io import save_json

#: Prompts of the toy's shapes world (any text works for other models).
STATS_PROMPTS = (
    "a red circle on a blue background", "a green square on a yellow background",
    "a blue triangle on a white background", "a yellow cross on a black background",
    "a white circle on a green background", "a black square on a red background",
)
TARGET_PROMPT = "a red circle on a blue background"  # the segmentation phase's prompt
# A transport pair whose result the toy's judge reads with the source's colour and shape and the
# target's background (seeds 0-2, k=16, union mask; README's table: colour 0.69, shape 0.63 of
# 24 pairs). At k=4, or with the target's mask alone, nothing visible moves on the toy.
TRANSPORT_SOURCE = "a blue square on a red background"
TRANSPORT_TARGET = "a yellow circle on a green background"
TRANSPORT_K = 16


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="statistics, disruption, segmentation, transport and the "
                                    "HTML report on the toy (or --model), in a few minutes")
    p.add_argument("--model", default="toy", help="pipeline folder or 'toy' (default)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: model's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=4, help="channels per site (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the report's path (last line)."""
    path = run_demo(args.model, args.out, device=args.device, steps=args.steps,
                    height=args.height, width=args.width, seed=args.seed, k=args.k)
    print(path)
    return 0


def run_demo(
    model_spec: str | Path = "toy", out: str | Path = "runs/demo", device: str = "cpu",
    steps: int | None = None, height: int | None = None, width: int | None = None,
    seed: int = 0, k: int = 4, log: Callable[[str], None] = print,
) -> Path:
    """Statistics, the probes that exist in this build, and the report, in ``out``.

    Returns:
        The report's path (``out/report.html``).
    """
    from ..generation import GenerationConfig
    from ..model import load_model, resolve_model

    resolve_model(model_spec)  # a missing toy fails here, before anything is loaded
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_model(model_spec, device, "float32")
    timings["load"] = time.perf_counter() - t0
    gen = GenerationConfig(steps=steps, seed=seed, height=height, width=width, batch_size=8)
    folders: list[Path] = []
    skipped: list[str] = []
    phases = [("statistics", _stats), ("disruption", _disrupt), ("segmentation", _segment),
              ("segmentation of a world image", _segment_world), ("transport", _transport)]
    ctx = {"model": model, "gen": gen, "out": out, "k": k, "log": log}
    for i, (name, fn) in enumerate(phases, 1):
        log(f"[{i}/{len(phases)}] {name} ...")
        t = time.perf_counter()
        try:
            made = fn(ctx)
        except _Unavailable as e:
            log(f"      skipped: {e}")
            skipped.append(f"{name}: {e}")
            continue
        timings[name] = time.perf_counter() - t
        folders += made
        log(f"      done in {timings[name]:.1f} s -> {', '.join(str(f) for f in made)}")
    from massact_nn.viz import build_report

    t = time.perf_counter()
    report = build_report(folders, out / "report.html", title=f"massact-nn demo · {model_spec}")
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    save_json(out / "demo.json", {"model": str(model_spec), "folders": [str(f) for f in folders],
                                  "skipped": skipped, "seconds": timings})
    log(f"demo finished in {timings['total']:.0f} s")
    return report


class _Unavailable(Exception):
    """An input a phase needs does not fit this model (e.g. world images at another size)."""


def _stats(ctx: dict) -> list[Path]:
    from ..stats import StatsConfig, collect_stats

    cfg = StatsConfig(generation=ctx["gen"], k=ctx["k"], per_step=True)
    stats = collect_stats(ctx["model"], list(STATS_PROMPTS), cfg)
    ctx["stats"] = stats
    return [stats.save(ctx["out"] / "stats")]


def _disrupt(ctx: dict) -> list[Path]:
    from ..probes.disruption import DisruptionConfig, disrupt
    from ..probes.disruption import save_disruption as save
    cfg = DisruptionConfig(generation=ctx["gen"], k=ctx["k"], random_draws=2)
    result = disrupt(ctx["model"], list(STATS_PROMPTS[:4]), ctx["stats"], cfg)
    return [save(result, ctx["out"] / "disrupt")]


def _seg_sites(ctx: dict) -> list[str]:
    from ..sites import sites_of

    return [s.module for s in sites_of(ctx["model"])[-2:]]


def _segment(ctx: dict) -> list[Path]:
    from ..generation import resolve
    from ..model import model_adapter
    from ..probes.segmentation import SegmentConfig, segment
    from .segment import write_segmentation as write

    n = resolve(ctx["gen"], ctx["model"], model_adapter(ctx["model"])).steps
    steps = sorted({n // 4, n // 2, (3 * n) // 4})
    cfg = SegmentConfig(stats=ctx["stats"], prompt=TARGET_PROMPT, k=ctx["k"],
                        sites=_seg_sites(ctx), steps=steps, generation=ctx["gen"])
    folder = ctx["out"] / "segment"
    write(segment(ctx["model"], cfg), folder)
    return [folder]


def _segment_world(ctx: dict) -> list[Path]:
    import torch

    from massact_nn import world
    from massact_nn.masks import save_png_mask

    from ..generation import resolve
    from ..model import model_adapter
    from ..probes.segmentation import SegmentConfig, segment
    from .segment import write_segmentation as write
    g = resolve(ctx["gen"], ctx["model"], model_adapter(ctx["model"]))
    folder = ctx["out"] / "segment_world"
    if (g.height, g.width) != (world.SIZE, world.SIZE):
        # An earlier demo into this folder at the world's size left one: the report would show it.
        shutil.rmtree(folder, ignore_errors=True)
        raise _Unavailable(f"world images are {world.SIZE}x{world.SIZE} px; this run is "
                           f"{g.height}x{g.width}")
    sample = world.World(seed=ctx["gen"].seed).sample(1, seed=ctx["gen"].seed)
    gt = folder / "gt_mask.png"
    save_png_mask(gt, torch.from_numpy(sample.masks[0]))
    cfg = SegmentConfig(stats=ctx["stats"], image=torch.from_numpy(sample.images[:1]),
                        caption=sample.captions[0], t=0.5, k=ctx["k"], sites=_seg_sites(ctx),
                        generation=ctx["gen"])
    write(segment(ctx["model"], cfg), folder, gt_mask=str(gt))
    return [folder]


def _transport(ctx: dict) -> list[Path]:
    from ..probes.transport import TransportConfig, transport
    from ..probes.transport import save_transport as save
    # p = both trajectories' foregrounds (the segmentation probe on each), m = the top-16.
    width = min(s.channels for s in ctx["stats"].sites)
    cfg = TransportConfig(generation=ctx["gen"], k=min(TRANSPORT_K, width), token_mask="union")
    result = transport(ctx["model"], TRANSPORT_SOURCE, TRANSPORT_TARGET, ctx["stats"], cfg)
    return [save(result, ctx["out"] / "transport")]
