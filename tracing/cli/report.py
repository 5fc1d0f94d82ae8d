"""``massact report``: one self-contained HTML file from run folders."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    p = sub.add_parser(
        "report", help="self-contained HTML report (figures, tables, images) of run folders",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (stats or probe runs), or a folder of them (e.g. a demo's)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the report and print its path."""
    from massact_nn.viz import build_report  # plotly is imported only when a report is made

    path = build_report(args.runs, args.out, title=args.title)
    print(f"wrote {path}")
    return 0
