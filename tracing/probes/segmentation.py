"""The segmentation probe: K=2 clustering of image tokens on the massive channels.

Image-stream tokens are captured inside an nnsight trace at the chosen sites and steps; only
the union of the channel sets asked for is indexed out on the device and crosses to the host.
Each channel set (``top``, ``all``, ``random``, ``low``) is clustered the same way (see
:mod:`massact_nn.clustering` for the feature options, the foreground rule and the
aggregation), next to trivial baselines: every token foreground, a centred disc, and the
transformer's own noisy input tokens clustered the same way.

Two sources: a generated trajectory (``prompt``), or a real image noised to ``t`` and run
through the transformer with its caption (``image`` + ``caption``; see :mod:`.real_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from massact_nn.clustering import AGGREGATIONS, FEATURES, FOREGROUND_RULES, segment_tokens
from massact_nn.errors import MassactError, check_k, choice_error
from massact_nn.masks import centre_blob
from massact_nn.segmentation_result import SegmentationResult
from massact_nn.selection import control_set
from massact_nn.sites import Site
from massact_nn.stats import ChannelStats
from massact_nn.transfer import move_packed

from ..adapters import input_timestep, input_tokens, read_image
from ..generation import GenerationConfig, resolve
from ..model import model_adapter
from ..sites import sites_of
from .common import Plan, load_stats, make_plan, probe_meta, stats_site
from .real_image import POSTERIOR, real_image_activations

CHANNEL_SETS = ("top", "all", "random", "low")


@dataclass
class SegmentConfig:
    """What to segment and how.

    Attributes:
        stats: Channel statistics (or their run folder) that select the channels.
        prompt: Segment a generated trajectory of this prompt; or
        image: a real image (path, PIL, or [1, 3, H, W] tensor in [-1, 1]) with ``caption``,
            noised to ``t`` with seed ``generation.seed``.
        caption: Text the real image is run with.
        t: Noise level of the real image (0 = clean, 1 = pure noise; ``None``: 0.5).
        k: Channels per site for ``top``, ``random`` and ``low``.
        channels: The channel set whose mask is the result's primary mask.
        controls: Every channel set computed (the primary one is added if missing).
        features: One of ``raw``, ``centred``, ``standardised``.
        foreground: One of ``border``, ``minority``, ``magnitude``.
        aggregation: ``vote`` or ``concat`` over sites and steps.
        sites: Module paths or layer indices (``None``: the model's last site).
        steps: Steps of a generated trajectory (``"a:b"``, list; ``None``: the middle step).
        generation: Steps, seed, size and pipeline extras (a real image takes one call: its
            steps are not used).
        posterior: VAE posterior of a real image: ``mode`` or ``sample`` (``None``: ``mode``).

    Options of the other source are refused, not ignored: ``caption``, ``t`` and ``posterior``
    with a prompt, ``steps`` with an image.
        kmeans_seed: Seed of k-means and of the ``random`` channel draw.
    """

    stats: ChannelStats | str | Path
    prompt: str | None = None
    image: Any = None
    caption: str | None = None
    t: float | None = None
    k: int = 4
    channels: str = "top"
    controls: Sequence[str] = CHANNEL_SETS
    features: str = "raw"
    foreground: str = "border"
    aggregation: str = "vote"
    sites: Sequence[str | int] | None = None
    steps: str | Sequence[int] | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    posterior: str | None = None
    kmeans_seed: int = 0

    @property
    def noise_level(self) -> float:
        """The real image's t (0.5 unless set)."""
        return 0.5 if self.t is None else float(self.t)


def check_config(config: SegmentConfig) -> None:
    """Fail early, with one clear line, on any bad option."""
    for name, value, accepted in (
        ("channel set", config.channels, CHANNEL_SETS), ("feature option", config.features, FEATURES),
        ("foreground rule", config.foreground, FOREGROUND_RULES),
        ("aggregation", config.aggregation, AGGREGATIONS),
    ):
        if value not in accepted:
            raise choice_error(name, value, accepted)
    for c in config.controls:
        if c not in CHANNEL_SETS:
            raise choice_error("channel set", c, CHANNEL_SETS)
    if (config.prompt is None) == (config.image is None):
        raise MassactError("give exactly one source; accepted: a prompt, or an image with a caption")
    if config.image is not None and not (isinstance(config.caption, str) and config.caption.strip()):
        raise MassactError("a real image needs a caption; accepted: a non-empty --caption")
    if config.prompt is not None:
        given = [n for n in ("caption", "t", "posterior") if getattr(config, n) is not None]
        if given:
            raise MassactError(f"{', '.join(given)} given with a prompt, where they do nothing; "
                               "accepted: caption, t and posterior with a real image (--image)")
    elif config.steps is not None:
        raise MassactError(f"steps={config.steps!r} given with a real image, which is one transformer "
                           "call at t; accepted: steps with a generated trajectory (--prompt)")
    if config.posterior is not None and config.posterior not in POSTERIOR:
        raise choice_error("posterior", config.posterior, POSTERIOR)
    seed = config.kmeans_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        # scikit-learn takes 0..2**32-1 and would refuse it only after the generation.
        raise MassactError(f"kmeans_seed={seed!r} is out of range; accepted: an integer 0..{2**32 - 1}")
    if not 0.0 <= config.noise_level <= 1.0:
        raise MassactError(f"t={config.t!r} is out of range; accepted: 0 <= t <= 1")


def select_channels(
    stats: ChannelStats, sites: Sequence[Site], names: Sequence[str], k: int, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Channel ids per set and site: ``top``/``low``/``random`` from ``abs_mean``, ``all``.

    ``random`` excludes the site's top-k (an uncontaminated control) and uses ``seed``.

    Shapes:
        -> {set: {module: [k] (``all``: [channels])}}.
    """
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for s in sites:
        stats_site(stats, s)
        check_k(k, s.channels)
        stat = stats.stat(s.module, "abs_mean")
        for n in names:
            out[n][s.module] = torch.arange(s.channels) if n == "all" else control_set(n, stat, k, seed)
    return out


def union_channels(sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per site, the sorted union of every set's channels (what is captured).

    Shapes:
        -> {module: [c]}.
    """
    modules = next(iter(sets.values())).keys()
    return {m: torch.unique(torch.cat([s[m] for s in sets.values()])) for m in modules}


def capture_generated(
    model: Any, plan: Plan, prompt: str, channels: dict[str, torch.Tensor]
) -> tuple[dict[tuple[str, int], torch.Tensor], dict[int, torch.Tensor], torch.Tensor, dict[int, float]]:
    """Generate ``prompt`` and keep the image tokens on ``channels`` at the plan's sites and steps.

    Returns:
        ``(tokens, inputs, image, t_of_step)``: tokens per ``(module, step)``; the transformer's
        noisy input tokens per step; the generated image; the t fed at each step.

    Shapes:
        tokens: [N, c]; inputs: [N, D]; image: [3, H, W] in [0, 1].
    """
    dev = plan.device
    idx = move_packed(channels, dev)
    row = 1 if plan.batched_cfg else 0  # the conditional row under batched CFG ([uncond; cond])
    tokens: dict[tuple[str, int], torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    t_of: dict[int, float] = {}
    n_calls = len(plan.schedule)
    with model.generate([prompt], **plan.kwargs(1, 0, dev)) as tracer:
        for i in tracer.iter[:n_calls]:
            call = plan.schedule[i]
            if not (call.conditional and plan.active(call)):
                continue
            args, kw = model.transformer.inputs
            inputs[call.step] = input_tokens(args, kw, row, plan.grid).detach().float().cpu()
            t_of[call.step] = input_timestep(args, kw, row)
            for s in plan.sites:
                h = read_image(plan.layouts[s.module], model.transformer.get(s.module).output,
                               plan.n_img, s.module)
                tokens[(s.module, call.step)] = h[row][:, idx[s.module]].detach().float().cpu()
        res = tracer.result.save()
    return tokens, inputs, res[0][0].float().cpu(), t_of


def capture_real(
    model: Any, plan: Plan, image: Any, caption: str, t_values: Sequence[float],
    channels: dict[str, torch.Tensor], posterior: str = "mode",
) -> tuple[dict[tuple[str, int], torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """A real image noised to each t (row i = "step" i), tokens kept on ``channels``.

    Shapes:
        tokens: [N, c] per (module, i); inputs: [N, D] per i; image: [3, H, W] in [0, 1].
    """
    act = real_image_activations(
        model, image, caption, t_values, [s.module for s in plan.sites], channels, plan.gen,
        plan.gen.seed, posterior,
    )
    tokens = {(m, i): v[i].float() for m, v in act.tokens.items() for i in range(len(t_values))}
    inputs = {i: act.noised.noisy[i].float().cpu() for i in range(len(t_values))}
    return tokens, inputs, ((act.noised.image[0] + 1) / 2).clamp(0, 1).float().cpu()


def cluster_sets(
    tokens: dict[tuple[str, int], torch.Tensor], union: dict[str, torch.Tensor],
    sets: dict[str, dict[str, torch.Tensor]], keys: Sequence[tuple[str, int]], grid: tuple[int, int],
    features: str, foreground: str, aggregation: str, seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Cluster every channel set over the blocks ``keys``; aggregated and per-block masks."""
    aggregated, per_block = {}, {}
    for name, per_site in sets.items():
        blocks = []
        for m, st in keys:
            pos = torch.searchsorted(union[m], per_site[m])
            blocks.append(tokens[(m, st)][:, pos])
        agg, each = segment_tokens(blocks, *grid, features, foreground, aggregation, seed)
        aggregated[name] = agg
        per_block.update({f"{name}/{m}/{st}": b for (m, st), b in zip(keys, each)})
    return aggregated, per_block


def baseline_masks(
    inputs: dict[int, torch.Tensor], grid: tuple[int, int], features: str, foreground: str,
    aggregation: str, seed: int,
) -> dict[str, torch.Tensor]:
    """All-foreground, centred disc, and the noisy input tokens clustered like the activations."""
    rows, cols = grid
    steps = sorted(inputs)
    agg, _ = segment_tokens([inputs[s] for s in steps], rows, cols, features, foreground, aggregation, seed)
    return {"all_foreground": torch.ones(rows, cols, dtype=torch.bool),
            "centre": centre_blob(rows, cols), "input": agg}


def segment(model: Any, config: SegmentConfig) -> SegmentationResult:
    """Segment one generated or real image into foreground and background tokens.

    Args:
        model: An nnsight ``DiffusionModel``.
        config: Source, channel sets, clustering options, sites and steps.

    Returns:
        A :class:`SegmentationResult` with every channel set's mask and the baselines.
    """
    check_config(config)
    stats = load_stats(config.stats)
    real = config.image is not None
    gen = config.generation
    if real:
        gen = GenerationConfig(**{**gen.to_json(), "steps": 1})
    sites = config.sites if config.sites is not None else [sites_of(model)[-1].module]
    steps = config.steps
    if not real and steps is None:
        steps = [resolve(gen, model, model_adapter(model)).steps // 2]
    plan = make_plan(model, gen, sites, None if real else steps)
    names = list(dict.fromkeys([config.channels, *config.controls]))
    sets = select_channels(stats, plan.sites, names, config.k, config.kmeans_seed)
    union = union_channels(sets)
    if real:
        tokens, inputs, image = capture_real(model, plan, config.image, config.caption,
                                             [config.noise_level], union, config.posterior or "mode")
        t_of = {0: config.noise_level}
    else:
        tokens, inputs, image, t_of = capture_generated(model, plan, config.prompt, union)
    keys = sorted(tokens, key=lambda ms: (ms[1], [s.module for s in plan.sites].index(ms[0])))
    opts = (config.features, config.foreground, config.aggregation, config.kmeans_seed)
    aggregated, per_block = cluster_sets(tokens, union, sets, keys, plan.grid, *opts)
    meta = probe_meta(
        model, plan, source="image" if real else "prompt", prompt=config.prompt,
        caption=config.caption, t=config.noise_level if real else None,
        image_file=str(config.image) if isinstance(config.image, (str, Path)) else None,
        posterior=(config.posterior or "mode") if real else None,
        t_of_step={str(k): v for k, v in t_of.items()},
        k=config.k, channel_sets=names, features=config.features, foreground=config.foreground,
        aggregation=config.aggregation, kmeans_seed=config.kmeans_seed,
        stats_model=stats.meta.get("model"),
    )
    if real:
        meta["steps"] = [0]
    return SegmentationResult(
        aggregated=aggregated, per_block=per_block,
        channels={f"{n}/{m}": c for n, per in sets.items() for m, c in per.items()},
        baselines=baseline_masks(inputs, plan.grid, *opts), primary=config.channels,
        image_size=(plan.gen.height, plan.gen.width), image=image, meta=meta,
    )


def evaluate_segmentation(model: Any, stats: ChannelStats | str | Path, **kwargs: Any) -> dict:
    """Mask IoU against the shapes world's true masks, with controls and baselines.

    See :func:`massact_nn.tracing.probes.segmentation_eval.evaluate_segmentation` for the
    arguments; this name is what ``massact evaluate`` imports.
    """
    from .segmentation_eval import evaluate_segmentation as run

    return run(model, stats, **kwargs)
