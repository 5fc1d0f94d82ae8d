"""``massact segment``: foreground/background masks from K=2 clustering on the massive channels."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from massact_nn._io import atomic_write, save_json
from massact_nn.clustering import AGGREGATIONS, FEATURES, FOREGROUND_RULES
from massact_nn.errors import MassactError
from massact_nn.images import save_png
from massact_nn.masks import iou, load_png_mask, save_png_mask
from massact_nn.segmentation_result import SegmentationResult

from ..model import load_model
from ..probes.common import add_probe_args, generation_from_probe_args, parse_sites
from ..probes.segmentation import CHANNEL_SETS, SegmentConfig, segment
from .common import add_model_args


def register_segment(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment`` subcommand."""
    p = sub.add_parser(
        "segment", help="foreground/background token masks from K=2 clustering on chosen channels",
        description="Cluster image tokens restricted to the massive channels (K=2) into a "
        "foreground/background mask, with top/all/random/low channel sets and trivial baselines.",
    )
    add_model_args(p)
    p.add_argument("--stats", required=True, help="statistics run folder (massact stats --out DIR)")
    p.add_argument("--prompt", default=None, help="segment a generated trajectory of this prompt")
    p.add_argument("--image", default=None, help="segment a real image (PNG) ...")
    p.add_argument("--caption", default=None, help="... run with this caption")
    p.add_argument("--t", type=float, default=None, help="noise level of the real image (default 0.5)")
    p.add_argument("--posterior", default=None, choices=["mode", "sample"],
                   help="VAE posterior of the real image (default mode)")
    p.add_argument("--k", type=int, default=4, help="channels per site for top/random/low (default 4)")
    p.add_argument("--channels", default="top", choices=CHANNEL_SETS, help="channel set of mask.png")
    p.add_argument("--features", default="raw", choices=FEATURES)
    p.add_argument("--foreground", default="border", choices=FOREGROUND_RULES,
                   help="rule naming the foreground cluster (default: touches the border less)")
    p.add_argument("--aggregation", default="vote", choices=AGGREGATIONS, help="over sites and steps")
    p.add_argument("--gt-mask", default=None, help="true mask PNG at image resolution: report IoU")
    p.add_argument("--out", required=True, help="run folder to write")
    add_probe_args(p)
    for action in p._actions:  # the shared help says "default all"; segmentation's defaults differ
        if action.dest == "steps":
            action.help = "steps of a generated trajectory: a:b, a,b,c (default: the middle step)"
        elif action.dest == "sites":
            action.help = "module paths or layer indices (default: the last site)"
        elif action.dest == "batch_size":
            action.help = "noise levels per transformer call (real image)"
    p.set_defaults(func=run_segment)




def run_segment(args: argparse.Namespace) -> int:
    """Segment, then write masks, overlay, metrics and the result."""
    if (args.prompt is None) == (args.image is None):
        raise MassactError("give exactly one source; accepted: --prompt P, or --image PNG --caption TEXT")
    for what, path in (("image", args.image), ("mask", args.gt_mask)):
        if path is not None and not Path(path).is_file():
            raise MassactError(f"{what} file {path!r} does not exist; accepted: a PNG file")
    if args.gt_mask is not None:
        _gt(args.gt_mask)  # an unreadable or empty mask fails now, not after the segmentation
    if args.image is not None and not (args.caption or "").strip():
        raise MassactError("a real image needs a caption; accepted: a non-empty --caption")
    if args.image is not None and args.num_steps is not None:
        raise MassactError(f"--num-steps {args.num_steps} given with --image, which is one transformer "
                           "call at --t; accepted: --num-steps with --prompt")
    model = load_model(args.model, args.device, args.dtype)
    config = SegmentConfig(
        stats=args.stats, prompt=args.prompt, image=args.image, caption=args.caption, t=args.t,
        k=args.k, channels=args.channels, features=args.features, foreground=args.foreground,
        aggregation=args.aggregation, sites=parse_sites(args.sites), steps=args.steps,
        generation=generation_from_probe_args(args, model), posterior=args.posterior,
    )
    result = segment(model, config)
    metrics = write_segmentation(result, args.out, args.gt_mask)
    fg = metrics["foreground_fraction"][result.primary]
    line = f"{result.primary}: foreground {fg:.0%} of tokens"
    if "iou" in metrics:
        line += "; IoU " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["iou"].items())
    print(line)
    print(f"wrote {args.out}/mask.png, mask.npy, overlay.png, metrics.json, result.safetensors")
    return 0


def _gt(path: str, shape: tuple[int, int] | None = None) -> torch.Tensor:
    truth = load_png_mask(path, shape)
    if not truth.any():
        raise MassactError(f"ground-truth mask {path!r} has no foreground pixel (foreground: the "
                           "first colour channel above half of full scale; an alpha channel is not "
                           "read); accepted: a mask with a foreground")
    return truth


def write_segmentation(result: SegmentationResult, folder: str | Path, gt_mask: str | None = None) -> dict:
    """Write a segmentation run folder and return its metrics.

    Files: ``mask.png`` (image resolution), ``mask.npy`` (token grid, bool), ``overlay.png``,
    ``image.png``, ``metrics.json``, ``result.safetensors`` + ``meta.json``.
    """
    folder = Path(folder)
    truth = _gt(gt_mask, result.image_size) if gt_mask else None
    # The result (its meta.json) is written last and removed first: a run that dies midway over
    # an older one leaves no folder that reads as complete with the older mask.npy.
    (folder / "meta.json").unlink(missing_ok=True)
    save_png_mask(folder / "mask.png", result.pixel_mask())
    _save_npy(folder / "mask.npy", result.mask.numpy())
    save_png(folder / "overlay.png", result.overlay())
    if result.image is not None:
        save_png(folder / "image.png", result.image)
    names = [*result.aggregated, *result.baselines]
    metrics: dict = {
        "primary": result.primary,
        "token_grid": list(result.grid),
        "foreground_fraction": {n: float(result.set_mask(n).float().mean()) for n in names},
        "iou_with_primary": {n: iou(result.set_mask(n), result.mask) for n in names},
    }
    if truth is not None:
        metrics["gt_mask"] = str(Path(gt_mask).resolve())  # readable from any working folder
        metrics["iou"] = result.iou(truth)
    save_json(folder / "metrics.json", metrics)
    result.save(folder)
    return metrics


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, arr)

    atomic_write(path, write)
