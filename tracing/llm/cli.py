"""``massact llm-stats``: channel statistics and largest-activation positions of a language model."""

from __future__ import annotations

import argparse

from ..cli.common import add_prompt_args, add_site_stats_args, check_k_arg, prompts_from
from ..probes.common import parse_sites
from .model import BUILTIN


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``llm-stats`` subcommand."""
    p = sub.add_parser(
        "llm-stats",
        help="per-channel statistics and largest-activation token positions of a transformers LM/encoder",
    )
    p.add_argument(
        "--model", default="minilm",
        help=f"{' | '.join(BUILTIN)} | a local transformers model folder (default minilm)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_prompt_args(p)
    add_site_stats_args(p, unit="layer")
    p.add_argument("--n-top", type=int, default=3, help="largest |h| entries kept per prompt and layer")
    p.add_argument("--keep", type=int, default=10, help="largest entries written per layer to llm.json")
    p.add_argument("--max-length", type=int, default=512, help="truncate prompts to this many tokens")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Collect and save the statistics; print the per-layer summary."""
    from .model import load_llm
    from .stats import LLMStatsConfig, collect_llm_stats

    prompts = prompts_from(args)
    check_k_arg(args.k)
    llm = load_llm(args.model, args.device, args.dtype)
    cfg = LLMStatsConfig(k=args.k, n_top=args.n_top, keep=args.keep, sites=parse_sites(args.sites),
                         max_length=args.max_length)
    result = collect_llm_stats(llm, prompts, cfg)
    result.save(args.out)
    print(f"{'layer':>5}  {'module':<22} {'abs_mean top1/med':>17} {'max|h|/med':>10}  "
          f"{'largest (token@pos ch value)':<34} top-{args.k}")
    for row in result.summary():
        big = row["largest"]
        where = f"{big['token_text']}@{big['token']} ch{big['channel']} {big['value']:+.2f}"
        print(f"{row['layer']:>5}  {row['module']:<22} {row['ratio_top1_median']:>17.1f} "
              f"{row['ratio_top1_median_tokens']:>10.1f}  {where:<34} {row['top']}")
    print(f"wrote {args.out}/stats.safetensors, stats.json and llm.json")
    return 0
