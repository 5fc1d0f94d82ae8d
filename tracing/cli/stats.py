"""``massact stats``: streaming channel statistics over prompts and steps."""

from __future__ import annotations

import argparse

from massact_nn.reduce import REDUCTIONS

from ..model import load_model
from ..probes.common import parse_sites
from ..stats import StatsConfig, collect_stats
from .common import (
    add_generation_args,
    add_model_args,
    add_prompt_args,
    add_site_stats_args,
    check_k_arg,
    generation_from,
    prompts_from,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``stats`` subcommand."""
    p = sub.add_parser("stats", help="per-channel statistics at every site (abs_mean, ...)")
    add_model_args(p)
    add_prompt_args(p)
    add_generation_args(p)
    add_site_stats_args(p)
    p.add_argument("--per-step", action="store_true", help="also keep per-step abs_mean curves")
    p.add_argument("--include-uncond", action="store_true", help="count CFG unconditional rows too")
    p.add_argument("--reduction", default="auto", choices=REDUCTIONS,
                   help="GPU reductions: auto (compiled kernel for large activations in long runs), "
                   "eager, or compiled (about a second of compilation on FLUX, then less GPU time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Collect and save statistics; print the per-site summary."""
    prompts = prompts_from(args)
    check_k_arg(args.k)
    model = load_model(args.model, args.device, args.dtype)
    cfg = StatsConfig(
        generation=generation_from(args), k=args.k, per_step=args.per_step,
        include_uncond=args.include_uncond, sites=parse_sites(args.sites), reduction=args.reduction,
    )
    stats = collect_stats(model, prompts, cfg)
    stats.save(args.out)
    print(f"{'layer':>5}  {'module':<34} {'top-1/median':>12}  top-{args.k}")
    for row in stats.summary():
        print(f"{row['layer']:>5}  {row['module']:<34} {row['ratio_top1_median']:>12.1f}  {row['top']}")
    print(f"wrote {args.out}/stats.safetensors and stats.json")
    return 0
