"""``massact toy``: train, evaluate, export and locate the embedded toy Flux.

Heavy modules are imported inside the handlers so that ``massact --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json

from massact_nn.errors import MassactError, check_positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``toy`` command group (train, eval, export, path)."""
    p = sub.add_parser("toy", help="the embedded miniature FLUX.1 trained on the shapes world")
    toy = p.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    toy.required = True

    t = toy.add_parser("train", help="train (or resume) a toy model for a time budget")
    t.add_argument("--minutes", type=float, required=True, help="training time budget (total)")
    t.add_argument("--out", required=True, help="run folder (pipeline/, state.pt, train.log)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT (same settings); without it OUT must hold no run")
    t.set_defaults(func=_train)

    e = toy.add_parser("eval", help="judge accuracy and massive-activation summary")
    e.add_argument("dir", help="run folder or pipeline folder")
    e.add_argument("--n", type=int, default=64, help="number of fresh prompts, >= 1 (default 64)")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--judge", default=None, help="folder with judge.safetensors (default: DIR)")
    e.add_argument("--json", default=None, help="write the report here")
    e.add_argument("--cfg", type=float, default=1.0, help="true-CFG scale, a number >= 1 (default 1: off)")
    e.set_defaults(func=_eval)

    x = toy.add_parser("export", help="copy a trained pipeline (+ judge) into the package assets")
    x.add_argument("ckpt_dir", help="run folder or pipeline folder")
    x.add_argument("--dest", default=None,
                   help="target folder, replaced as a whole: a new or empty folder or a previous "
                        "toy export (default: the shipped location)")
    x.add_argument("--judge", default=None,
                   help="folder with judge.safetensors (default: the source's; else one is trained)")
    x.add_argument("--eval-n", type=int, default=64, help="evaluate after export (0: skip)")
    x.set_defaults(func=_export)

    w = toy.add_parser("path", help="print the shipped toy pipeline folder")
    w.set_defaults(func=_path)


def _train(args: argparse.Namespace) -> int:
    from .train import check_minutes, train

    check_minutes(args.minutes, "--minutes")
    summary = train(args.out, minutes=args.minutes, seed=args.seed, resume=args.resume)
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..cli.main import check_file_out
    from .evaluate import check_cfg_scale, evaluate
    from .export import resolve_pipeline

    check_positive_int("--n", args.n)
    check_cfg_scale(args.cfg, "--cfg")
    args.json = check_file_out(args.json, "--json")  # before the evaluation, not after it
    try:
        folder = resolve_pipeline(args.dir)
    except FileNotFoundError as err:
        raise MassactError(str(err)) from None
    evaluate(
        folder, n=args.n, seed=args.seed, judge_folder=args.judge, out_json=args.json,
        cfg_scale=args.cfg,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    try:
        res = export(args.ckpt_dir, dest=args.dest, judge_folder=args.judge, evaluate_n=args.eval_n)
    except (FileNotFoundError, ValueError) as err:
        raise MassactError(str(err)) from None
    print(f"exported to {res['dest']} ({res['bytes'] / 2**20:.1f} MiB)")
    return 0


def _path(_args: argparse.Namespace) -> int:
    from .export import is_shipped, shipped_path

    if not is_shipped():
        raise MassactError(
            f"the toy weights are not shipped yet ({shipped_path()} is missing); "
            "train with `massact toy train` and run `massact toy export RUN_DIR`"
        )
    print(shipped_path())
    return 0
