"""``massact disrupt``, ``massact transport``, ``massact evaluate`` (and ``segment`` when present)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from massact_nn.errors import MassactError

from ..model import load_model
from ..probes.common import add_probe_args, generation_from_probe_args, parse_sites
from .common import add_model_args, add_prompt_args, prompts_from
from .segment import register_segment


def register(sub: argparse._SubParsersAction) -> None:
    """Add the probe subcommands."""
    _register_disrupt(sub)
    _register_transport(sub)
    _register_evaluate(sub)
    register_segment(sub)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).replace(",", " ").split()]
    except ValueError:
        raise MassactError(f"cannot parse {text!r} as integers; accepted: e.g. 4 or 1,2,4") from None


def _register_disrupt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("disrupt", help="disrupt top-k channels vs lowest-k / random-k controls")
    add_model_args(p)
    add_prompt_args(p)
    add_probe_args(p)
    p.add_argument("--stats", required=True, help="statistics run folder (massact stats --out)")
    p.add_argument("--k", default="4", help="channels per set; several as 1,2,4 (default 4)")
    p.add_argument("--controls", default="top,low,random", help="sets besides the baseline (default all)")
    p.add_argument("--random-draws", type=int, default=3, help="random-k draws (default 3)")
    p.add_argument("--channel-seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--mode", default="zero", help="zero | mean | token_mean | scale (default zero)")
    p.add_argument("--alpha", type=float, default=0.0, help="factor of --mode scale")
    p.add_argument("--out", required=True, help="run folder to write")
    p.set_defaults(func=run_disrupt)


def run_disrupt(args: argparse.Namespace) -> int:
    """Run the disruption probe and write its run folder."""
    from ..probes.disruption import DisruptionConfig, disrupt, save_disruption

    prompts = prompts_from(args)
    ks = _ints(args.k)
    controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    from ..probes.common import load_stats

    stats = load_stats(args.stats)  # fail on a bad folder before loading the model
    model = load_model(args.model, args.device, args.dtype)
    cfg = DisruptionConfig(
        generation=generation_from_probe_args(args), k=ks, controls=controls,
        random_draws=args.random_draws, channel_seed=args.channel_seed, mode=args.mode,
        alpha=args.alpha, sites=parse_sites(args.sites), steps=args.steps,
    )
    result = disrupt(model, prompts, stats, cfg)
    result.meta["stats_folder"] = str(Path(args.stats).expanduser().resolve())  # from any folder
    save_disruption(result, args.out)
    print(f"{'set':<16} {'mse':>10} {'psnr':>8}  judge")
    for row in result.metrics["summary"]:
        psnr = "inf" if row["psnr"] is None else f"{row['psnr']:.2f}"
        judge = json.dumps(row.get("judge")) if row.get("judge") else ""
        name = row["control"] if row["control"] == "none" else f"{row['control']}_k{row['k']}"
        print(f"{name:<16} {row['mse']:>10.3g} {psnr:>8}  {judge}")
    print(f"wrote {args.out}")
    return 0


def _register_transport(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transport", help="transport top-k channels from a source into a target")
    add_model_args(p)
    add_probe_args(p)
    p.add_argument("--source-prompt", action="append", default=[], help="source prompt (repeatable)")
    p.add_argument("--target-prompt", action="append", default=[], help="target prompt (repeatable)")
    p.add_argument("--source-image", default=None, help="real source image (image-conditioned)")
    p.add_argument("--source-caption", default=None, help="caption of --source-image")
    p.add_argument("--stats", default=None, help="statistics run folder (channel mask m: top-k)")
    p.add_argument("--k", type=int, default=4, help="channels per site (default 4)")
    p.add_argument("--channels", default=None, help="JSON file {module: [channel ids]} instead of --stats")
    p.add_argument("--mask", nargs="+", default=["all"],
                   help="token mask p: all | target | source | union (segmentation probe) | "
                   "segmentation run folder | .npy | PNG; several = their union")
    p.add_argument("--alpha", type=float, default=1.0, help="blend factor (1 = replace)")
    p.add_argument("--mode", default=None,
                   help="batched | two_pass (default batched; two_pass with --source-image, its only mode)")
    p.add_argument("--copy-norm-out", action="store_true", help="also copy norm_out's output in p")
    p.add_argument("--no-control", action="store_true",
                   help="skip the untouched target rows (2 rows per pair in batched mode; "
                   "no target image or target-side metrics)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.set_defaults(func=run_transport)


def _read_channels(path: str) -> dict[str, list[int]]:
    """A ``{module: [channel ids]}`` JSON file, every id an integer (no "12", 1.7 or true)."""
    accepted = "accepted: a JSON file {module: [channel ids]} with integer ids"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise MassactError(f"cannot read channels from {path!r} ({e}); {accepted}") from None
    if not isinstance(raw, dict):
        raise MassactError(f"channels file {path!r} holds a {type(raw).__name__}; {accepted}")
    out = {}
    for module, ids in raw.items():
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise MassactError(f"channels file {path!r}: {module!r} has {ids!r}; {accepted}")
        out[module] = ids
    return out


def run_transport(args: argparse.Namespace) -> int:
    """Run the transport probe and write its run folder."""
    from ..probes.transport import ImageSource, TransportConfig, save_transport, transport

    if not args.target_prompt:
        raise MassactError("no --target-prompt given; accepted: one or more --target-prompt")
    if args.source_image is not None:
        if args.source_prompt:
            raise MassactError("both --source-prompt and --source-image given; accepted: one of them")
        if not args.source_caption:
            raise MassactError("--source-image needs --source-caption TEXT")
        source = ImageSource(args.source_image, args.source_caption)
    elif args.source_prompt:
        source = args.source_prompt
    else:
        raise MassactError("no source given; accepted: --source-prompt TEXT or --source-image PNG "
                           "--source-caption TEXT")
    channels = None
    if args.channels:
        channels = _read_channels(args.channels)
    elif args.stats is None:
        raise MassactError("no channel mask: pass --stats DIR (top-k per site) or --channels FILE")
    stats = None
    if args.stats is not None:  # also with --channels: the segmentation masks need it
        from ..probes.common import load_stats

        stats = load_stats(args.stats)
    model = load_model(args.model, args.device, args.dtype)
    cfg = TransportConfig(
        generation=generation_from_probe_args(args), k=args.k, channels=channels,
        token_mask=args.mask if len(args.mask) > 1 else args.mask[0], alpha=args.alpha,
        mode=args.mode or ("two_pass" if args.source_image else "batched"),
        copy_norm_out=args.copy_norm_out, sites=parse_sites(args.sites),
        steps=args.steps, control=not args.no_control,
    )
    result = transport(model, source, args.target_prompt, stats, cfg)
    save_transport(result, args.out)
    m = result.metrics
    print(f"result -> source: mse {m['to_source']['all']:.5f} (inside p {m['to_source']['inside']}, "
          f"outside {m['to_source']['outside']})")
    if "to_target" in m:
        print(f"result -> target: mse {m['to_target']['all']:.5f} (inside p {m['to_target']['inside']}, "
              f"outside {m['to_target']['outside']})")
    if "moved" in m:
        print(f"judge: moved {m['moved']}, kept {m.get('kept', '-')}, already {m.get('already', '-')}")
    if cfg.mode == "two_pass":
        print(f"stored {result.meta['stored_bytes']} bytes (full hidden states: {result.meta['full_bytes']})")
    print(f"wrote {args.out}")
    return 0


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="reproduce the three claims with controls (markdown + JSON)")
    add_model_args(p)
    p.add_argument("--stats", required=True, help="statistics run folder of the model")
    p.add_argument("--k", default="1,2,4,8", help="k values of the disruption sweep")
    p.add_argument("--prompts", type=int, default=16, help="prompts per measurement (default 16)")
    p.add_argument("--pairs", type=int, default=16, help="transport pairs (default 16)")
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument("--num-steps", type=int, default=None, help="denoising steps (default: model's)")
    p.add_argument("--transport-k", default="4,16", help="channels per site for transport (default 4,16)")
    p.add_argument("--seed", type=int, default=1000, help="first seed (default 1000)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--sites", nargs="*", default=None, help="module paths or layer indices (default all)")
    p.add_argument("--masks", default="all,union", help="transport token masks (default all,union)")
    p.add_argument("--judge", default=None, help="judge folder (default: beside the model)")
    p.add_argument("--segmentation-samples", type=int, default=8,
                   help="world images for the mask-IoU table; 0 skips it (default 8)")
    p.add_argument("--out", required=True, help="folder for evaluation.md / evaluation.json")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation and write ``evaluation.md`` and ``evaluation.json``."""
    from ..probes.common import load_stats
    from ..probes.evaluate import EvaluationConfig, evaluate, save_evaluation

    stats = load_stats(args.stats)
    model = load_model(args.model, args.device, args.dtype)
    cfg = EvaluationConfig(
        ks=_ints(args.k), prompts=args.prompts, pairs=args.pairs, random_draws=args.random_draws,
        num_steps=args.num_steps, height=args.height, width=args.width,
        transport_ks=_ints(args.transport_k), seed=args.seed, sites=parse_sites(args.sites),
        transport_masks=[m.strip() for m in args.masks.split(",") if m.strip()],
        judge=args.judge if args.judge else True,
        segmentation={"world_samples": args.segmentation_samples} if args.segmentation_samples > 0 else None,
    )
    report = evaluate(model, stats, cfg)
    md = save_evaluation(report, args.out)
    print(md)
    return 0
