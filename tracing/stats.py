"""Streaming channel statistics over every site, step and prompt, as an nnsight intervention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from massact_nn.errors import MassactError
from massact_nn.reduce import plan_compiled
from massact_nn.sites import resolve_sites
from massact_nn.stats import ChannelStats, StatsAccumulator

from .adapters import read_image
from .generation import (
    GenerationConfig,
    as_prompts,
    batches,
    call_schedule,
    guidance_meta,
    n_image_tokens,
    pipeline_kwargs,
    resolve,
)
from .model import library_versions, model_adapter, model_name, transformer_device
from .sites import sites_of


@dataclass
class StatsConfig:
    """What to measure.

    Attributes:
        generation: Trajectory settings (steps, seed, size, guidance, batch size).
        k: Size of the top-k sets reported per site (and kept for stability summaries).
        per_step: Also keep ``per_step_abs_mean`` [steps × channels] per site.
        include_uncond: Under classifier-free guidance, also count the unconditional rows/calls.
        sites: Module paths or layer indices to measure (``None``: every site).
        progress: Show a tqdm bar over transformer calls.
        reduction: How each site is reduced on a GPU: ``"auto"`` (the compiled one-pass kernel
            for large activations in runs long enough to repay its compilation, about a second
            on FLUX; eager kernels otherwise), ``"eager"`` or ``"compiled"``; see
            :func:`massact_nn.reduce.plan_compiled`. The forms agree to float32 rounding; CPUs
            always run eager.
    """

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    k: int = 4
    per_step: bool = False
    include_uncond: bool = False
    sites: Sequence[str | int] | None = None
    progress: bool = True
    reduction: str = "auto"


def collect_stats(
    model: Any, prompts: str | Sequence[str], config: StatsConfig | None = None
) -> ChannelStats:
    """Measure ``abs_mean``, ``mean_abs`` and ``max_abs`` per channel at every site.

    The reductions run inside the trace on the model's device, one site at a time, and only
    [channels]-sized sums are kept (see :class:`massact_nn.stats.StatsAccumulator`). On a GPU,
    ``config.reduction`` picks eager kernels or one compiled kernel per site (less GPU time,
    more host time per call, about a second of compilation on FLUX; see
    :mod:`massact_nn.reduce`).

    Args:
        model: An nnsight ``DiffusionModel`` (yours, or from :func:`load_model`).
        prompts: Text prompts (a string is one prompt); prompt i is generated from seed
            ``seed + i``.
        config: What to measure.

    Returns:
        A :class:`ChannelStats` with the run's metadata.
    """
    config = config or StatsConfig()
    prompts = as_prompts(prompts)
    adapter = model_adapter(model)
    pipe = model.pipeline
    gen = resolve(config.generation, model, adapter)
    every = sites_of(model)
    sites = resolve_sites(every, config.sites)
    kinds = {f"{bl.attr}.": bl.layout for bl in adapter.blocks}
    layout = {s.module: kinds[s.module.rsplit(".", 1)[0] + "."] for s in sites}
    n_img = n_image_tokens(pipe, adapter, gen.height, gen.width)
    device = transformer_device(pipe)

    probe_kw = pipeline_kwargs(gen, prompts[:1], 0, device, total=len(prompts))
    per_step = adapter.calls_per_step(pipe, probe_kw)
    batched_cfg = adapter.batched_cfg(pipe, probe_kw)
    schedule = call_schedule(gen.steps, per_step)
    planned = _planned_reductions(prompts, gen.batch_size, schedule, sites, n_img, batched_cfg,
                                  config.include_uncond)
    # Each block list may hand over its own memory layout (FLUX's single blocks: a slice of the
    # joint stream), and each layout is compiled separately.
    lists = {c: len({s.module.rsplit(".", 1)[0] for s in sites if s.channels == c}) for _, _, c in planned}
    compiled = plan_compiled(config.reduction, device, planned, {sh: lists[sh[2]] for sh in planned})
    acc = StatsAccumulator(sites, gen.steps, config.k, config.per_step, device, compiled=compiled)
    # Not even a disabled bar without progress: tqdm's constructor takes a lock and registers the
    # bar (~0.1 ms before the first call, which a GPU idles through).
    bar = (tqdm(total=len(prompts) * len(schedule), desc="stats", unit="call") if config.progress
           else _NoBar())
    blocks = {s.module: model.transformer.get(s.module) for s in sites}

    seen: dict[str, torch.dtype] = {}  # what the activations were computed in

    def measure(call, rows: slice, expected: int) -> None:
        # Runs at every transformer call: nothing here may read a value back from the device.
        if not (call.conditional or config.include_uncond):
            return
        for s in sites:
            out = blocks[s.module].output
            h = read_image(layout[s.module], out, n_img, s.module)
            _check_rows(h, expected, batched_cfg, s.module)
            # Default row layout: row r is prompt r % n (uncond rows, then cond rows).
            acc.update(s.module, call.step, h[rows])
        seen["dtype"] = h.dtype

    for first, chunk in batches(prompts, gen.batch_size):
        acc.begin_batch(len(chunk))
        n = len(chunk)
        # Statistics need no pixels: skipping the VAE decode (and PIL conversion) saves a second per
        # image on FLUX.1-dev at 1024² and is what keeps the overhead near zero.
        kw = {"output_type": "latent", **pipeline_kwargs(gen, chunk, first, device, total=len(prompts))}
        rows = _rows(n, batched_cfg, config.include_uncond)
        expected = 2 * n if batched_cfg else n
        with model.generate(chunk, **kw) as tracer:
            for i in tracer.iter[: len(schedule)]:
                measure(schedule[i], rows, expected)
                if i == len(schedule) - 1:
                    # Fold now, while a GPU still runs the last blocks, not after the generation.
                    acc.fold()
                bar.update(n)
        acc.end_batch()
    bar.close()
    meta = {
        "model": model_name(model),
        "architecture": adapter.name,
        "transformer_class": type(pipe.transformer).__name__,
        "versions": library_versions(),
        "prompts": prompts,
        "seed": gen.seed,
        "height": gen.height,
        "width": gen.width,
        "guidance_scale": gen.guidance_scale,
        **guidance_meta(pipe, probe_kw, per_step, batched_cfg, adapter),
        "generation": gen.to_json(),
        "include_uncond": config.include_uncond,
        "calls_per_step": per_step,
        "n_layers": len(every),  # the model's depth, whatever `sites` measured
        "dtype": str(seen["dtype"]).replace("torch.", ""),
        "device": str(device),
        "reduction": config.reduction,
        "compiled_shapes": sorted(list(shape) for shape in acc.ran_compiled),
    }
    return acc.result(meta)


def _planned_reductions(
    prompts: list[str], batch_size: int, schedule: list, sites: list, n_img: int, batched_cfg: bool,
    include_uncond: bool,
) -> dict[tuple[int, ...], int]:
    """How many site reductions the run will make, per activation shape [rows, tokens, channels]."""
    measured = sum(1 for call in schedule if call.conditional or include_uncond)
    calls: dict[tuple[int, ...], int] = {}
    for _, chunk in batches(prompts, batch_size):
        r = _rows(len(chunk), batched_cfg, include_uncond)
        for s in sites:
            shape = (r.stop - r.start, n_img, s.channels)
            calls[shape] = calls.get(shape, 0) + measured
    return calls


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _rows(n: int, batched_cfg: bool, include_uncond: bool) -> slice:
    """The measured rows of the batch: a slice (a view, no copy).

    Under batched CFG the rows are ``[uncond (n); cond (n)]`` (nnsight's batcher keeps that order).
    """
    if batched_cfg and not include_uncond:
        return slice(n, 2 * n)
    return slice(0, 2 * n if batched_cfg else n)


def _check_rows(h: torch.Tensor, expected: int, batched_cfg: bool, where: str) -> None:
    if h.shape[0] != expected:
        raise MassactError(
            f"site {where}: batch has {h.shape[0]} rows, expected {expected} "
            f"({'uncond+cond' if batched_cfg else 'one per prompt'}); unsupported guidance setup"
        )
