"""Plumbing shared by the probes: run plans, step/site parsing, channel sets, run folders.

A probe intervenes at some sites (block outputs) during some denoising steps of a generation.
:class:`Plan` resolves all of that once against a loaded model: the generation settings, the
transformer-call schedule (calls are not steps under true CFG; docs/nnsight-pitfalls.md, 5), the
output layout of each site, and the image token grid.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from massact_nn.errors import MassactError, choice_error
from massact_nn.images import grid, save_png
from massact_nn.selection import CONTROLS, control_set
from massact_nn.sites import Site, resolve_sites
from massact_nn.stats import ChannelStats

from ..adapters import Adapter
from ..generation import (
    Call,
    GenerationConfig,
    call_schedule,
    guidance_meta,
    per_prompt_rows,
    pipeline_kwargs,
    resolve,
)
from ..model import library_versions, model_adapter, model_name, transformer_device
from ..sites import sites_of

#: A user metric: ``(images [n, 3, H, W] in [0, 1], prompts) -> {name: value}``.
UserMetric = Callable[[torch.Tensor, Sequence[str]], dict]


def parse_steps(spec: str | Sequence[int] | None, n_steps: int) -> list[int]:
    """Denoising steps to intervene at, from a spec.

    Accepted: ``"a:b"`` (half-open, either end optional), ``"s"``, ``"s1,s2,..."``, a list of
    ints, or ``None`` (every step). Negative indices count from the end.

    Raises:
        MassactError: naming the bad spec and the accepted range.
    """
    accepted = f"'a:b' (half-open), 'a,b,c' or one step, within 0..{n_steps - 1}"
    if spec is None:
        return list(range(n_steps))
    picked: list[int] | None = None
    try:
        if isinstance(spec, str) and ":" in spec:
            a, b = spec.strip().split(":", 1)
            lo, hi = (int(x) if x.strip() else None for x in (a, b))
            picked = list(range(n_steps))[lo:hi]
        elif isinstance(spec, str):
            items = [int(x) for x in spec.split(",") if x.strip()]
        else:
            items = [int(x) for x in spec]
    except ValueError:
        raise MassactError(f"cannot parse steps {spec!r}; accepted: {accepted}") from None
    if picked is not None:
        if not picked:
            raise MassactError(f"steps {spec!r} select no step; accepted: {accepted}")
        return picked
    out = []
    for x in items:
        y = x + n_steps if x < 0 else x
        if not 0 <= y < n_steps:
            raise MassactError(f"step {x} is out of range; accepted: {accepted}")
        if y not in out:
            out.append(y)
    if not out:
        raise MassactError(f"steps {spec!r} select no step; accepted: {accepted}")
    return sorted(out)


def parse_sites(values: Sequence[str] | None) -> list[str] | None:
    """``--sites`` values (space- or comma-separated module paths / layer indices); ``None`` = all.

    Raises:
        MassactError: for ``--sites`` given without a site (it would select nothing).
    """
    if values is None:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    if not out:
        raise MassactError("--sites was given without a site; accepted: module paths or layer "
                           "indices (space- or comma-separated), or no --sites for every site")
    return out


@dataclass
class Plan:
    """A probe's intervention plan, resolved against a loaded model.

    Attributes:
        adapter: The model's architecture adapter.
        gen: Resolved generation settings.
        sites: Sites to intervene at, in execution order.
        layouts: Output layout per site module path.
        steps: Denoising steps to intervene at.
        schedule: Every transformer call of one generation.
        n_img: Image tokens per sample.
        grid: Image token grid ``(rows, cols)``.
        batched_cfg: Whether the transformer sees ``[uncond; cond]`` rows in one call.
        device: The transformer's device when the plan was made (read once: diffusers walks
            every submodule for it, ~0.3 ms on a 6-block model). A plan serves one run: make a
            new one after moving the model.
        guidance: How guidance runs (:func:`guidance_meta`), for the run's metadata.
    """

    adapter: Adapter
    gen: GenerationConfig
    sites: list[Site]
    layouts: dict[str, str]
    steps: list[int]
    schedule: list[Call]
    n_img: int
    grid: tuple[int, int]
    batched_cfg: bool
    device: torch.device
    guidance: dict = field(default_factory=dict)

    def active(self, call: Call) -> bool:
        """Whether a transformer call falls in the intervened steps."""
        return call.step in self._step_set

    def __post_init__(self) -> None:
        self._step_set = set(self.steps)

    def kwargs(
        self, n: int, first_index: int, device: Any, same_seed: bool = False, total: int | None = None
    ) -> dict:
        """Pipeline keyword arguments for ``n`` prompts starting at ``first_index``.

        Images come back as ``[n, 3, H, W]`` tensors in [0, 1]. With ``same_seed`` every row gets a
        generator seeded ``seed + first_index`` (identical noise; docs/nnsight-pitfalls.md, 9).
        ``total``: the whole prompt list's length, for per-prompt lists (a negative prompt per
        prompt) to be cut to this batch.
        """
        kw = pipeline_kwargs(self.gen, [""] * n, first_index, device, total=total)
        if same_seed:
            seed = self.gen.seed + first_index
            kw["generator"] = [torch.Generator(device).manual_seed(seed) for _ in range(n)]
        kw.update(output_type="pt", return_dict=False)
        return kw


def make_plan(
    model: Any,
    generation: GenerationConfig,
    sites: Sequence[str | int] | None = None,
    steps: str | Sequence[int] | None = None,
) -> Plan:
    """Resolve sites, steps and the call schedule for ``model``."""
    adapter = model_adapter(model)
    pipe = model.pipeline
    gen = resolve(generation, model, adapter)
    chosen = resolve_sites(sites_of(model), sites)
    kinds = {bl.attr: bl.layout for bl in adapter.blocks}
    layouts = {s.module: kinds[s.module.rsplit(".", 1)[0]] for s in chosen}
    # The guidance structure, from the first prompt's entries of any per-prompt lists.
    probe_kw = pipeline_kwargs(per_prompt_rows(gen, [0]), [""], 0, "cpu")
    per_step = adapter.calls_per_step(pipe, probe_kw)
    rows, cols = adapter.grid(pipe, gen.height, gen.width)
    batched_cfg = adapter.batched_cfg(pipe, probe_kw)
    return Plan(
        adapter=adapter, gen=gen, sites=chosen, layouts=layouts, steps=parse_steps(steps, gen.steps),
        schedule=call_schedule(gen.steps, per_step), n_img=rows * cols, grid=(rows, cols),
        batched_cfg=batched_cfg, device=transformer_device(pipe),
        guidance=guidance_meta(pipe, probe_kw, per_step, batched_cfg, adapter),
    )


def probe_meta(model: Any, plan: Plan, **extra: Any) -> dict:
    """Run metadata: model, versions, generation, guidance as it ran, sites, steps, plus ``extra``."""
    pipe = model.pipeline
    return {
        "model": model_name(model),
        "architecture": plan.adapter.name,
        "transformer_class": type(pipe.transformer).__name__,
        "versions": library_versions(),
        "generation": plan.gen.to_json(),
        "seed": plan.gen.seed,
        "num_steps": plan.gen.steps,
        **plan.guidance,
        "steps": plan.steps,
        "sites": [s.module for s in plan.sites],
        "token_grid": list(plan.grid),
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        "device": str(plan.device),
        **extra,
    }


# -- statistics runs --------------------------------------------------------------------------
def load_stats(stats: ChannelStats | str | Path) -> ChannelStats:
    """A :class:`ChannelStats` from itself or its run folder."""
    return stats if isinstance(stats, ChannelStats) else ChannelStats.load(stats)


def stats_site(stats: ChannelStats, site: Site) -> Site:
    """The statistics run's entry for a model site, checked to be there and of the same width.

    Raises:
        MassactError: for a site the run did not measure, or a different channel count.
    """
    have = {s.module: s for s in stats.sites}
    if site.module not in have:
        where = stats.meta.get("model", "?")
        raise MassactError(
            f"site {site.module!r} is not in the statistics run (model {where}); "
            f"accepted: {', '.join(have) or 'none'} (or collect statistics at that site)"
        )
    if have[site.module].channels != site.channels:
        raise MassactError(
            f"site {site.module}: the statistics run has {have[site.module].channels} channels, the "
            f"model has {site.channels}; the statistics come from another model"
        )
    return have[site.module]


def channel_sets(
    stats: ChannelStats, sites: Sequence[Site], control: str, k: int, seed: int = 0, stat: str = "abs_mean"
) -> dict[str, torch.Tensor]:
    """One named channel set (``top``/``low``/``random``/``none``) per site, from statistics.

    ``random`` draws exclude the site's top-k and use ``seed`` (the same seed at every site).

    Shapes:
        -> {module: [k]} ([0] for ``none``).
    """
    if control not in CONTROLS:
        raise choice_error("channel set", control, CONTROLS)
    out = {}
    for s in sites:
        stats_site(stats, s)
        out[s.module] = control_set(control, stats.stat(s.module, stat), k, seed=seed)
    return out


# -- run folders ------------------------------------------------------------------------------
def write_pngs(folder: str | Path, images: dict[str, torch.Tensor], ncols: int | None = None) -> list[Path]:
    """Write one PNG per entry: a single image as is, a batch as a grid (one row by default).

    Shapes:
        each value: [3, H, W], [H, W] or [n, 3, H, W].
    """
    folder = Path(folder)
    paths = []
    for name, x in images.items():
        img = grid(x, ncols or x.shape[0]) if x.ndim == 4 else x
        paths.append(save_png(folder / f"{name}.png", img))
    return paths


def find_judge(model: Any, judge: bool | str | Path = True) -> Any | None:
    """The toy's attribute judge, or ``None``.

    Args:
        model: The model; with ``judge=True`` its folder is searched for ``judge.safetensors``
            (the toy ships its judge beside the pipeline).
        judge: ``True`` (look beside the model), ``False`` (no judge), or a judge folder.
    """
    if judge is False or judge is None:
        return None
    from ..toy.judge import load_judge

    if judge is True:
        pipe = getattr(model, "pipeline", model)
        name = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
        if not name or not (Path(str(name)) / "judge.safetensors").is_file():
            return None
        return load_judge(Path(str(name)))
    folder = Path(judge)
    if not (folder / "judge.safetensors").is_file():
        raise MassactError(f"no judge in {str(judge)!r} (missing judge.safetensors); accepted: a judge "
                           "folder written by the toy's training")
    return load_judge(folder)


def judge_scores(judge: Any, images: torch.Tensor, prompts: Sequence[str]) -> dict | None:
    """The judge's accuracy per attribute against world captions.

    ``None`` where it has nothing to score: images not of the world's size, or prompts that are
    not world captions.

    Shapes:
        images: [n, 3, H, W] in [0, 1].
    """
    if judge is None:
        return None
    from massact_nn import world as W

    from ..toy.judge import score

    if not judge_can_read(images):
        return None
    try:
        for p in prompts:
            W.parse_caption(p)
    except ValueError:
        return None  # not world captions: the judge has nothing to score against
    return score(images.float() * 2 - 1, list(prompts), judge)


def judge_can_read(images: torch.Tensor) -> bool:
    """Whether the toy's judge can read these images (world-sized)."""
    # The judge reads world images at their own size (its first layer is sized for them);
    # an image of another size is not one it can read.
    from massact_nn import world as W

    return tuple(images.shape[-2:]) == (W.SIZE, W.SIZE)


