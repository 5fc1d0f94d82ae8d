"""Arguments shared by several subcommands, and their conversion to configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from massact_nn.errors import MassactError

from ..generation import GenerationConfig


def add_model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype``."""
    p.add_argument("--model", default="toy", help="pipeline folder, Hub id, or 'toy' (default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_generation_args(p: argparse.ArgumentParser, steps: int | None = None) -> None:
    """Trajectory settings: steps, seed, size, guidance, batch size."""
    p.add_argument("--steps", type=int, default=steps, help="denoising steps (default: model's)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed S+i (default 0)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """``--prompt`` (repeatable) and ``--prompts-file``."""
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line")


def add_site_stats_args(p: argparse.ArgumentParser, unit: str = "site") -> None:
    """``--k``, ``--sites``, ``--out``: shared by every statistics command (DiT and LLM)."""
    p.add_argument("--k", type=int, default=4, help=f"top-k channels reported per {unit} (default 4)")
    p.add_argument("--sites", nargs="*", default=None, help="module paths or layers (default all)")
    p.add_argument("--out", required=True, help="run folder to write")


def check_k_arg(k: int) -> None:
    """Reject k < 1 before any model is loaded (the upper bound is checked per site later)."""
    if k < 1:
        raise MassactError(f"k={k} is out of range; accepted: 1..channels")


def prompts_from(args: argparse.Namespace) -> list[str]:
    """Prompts from ``--prompt`` and ``--prompts-file`` (blank lines and ``#`` lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise MassactError(f"prompts file {args.prompts_file!r} does not exist; accepted: a UTF-8 "
                               "text file, one prompt per line")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MassactError(f"prompts file {args.prompts_file!r} is not UTF-8 text (byte {e.start}: "
                               f"{e.object[e.start:e.start + 1]!r}); accepted: a UTF-8 text file, one "
                               "prompt per line") from None
        lines = [ln.strip() for ln in text.splitlines()]
        prompts += [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise MassactError("no prompts given; accepted: one or more --prompt or a --prompts-file")
    return prompts


def generation_from(args: argparse.Namespace) -> GenerationConfig:
    """A :class:`GenerationConfig` from parsed arguments (unset values resolve per model)."""
    return GenerationConfig(
        steps=args.steps, seed=args.seed, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size,
    )
