"""Evaluate a toy pipeline folder: prompt fidelity (judge) and massive-activation statistics.

Plain diffusers only (no nnsight): images come from ``FluxPipeline.__call__`` with the
folder's stored call defaults, and block outputs are read with ``register_forward_hook``.
For both Flux double and single blocks (diffusers 0.42) the image stream is ``output[1]``.

Statistic: ``abs_mean[c]`` = |mean over image tokens of channel c| of a block's image-stream
output, averaged over denoising steps, then over prompts. Per block we report
``top1/median`` of abs_mean and the mean pairwise Jaccard overlap of the per-prompt top-4
channel sets (1.0 = the same four channels for every prompt).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline

from massact_nn import world as W
from massact_nn._io import save_json
from massact_nn.errors import MassactError, check_positive_int

from . import build
from .judge import load_judge, score, train_judge

TOP_K = 4


def load_pipeline(folder: str | Path) -> FluxPipeline:
    """Load a toy pipeline folder offline, float32 on CPU."""
    return FluxPipeline.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)


def eval_prompts(n: int = 64, seed: int = 1234) -> tuple[list[str], list[int]]:
    """``n`` random world captions and per-image noise seeds, deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    attrs = W.World(seed).sample_attributes(n, rng)
    captions = [
        W.caption_for(f, s, b)
        for f, s, b in zip(attrs["fg_colour"], attrs["shape"], attrs["bg_colour"], strict=True)
    ]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)]
    return captions, seeds


def check_cfg_scale(cfg_scale: Any, name: str = "cfg_scale") -> float:
    """``cfg_scale`` as a float, refusing anything but a finite number >= 1.

    1 is no guidance (one transformer call per step); below 1 or NaN, :func:`generate` would
    silently fall back to no guidance, so those are refused rather than ignored.

    Raises:
        MassactError: naming the value.
    """
    accepted = "a finite number >= 1 (1: no guidance, above 1: true classifier-free guidance)"
    try:
        if isinstance(cfg_scale, bool):
            raise TypeError
        value = float(cfg_scale)
    except (TypeError, ValueError):
        raise MassactError(f"{name}={cfg_scale!r} is not a number; accepted: {accepted}") from None
    if not math.isfinite(value) or value < 1.0:
        raise MassactError(f"{name}={cfg_scale!r} is out of range; accepted: {accepted}")
    return value


def _blocks(pipe: FluxPipeline) -> list[tuple[str, torch.nn.Module]]:
    tr = pipe.transformer
    return [(f"double.{i}", b) for i, b in enumerate(tr.transformer_blocks)] + [
        (f"single.{i}", b) for i, b in enumerate(tr.single_transformer_blocks)
    ]


