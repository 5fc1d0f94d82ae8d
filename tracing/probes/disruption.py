"""Disruption probe (functional criticality): zero / mean / scale chosen channels, with controls.

Every channel set (top-k, lowest-k, random-k draws, none) is one batched generation of the same
prompts with the same per-prompt generators, so the images differ only by the intervention.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from massact_nn._io import load_json
from massact_nn.disruption import MODES, DisruptionResult, ablate
from massact_nn.errors import MassactError, check_channel_ids, check_k, choice_error
from massact_nn.images import grid, save_png
from massact_nn.metrics import mse, psnr
from massact_nn.selection import CONTROLS
from massact_nn.stats import ChannelStats
from massact_nn.transfer import move_packed

from ..adapters import read_image, write_image
from ..generation import GenerationConfig, as_prompts, batches
from .common import (
    Plan,
    UserMetric,
    channel_sets,
    find_judge,
    judge_can_read,
    judge_scores,
    load_stats,
    make_plan,
    probe_meta,
    write_pngs,
)


@dataclass
class DisruptionConfig:
    """What to disrupt, where, and how.

    Attributes:
        generation: Trajectory settings (steps, seed, size, guidance, batch size).
        k: Channels per set, or several k (one set of every control per k).
        controls: Channel sets besides the undisturbed baseline: ``top``, ``low``, ``random``.
        random_draws: Draws of ``random`` (draw d uses channel seed ``channel_seed + d``).
        channel_seed: Seed of the random channel draws.
        mode: ``zero``, ``mean`` (the statistics' channel mean), ``token_mean`` or ``scale``.
        alpha: Factor of ``scale`` mode.
        sites: Module paths or layer indices (``None``: every site).
        steps: Denoising steps to intervene at (``"a:b"``, a list, or ``None`` for all).
        user_metric: ``(images, prompts) -> dict`` run on every set's images.
        judge: Score images with the toy's judge: ``True`` when the model folder ships one, or a
            judge folder.
        progress: Show a tqdm bar over generations.
    """

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    k: int | Sequence[int] = 4
    controls: Sequence[str] = ("top", "low", "random")
    random_draws: int = 3
    channel_seed: int = 0
    mode: str = "zero"
    alpha: float = 0.0
    sites: Sequence[str | int] | None = None
    steps: str | Sequence[int] | None = None
    user_metric: UserMetric | None = None
    judge: bool | str | Path = True
    progress: bool = True


def disrupt_output(
    layout: str, out: Any, n_img: int, channels: torch.Tensor, mode: str = "zero",
    alpha: float = 0.0, values: torch.Tensor | None = None, signed: bool = True, checked: bool = False,
    where: str = "?",
) -> Any:
    """A block's output with the chosen image-stream channels disrupted (a new object).

    Use it inside your own trace: ``blk.output = disrupt_output(layout, blk.output, n_img, ch)``.
    Every row is edited (under batched CFG both the unconditional and conditional rows). At every
    site and step, check the ids once beforehand and pass ``checked=True`` (see :func:`ablate`).

    Args:
        layout: The block's output layout (``make_plan(model, gen).layouts[module]``).
        out: The block's output (``blk.output``).
        n_img: Image tokens at the generation's size (``make_plan(...).n_img``).
        channels: Channel ids (an int tensor, list or array; a boolean mask is refused).
        where: The site's name, for error messages.

    Shapes:
        channels: [k]; values: [k] (``mean`` mode; magnitudes when ``signed`` is false).
    """
    h = read_image(layout, out, n_img, where)
    return write_image(layout, out, ablate(h, channels, mode, alpha, values, signed, checked), n_img)


def generate_images(
    model: Any,
    plan: Plan,
    prompts: Sequence[str],
    edit: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None,
    mode: str = "zero",
    alpha: float = 0.0,
    bar: Any = None,
    signed: bool = True,
) -> torch.Tensor:
    """Generate ``prompts`` with per-site channel edits at the plan's steps (``None``: no edit).

    Args:
        model: An nnsight ``DiffusionModel``.
        plan: Resolved sites, steps and schedule.
        prompts: Prompt i uses seed ``seed + i``.
        edit: Per site module path, ``(channels, mean values or None)``.
        mode: Disruption mode.
        alpha: Factor of ``scale`` mode.
        bar: Optional tqdm bar advanced once per batch.
        signed: ``mean`` values are signed means (else magnitudes; see :func:`ablate`).

    Shapes:
        -> [prompts, 3, H, W] in [0, 1].
    """
    device = plan.device
    edit = {m: e for m, e in (edit or {}).items() if e[0].numel()}
    sites = [s for s in plan.sites if s.module in edit]
    # Checked once here, then moved once: a host-to-device copy inside the loop waits on the GPU.
    for s in sites:
        check_channel_ids(edit[s.module][0].cpu(), s.channels)
    moved = move_packed({**{f"ids/{m}": ch.long() for m, (ch, _) in edit.items()},
                         **{f"values/{m}": v for m, (_, v) in edit.items() if v is not None}}, device)
    edit = {m: (moved[f"ids/{m}"], moved.get(f"values/{m}")) for m in edit}
    blocks = {s.module: model.transformer.get(s.module) for s in sites}
    n_calls = max((c.index for c in plan.schedule if plan.active(c)), default=-1) + 1
    chunks = []
    for first, chunk in batches(list(prompts), plan.gen.batch_size):
        with model.generate(chunk, **plan.kwargs(len(chunk), first, device, total=len(prompts))) as tracer:
            if sites and n_calls:
                for i in tracer.iter[:n_calls]:
                    if not plan.active(plan.schedule[i]):
                        continue
                    for s in sites:
                        ch, vals = edit[s.module]
                        blk = blocks[s.module]
                        blk.output = disrupt_output(plan.layouts[s.module], blk.output, plan.n_img,
                                                    ch, mode, alpha, vals, signed, checked=True)
            res = tracer.result.save()
        chunks.append(res[0].float().cpu())
        if bar is not None:
            bar.update(1)
    return torch.cat(chunks)


def _set_names(ks: list[int], controls: Sequence[str], draws: int) -> list[tuple[str, str, int, int]]:
    out = [("none", "none", 0, 0)]
    for k in ks:
        for c in controls:
            if c == "random":
                out += [(f"random{d}_k{k}", "random", k, d) for d in range(draws)]
            elif c != "none":
                out.append((f"{c}_k{k}", c, k, 0))
    return out


def disrupt(
    model: Any, prompts: str | Sequence[str], stats: ChannelStats | str | Path,
    config: DisruptionConfig | None = None,
) -> DisruptionResult:
    """Generate ``prompts`` undisturbed and with each channel set disrupted; compare.

    Args:
        model: An nnsight ``DiffusionModel``.
        prompts: Prompts (a string is one prompt); prompt i uses seed ``seed + i`` in every set.
        stats: A :class:`ChannelStats` or its run folder (channel sets and ``mean`` values).
        config: What to disrupt.

    Returns:
        A :class:`DisruptionResult`; ``metrics["sets"][name]`` holds MSE/PSNR to the baseline
        (means and ``per_image``), the judge's accuracy on the toy, and the user metric;
        ``metrics["summary"]`` one row per (control, k) with random draws averaged.
    """
    config = config or DisruptionConfig()
    prompts = as_prompts(prompts)
    if config.mode not in MODES:
        raise choice_error("disruption mode", config.mode, MODES)
    for c in config.controls:
        if c not in CONTROLS:
            raise choice_error("control", c, CONTROLS)
    if not list(config.controls):  # a run of the undisturbed baseline alone measures nothing
        raise MassactError(f"no channel sets given (controls is empty); accepted: one or more of "
                           f"{', '.join(CONTROLS)}")
    if not isinstance(config.k, numbers.Integral) and not list(config.k):
        raise MassactError("no k given (an empty list); accepted: one k or a list of them, each >= 1")
    if config.random_draws < 1:
        raise MassactError(f"random_draws={config.random_draws} is out of range; accepted: >= 1")
    st = load_stats(stats)
    plan = make_plan(model, config.generation, config.sites, config.steps)
    ks = [config.k] if isinstance(config.k, numbers.Integral) else list(config.k)
    for k in ks:
        for s in plan.sites:
            check_k(k, s.channels)
    names = _set_names(ks, config.controls, config.random_draws)
    sets = {name: channel_sets(st, plan.sites, c, k or 1, seed=config.channel_seed + d) if c != "none" else {}
            for name, c, k, d in names}
    judge = find_judge(model, config.judge)
    n_batches = -(-len(prompts) // plan.gen.batch_size)
    bar = tqdm(total=len(names) * n_batches, desc="disrupt", unit="gen", disable=not config.progress)
    images: dict[str, torch.Tensor] = {}
    # Older statistics runs have no signed mean: fall back to the magnitude and the sample's sign.
    mean_stat = "mean" if all(f"mean/{s.module}" in st.tensors for s in plan.sites) else "abs_mean"
    for name, *_ in names:
        edit = {m: (ch, st.stat(m, mean_stat)[ch] if config.mode == "mean" else None)
                for m, ch in sets[name].items()}
        images[name] = generate_images(model, plan, prompts, edit, config.mode, config.alpha, bar,
                                       signed=mean_stat == "mean")
    bar.close()
    metrics = _metrics(images, names, prompts, judge, config)
    meta = probe_meta(model, plan, prompts=prompts, mode=config.mode, alpha=config.alpha, k=ks,
                      mean_statistic=mean_stat if config.mode == "mean" else None,
                      controls=list(config.controls), random_draws=config.random_draws,
                      channel_seed=config.channel_seed, stats_model=st.meta.get("model"),
                      judge=judge is not None and judge_can_read(images["none"]))
    return DisruptionResult(images=images, channels=sets, metrics=metrics, meta=meta)


def _metrics(images: dict[str, torch.Tensor], names: list, prompts: list[str], judge: Any,
             config: DisruptionConfig) -> dict:
    """Per-set and per-(control, k) metrics against the undisturbed baseline.

    Two non-numbers, never mixed up: a PSNR of ``None`` is infinite (images identical to the
    baseline, MSE 0), and NaN marks a value that is not finite because the disrupted images are
    not (a disruption that overflows, such as ``scale`` with a huge ``alpha``); ``non_finite``
    counts those images. A set with one non-finite image has NaN means (and judge scores), never
    the mean of the others.
    """
    base = images["none"]
    per_set = {}
    for name, control, k, draw in names:
        x = images[name]
        e, p = mse(x, base), psnr(x, base)
        bad = ~torch.isfinite(e)  # a NaN or inf pixel in either image
        e = torch.where(bad, torch.full_like(e, math.nan), e)
        p = torch.where(bad, torch.full_like(p, math.nan), p)
        row: dict = {"control": control, "k": k, "draw": draw, "mse": _mean(e), "psnr": _psnr_mean(p),
                     "non_finite": int(bad.sum()),
                     "per_image": {"mse": e.tolist(), "psnr": [_psnr_json(v) for v in p.tolist()]}}
        j = judge_scores(judge, x, prompts)
        if j is not None:  # what the judge reads in NaN pixels is no score
            row["judge"] = {a: math.nan for a in j} if row["non_finite"] else j
        if config.user_metric is not None:
            row["user"] = dict(config.user_metric(x, prompts))
        per_set[name] = row
    summary = []
    for control, k in dict.fromkeys((c, k) for _, c, k, _ in names):
        rows = [r for r in per_set.values() if r["control"] == control and r["k"] == k]
        mses = torch.tensor([r["mse"] for r in rows], dtype=torch.float64)
        entry = {"control": control, "k": k, "draws": len(rows), "mse": _mean(mses),
                 "mse_std": float(mses.std()) if len(rows) > 1 else (0.0 if _finite(mses) else math.nan),
                 "psnr": _psnr_mean(torch.tensor([_inf(r["psnr"]) for r in rows], dtype=torch.float64)),
                 "non_finite": sum(r["non_finite"] for r in rows)}
        if all("judge" in r for r in rows) and rows:
            entry["judge"] = {a: sum(r["judge"][a] for r in rows) / len(rows) for a in rows[0]["judge"]}
        summary.append(entry)
    return {"sets": per_set, "summary": summary}


def _finite(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all())


def _mean(v: torch.Tensor) -> float:
    """The mean, or NaN when any value is not finite (no value is skipped)."""
    return float(v.double().mean()) if _finite(v) else math.nan


def _psnr_mean(v: torch.Tensor) -> float | None:
    """Mean PSNR: NaN when any value is NaN, ``None`` (infinite) when any image is identical."""
    if bool(torch.isnan(v).any()):
        return math.nan
    m = float(v.double().mean())
    return m if math.isfinite(m) else None


def _psnr_json(v: float) -> float | None:
    return None if v == float("inf") else v


def _inf(v: float | None) -> float:
    return float("inf") if v is None else v


def save_disruption(result: DisruptionResult, folder: str | Path) -> Path:
    """Save the result and its PNGs.

    One grid per set (prompts in a row) and ``grid.png`` (one row per set, baseline first). A
    folder reused from an earlier disruption run loses that run's set PNGs that this run does not
    write (the sets its ``meta.json`` listed); other files are left alone.
    """
    folder = Path(folder)
    for name in _previous_sets(folder):  # before the new meta.json replaces the list of them
        if name not in result.images:
            (folder / f"{name}.png").unlink(missing_ok=True)
    # meta.json goes first and comes back last (with result.save): a save that dies midway
    # leaves no folder that reads as complete with the older run's images.
    (folder / "meta.json").unlink(missing_ok=True)
    write_pngs(folder, result.images)
    n = next(iter(result.images.values())).shape[0]
    save_png(folder / "grid.png", grid(torch.cat(list(result.images.values())), n))
    result.save(folder)
    return folder


def _previous_sets(folder: Path) -> list[str]:
    """The set names of the disruption run already in ``folder`` (none for anything else)."""
    try:
        meta = load_json(folder / "meta.json")
    except (OSError, ValueError):
        return []
    if not isinstance(meta, dict) or meta.get("kind") != "disruption":
        return []
    names = meta.get("set_order")
    if not isinstance(names, list):
        return []
    # Only plain names: a set is a file of this folder, never a path out of it.
    return [s for s in names if isinstance(s, str) and s and s == Path(s).name and s not in (".", "..")]
