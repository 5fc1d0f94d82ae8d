"""``massact sites``: the site table of a model, without loading weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..model import hub_error, resolve_model
from ..sites import sites_from_folder


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sites`` subcommand."""
    p = sub.add_parser("sites", help="list a model's sites (block image-stream outputs)")
    p.add_argument("--model", default="toy", help="pipeline folder, Hub id, or 'toy'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the site table."""
    path = resolve_model(args.model)
    if not Path(path).exists():
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, allow_patterns=["*.json", "*.txt", "*.model"])
        except (OSError, ValueError) as e:  # offline, not cached, no such repo
            raise hub_error(args.model, e) from None
    adapter, sites = sites_from_folder(path)
    if args.json:
        print(json.dumps({
            "architecture": adapter.name,
            "sites": [{"layer": s.layer, "module": s.module, "channels": s.channels,
                       "streams": list(s.streams), "kind": s.kind} for s in sites],
        }, indent=2))
        return 0
    print(f"architecture: {adapter.name}  ({len(sites)} sites)")
    print(f"{'layer':>5}  {'module':<34} {'kind':<8} {'channels':>8}  streams")
    for s in sites:
        print(f"{s.layer:>5}  {s.module:<34} {s.kind:<8} {s.channels:>8}  {'+'.join(s.streams)}")
    return 0