@torch.no_grad()
def generate(
    pipe: FluxPipeline,
    captions: list[str],
    seeds: list[int],
    call: dict[str, Any] | None = None,
    batch_size: int = 64,
    cfg_scale: float = 1.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Generate one image per caption and record per-prompt channel statistics.

    Args:
        pipe: a toy pipeline.
        captions: one prompt per image.
        seeds: one noise seed per image.
        call: pipeline keyword arguments (default: PIPELINE_DEFAULTS).
        batch_size: prompts per pipeline call.
        cfg_scale: when > 1, true classifier-free guidance against the empty prompt
            (``true_cfg_scale``, two transformer calls per step, conditional first);
            statistics then come from the conditional calls only. 1 is off; accepted: a
            finite number >= 1.

    Returns:
        ``(images, abs_means)``: images float32 [B, 3, H, W] in [-1, 1]; per block name the
        per-prompt abs_mean averaged over steps, float64 [B, D].

    Raises:
        MassactError: for a ``cfg_scale`` below 1 or not finite, a ``batch_size`` below 1, or
            captions and seeds of different lengths.
    """
    cfg_scale = check_cfg_scale(cfg_scale)
    batch_size = check_positive_int("batch_size", batch_size)
    if len(captions) != len(seeds):
        raise MassactError(f"{len(captions)} captions but {len(seeds)} seeds; accepted: one seed "
                           "per caption")
    call = dict(call or build.PIPELINE_DEFAULTS)
    calls_per_step = 1
    if cfg_scale > 1.0:
        call.update(true_cfg_scale=cfg_scale)
        calls_per_step = 2
    sums: dict[str, list[torch.Tensor]] = {}
    steps: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook(name: str):
        def fn(_module: torch.nn.Module, _inp: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if (calls[name] - 1) % calls_per_step:  # unconditional half of a CFG step
                return
            img = output[1]  # image stream [B, N, D]
            m = img.detach().double().mean(dim=1).abs()
            current[name] = current[name] + m if name in current else m
            steps[name] = steps.get(name, 0) + 1

        return fn

    handles = [blk.register_forward_hook(hook(name)) for name, blk in _blocks(pipe)]
    images = []
    try:
        for i in range(0, len(captions), batch_size):
            current.clear()
            steps.clear()
            calls.clear()
            caps, sds = captions[i : i + batch_size], seeds[i : i + batch_size]
            gens = [torch.Generator().manual_seed(s) for s in sds]
            neg = {"negative_prompt": [""] * len(caps)} if calls_per_step == 2 else {}
            out = pipe(prompt=caps, generator=gens, output_type="np", **call, **neg).images
            images.append(torch.from_numpy(out).permute(0, 3, 1, 2).numpy() * 2.0 - 1.0)
            for name, acc in current.items():
                sums.setdefault(name, []).append(acc / steps[name])
    finally:
        for h in handles:
            h.remove()
    abs_means = {name: torch.cat(v).numpy() for name, v in sums.items()}
    return np.concatenate(images).astype(np.float32), abs_means


def activation_summary(
    abs_means: dict[str, np.ndarray], k: int = TOP_K
) -> dict[str, dict[str, Any]]:
    """Per block: top1/median of prompt-averaged abs_mean, top-k channels, stability across prompts.

    Args:
        abs_means: per block, per-prompt abs_mean. Shapes: [B, D].
        k: size of the top channel set.
    """
    out = {}
    for name, per_prompt in abs_means.items():
        avg = per_prompt.mean(axis=0)
        order = np.argsort(-avg)
        sets = [set(np.argsort(-row)[:k].tolist()) for row in per_prompt]
        pairs = list(itertools.combinations(range(len(sets)), 2))
        jac = (
            float(np.mean([len(sets[a] & sets[b]) / len(sets[a] | sets[b]) for a, b in pairs]))
            if pairs
            else 1.0
        )
        out[name] = {
            "top1_over_median": float(avg[order[0]] / max(np.median(avg), 1e-12)),
            "top1": float(avg[order[0]]),
            "median": float(np.median(avg)),
            "top_channels": order[:k].tolist(),
            "topk_jaccard": jac,
            # Fraction of prompts whose own top-1 channel is the prompt-averaged top-1.
            "top1_agreement": float(np.mean(per_prompt.argmax(axis=1) == order[0])),
        }
    return out


def evaluate(
    folder: str | Path,
    n: int = 64,
    seed: int = 1234,
    judge_folder: str | Path | None = None,
    out_json: str | Path | None = None,
    verbose: bool = True,
    cfg_scale: float = 1.0,
) -> dict[str, Any]:
    """Generate ``n`` fresh prompts with the pipeline in ``folder`` and summarise.

    Args:
        folder: pipeline folder (a training run's ``pipeline/`` or the shipped folder).
        n: number of prompts (one image each), >= 1.
        seed: seed of the prompts and noise.
        judge_folder: where ``judge.safetensors`` lives (it must be there); default
            ``folder``, where a missing judge is trained on the spot (a few minutes) and saved.
        out_json: optional path of a JSON report.
        verbose: print a table.
        cfg_scale: true-CFG scale, a finite number >= 1 (1: off, the shipped default); see
            :func:`generate`.

    Returns:
        ``{"judge": accuracies, "blocks": per-block summary, "max_top1_over_median": float, ...}``.

    Raises:
        MassactError: before any work, for ``n`` < 1, a ``cfg_scale`` below 1 or not finite,
            or a named judge folder without a judge.
    """
    n = check_positive_int("n", n)
    cfg_scale = check_cfg_scale(cfg_scale)
    torch.set_num_threads(1)
    folder = Path(folder)
    jfolder = Path(judge_folder) if judge_folder else folder
    try:
        net = load_judge(jfolder)
    except FileNotFoundError:
        if judge_folder is not None:  # a judge the caller named must exist, not be made up
            raise MassactError(f"no judge.safetensors in {str(jfolder)!r}; accepted: a folder with a "
                               "trained judge, or no judge folder (one is trained beside the "
                               "pipeline)") from None
        from .judge import save_judge

        net = train_judge(log=lambda _m: None)
        save_judge(net, jfolder)
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    call = build.read_defaults(folder)
    captions, seeds = eval_prompts(n, seed)
    images, abs_means = generate(pipe, captions, seeds, call, cfg_scale=cfg_scale)
    acc = score(images, captions, net)
    blocks = activation_summary(abs_means)
    report = {
        "folder": str(folder),
        "n": n,
        "seed": seed,
        "call": call,
        "cfg_scale": cfg_scale,
        "judge": acc,
        "blocks": blocks,
        "max_top1_over_median": max(b["top1_over_median"] for b in blocks.values()),
    }
    if verbose:
        print(format_report(report))
    if out_json:
        save_json(out_json, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of an :func:`evaluate` report."""
    acc = report["judge"]
    lines = [
        f"judge accuracy on {report['n']} prompts: "
        + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()),
        f"{'block':<10} {'top1/median':>11} {'top1':>9} {'median':>9} {'jaccard@4':>9}"
        f" {'top1 agree':>10}  top-4 channels",
    ]
    for name, b in report["blocks"].items():
        lines.append(
            f"{name:<10} {b['top1_over_median']:>11.2f} {b['top1']:>9.4f} {b['median']:>9.4f} "
            f"{b['topk_jaccard']:>9.3f} {b['top1_agreement']:>10.3f}  {b['top_channels']}"
        )
    return "\n".join(lines)
