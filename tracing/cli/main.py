"""The ``massact`` command: one subcommand module per feature, each with ``register(sub)``.

Every expected failure is a :class:`MassactError`, printed as one line (``massact: error: ...``)
with a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from massact_nn.errors import MassactError

#: Subcommand modules under ``massact_nn.tracing`` (each defines ``register(subparsers)``).
COMMANDS: tuple[str, ...] = (
    "cli.sites",
    "cli.stats",
    "cli.probes",
    "cli.report",
    "cli.demo",
    "toy.cli",
    "llm.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="massact",
        description="Massive activations in Diffusion Transformers (nnsight + diffusers).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"massact_nn.tracing.{name}").register(sub)
    return parser


def _quiet_libraries() -> None:
    # Loading bars and library warnings on stderr would bury the one-line error a user needs;
    # our own long runs still show their tqdm bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


#: Commands whose ``--out`` names a file; every other ``--out`` is a run folder.
FILE_OUT = ("report",)


def check_file_out(path: str | None, option: str) -> str | None:
    """``path`` (``~`` expanded) for a file to write, refused early if it cannot be written.

    Raises:
        MassactError: for a path that is a folder or lies under a file.
    """
    if not path:
        return path
    p = Path(path).expanduser()
    if p.is_dir():
        raise MassactError(f"{option} {path!r} is a folder; accepted: the path of a file to write")
    _check_parents(p, option, path)
    return str(p)


def _check_parents(p: Path, option: str, given: str) -> None:
    """Refuse a path whose nearest existing parent is a file (nothing could be written there)."""
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise MassactError(f"{option} {given!r} lies under the file {str(parent)!r}; accepted: "
                                   "a path whose parents are folders")
            break


def check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that cannot be written, before any work (not after a long run).

    Raises:
        MassactError: for a run folder that is an existing file, a report path that is a folder,
            or a path under an existing file.
    """
    out = getattr(args, "out", None)
    if not out:
        return
    p = Path(out).expanduser()
    args.out = str(p)  # the writers get the path that was checked (``~`` expanded)
    is_file = getattr(args, "command", None) in FILE_OUT
    if is_file and p.is_dir():
        raise MassactError(f"--out {out!r} is a folder; accepted: the path of the HTML file to write")
    if not is_file and p.exists() and not p.is_dir():
        raise MassactError(f"--out {out!r} is an existing file; accepted: a run folder (new, or one "
                           "to overwrite)")
    _check_parents(p, "--out", out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``massact`` console script."""
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_out(args)
        code = args.func(args)
    except MassactError as e:
        print(f"massact: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("massact: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