def judge_readings(judge: Any, images: torch.Tensor) -> list[dict] | None:
    """The judge's attribute names per image (``None`` without a judge)."""
    if judge is None or not judge_can_read(images):
        return None
    from massact_nn import world as W

    from ..toy.judge import judge as read

    pred = read(images.float() * 2 - 1, judge)
    names = {"fg_colour": W.COLOURS, "shape": W.SHAPES, "bg_colour": W.BG_COLOURS}
    return [{a: names[a][int(pred[a][i])] for a in names} for i in range(images.shape[0])]


# -- CLI arguments ----------------------------------------------------------------------------
def add_probe_args(p: argparse.ArgumentParser) -> None:
    """Generation and intervention-window arguments shared by the probe commands.

    ``--steps`` here is the intervention window (``a:b``); the number of denoising steps is
    ``--num-steps``.
    """
    p.add_argument("--num-steps", type=int, default=None, help="denoising steps (default: model's)")
    p.add_argument("--steps", default=None, help="denoising steps to intervene at: a:b, a,b,c (default all)")
    p.add_argument("--sites", nargs="*", default=None, help="module paths or layer indices (default all)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed S+i (default 0)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")


def generation_from_probe_args(args: argparse.Namespace, model: Any = None) -> GenerationConfig:
    """A :class:`GenerationConfig` from :func:`add_probe_args` arguments.

    Unset steps and sizes are filled later from the model folder (:func:`resolve`); ``model`` is
    accepted for callers that pass it and not needed.
    """
    return GenerationConfig(
        steps=args.num_steps, seed=args.seed, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size,
    )
