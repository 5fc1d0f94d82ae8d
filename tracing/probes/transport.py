"""Transport probe (semantic transferability): source channels into a target under ``M = p mᵀ``.

Text-conditioned: source and target are prompts generated from the same noise (pair j uses seed
``seed + j`` for both). Image-conditioned: the source's activations at target step i come from the
transformer run on a real image noised to that step's t with the same seeded noise, with its
caption (:mod:`.real_image`).

Two execution modes. ``batched``: one generation of ``[sources; targets; results]`` rows with
identical generators per pair (docs/nnsight-pitfalls.md, 9); at each site the result rows are rebuilt
from the source rows and the whole output is assigned; nothing is stored. ``two_pass``: pass 1
generates the sources and keeps only the masked entries ``[rows, tokens in p, k]`` per site and
call; pass 2 generates targets and results and injects them. With ``control=False`` the untouched
target rows are left out (``[sources; results]`` in one batch: two rows per pair, the least a
trajectory-to-trajectory transport can cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from massact_nn.errors import MassactError, channel_ids, choice_error
from massact_nn.stats import ChannelStats
from massact_nn.transfer import move_packed
from massact_nn.transport import TransportResult, check_alpha, gather, scatter_blend_

from ..adapters import read_image, write_image
from ..generation import GenerationConfig, check_per_prompt, per_prompt_rows
from ..model import model_adapter
from .common import (
    Plan,
    channel_sets,
    find_judge,
    judge_can_read,
    load_stats,
    make_plan,
    probe_meta,
    write_pngs,
)
from .transport_parts import (
    ImageSource,
    group_rows,
    mask_groups,
    mask_keywords,
    resolve_token_mask,
    segmentation_masks,
    transport_metrics,
)

MODES = ("batched", "two_pass")

__all__ = ["MODES", "ImageSource", "TransportConfig", "save_transport", "transport"]


@dataclass
class TransportConfig:
    """What to transport, where, and how.

    Attributes:
        generation: Trajectory settings (steps, seed, size, guidance); ``batch_size`` is the number
            of pairs per pipeline call (a batched call holds three rows per pair).
        k: Channels per site (top-k of the statistics' ``abs_mean``) when ``channels`` is not given.
        channels: Per site module path, the channel ids to transport (overrides ``k``/stats).
        token_mask: ``"all"``; ``"target"``, ``"source"`` or ``"union"`` (foreground masks from
            the segmentation probe, run on each pair's trajectories); a token-grid mask
            ``[rows, cols]`` / ``[pairs, rows, cols]`` bool; a path (segmentation run folder with
            ``mask.npy``, a ``.npy`` file, or a PNG resized to the grid); or a list (the union).
            The default ``"all"`` needs no statistics run and copies at every token: with many
            channels the result then takes the source's layout too. To move semantics while
            keeping the target's structure, restrict ``p``, e.g. to the foregrounds (``"union"``,
            which the README's measurements use with k=16).
        alpha: Blend ``X_t (1 − αM) + X_s αM``; 1 = hard replacement, 0 = no change.
        mode: ``batched`` or ``two_pass`` (image-conditioned sources need ``two_pass``).
        copy_norm_out: Also blend ``transformer.norm_out``'s output over the tokens in ``p`` (all
            channels): its modulation carries the prompt's pooled embedding, so without it full
            transport is not an identity (docs/nnsight-pitfalls.md, 10).
        sites: Module paths or layer indices (``None``: every site).
        steps: Denoising steps to transport at (``"a:b"``, a list, or ``None`` for all).
        control: Also generate the untouched target (what the target-side metrics and the
            judge's ``kept``/``already`` compare against). ``False`` leaves those rows out: a
            batched transport is then two rows per pair instead of three, the result's ``target``
            is ``None`` and only the source-side metrics are reported.
        judge: Read the result's attributes with the toy's judge: ``True`` when the model folder
            ships one, or a judge folder.
        progress: Show a tqdm bar over generations.
    """

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    k: int = 4
    channels: dict[str, torch.Tensor] | None = None
    token_mask: Any = "all"
    alpha: float = 1.0
    mode: str = "batched"
    copy_norm_out: bool = False
    sites: Sequence[str | int] | None = None
    steps: str | Sequence[int] | None = None
    control: bool = True
    judge: bool | str | Path = True
    progress: bool = True


def transport(
    model: Any,
    source: str | Sequence[str] | ImageSource,
    target: str | Sequence[str],
    stats: ChannelStats | str | Path | None = None,
    config: TransportConfig | None = None,
) -> TransportResult:
    """Transport the source's channels into the target under ``M = p mᵀ``.

    Args:
        model: An nnsight ``DiffusionModel``.
        source: A prompt, one prompt per pair, or an :class:`ImageSource` (real image + caption).
        target: A prompt or one prompt per pair.
        stats: A :class:`ChannelStats` or its folder (channel mask ``m``: top-k per site);
            not needed when ``config.channels`` is given.
        config: What to transport.

    Returns:
        A :class:`TransportResult` with ``[pairs, 3, H, W]`` images (``target`` is ``None`` with
        ``config.control=False``); ``meta["stored_bytes"]``
        (two-pass) versus ``meta["full_bytes"]`` (full hidden states at the same sites and calls).
    """
    config = config or TransportConfig()
    if config.mode not in MODES:
        raise choice_error("transport mode", config.mode, MODES)
    check_alpha(config.alpha)
    targets = [target] if isinstance(target, str) else list(target)
    image_source = isinstance(source, ImageSource)
    sources = [] if image_source else ([source] if isinstance(source, str) else list(source))
    if not image_source and len(sources) != len(targets):
        raise MassactError(f"{len(sources)} source prompts for {len(targets)} target prompts; "
                           "accepted: one source per target")
    for p in sources + targets:
        if not isinstance(p, str) or not p.strip():
            raise MassactError("empty prompt given; accepted: non-empty strings")
    if image_source and config.mode != "two_pass":
        raise MassactError("image-conditioned transport runs in mode 'two_pass' only; accepted: "
                           "mode='two_pass' (--mode two_pass) with an image source")
    if image_source:
        _check_image_source(source)
        from .real_image import check_supported

        check_supported(model_adapter(model).name)
    if config.copy_norm_out and not hasattr(model.pipeline.transformer, "norm_out"):
        raise MassactError(f"copy_norm_out=True, but {type(model.pipeline.transformer).__name__} has no "
                           "norm_out; accepted: copy_norm_out=False (its blocks carry the transport)")
    if not targets:
        raise MassactError("no target prompts given; accepted: one or more source/target pairs")
    plan = make_plan(model, config.generation, config.sites, config.steps)
    check_per_prompt(plan.gen, len(targets), "pairs")
    for key in ("prompt_2", "prompt_3"):
        # A pair's rows are two trajectories with different prompts: an entry per pair would
        # give the source the target's second-encoder text (negative prompts do fit a pair).
        if isinstance(plan.gen.extra.get(key), (list, tuple)):
            raise MassactError(f"{key} is a list of {len(plan.gen.extra[key])}; transport takes no "
                               f"per-pair {key}, as a pair's source and target prompts differ; "
                               f"accepted: one string for every row, or no {key} (each row's prompt)")
    if image_source and not all(c.conditional for c in plan.schedule):
        # The real image is run with its caption only: there are no unconditional values to
        # carry into the unconditional calls, and copying the conditional ones would mix branches.
        raise MassactError("image-conditioned transport under true classifier-free guidance (an "
                           "unconditional transformer call per step) is not supported; accepted: "
                           "guidance without a negative prompt (true_cfg_scale <= 1)")
    channels = _channels(plan, stats, config)
    named = {}
    if mask_keywords(config.token_mask):
        named = segmentation_masks(model, plan, mask_keywords(config.token_mask), sources, targets,
                                   source if image_source else None, stats, config.k)
    p = resolve_token_mask(config.token_mask, plan.grid, len(targets), named)  # [pairs, rows, cols]
    empty = [j for j in range(p.shape[0]) if not p[j].any()]
    if empty:
        raise MassactError(f"the token mask selects no token for pairs {empty}, whose targets would "
                           "come back untouched; accepted: a mask with at least one token per pair")
    judge = find_judge(model, config.judge)
    bs = max(1, plan.gen.batch_size)
    chunks = range(0, len(targets), bs)
    bar = tqdm(total=len(chunks) * (2 if config.mode == "two_pass" else 1), desc="transport", unit="pass",
               disable=not config.progress)
    out: list[tuple] = []
    nbytes = {"stored_bytes": 0, "full_bytes": 0}
    for first in chunks:
        # Pair j keeps seed + j whatever the chunking: the chunk's plan starts at seed + first.
        # Per-pair lists (a negative prompt per pair) are cut to the chunk alike.
        pairs = range(first, min(first + bs, len(targets)))
        sub = replace(plan, gen=per_prompt_rows(replace(plan.gen, seed=plan.gen.seed + first), pairs))
        tg, pp, sc = targets[first:first + bs], p[first:first + bs], sources[first:first + bs]
        if config.mode == "batched":
            *imgs, nb = _batched(model, sub, sc, tg, channels, pp, config)
            bar.update(1)
        else:
            if image_source:
                s_img, stored, nb = _capture_image(model, sub, source, len(tg), channels, pp, config)
            else:
                s_img, stored, nb = _capture(model, sub, sc, channels, pp, config)
            bar.update(1)
            # A real-image capture stores one entry per pair; a text capture one per mask group.
            imgs = [s_img, *_inject(model, sub, tg, stored, channels, pp, config, per_pair=image_source)]
            bar.update(1)
        out.append(tuple(imgs))
        nbytes = {k: nbytes[k] + nb[k] for k in nbytes}
    bar.close()
    src, res = torch.cat([o[0] for o in out]), torch.cat([o[2] for o in out])
    tgt = torch.cat([o[1] for o in out]) if config.control else None
    metrics = transport_metrics(src, tgt, res, p, judge)
    meta = probe_meta(
        model, plan, source_prompts=sources, target_prompts=targets, mode=config.mode,
        alpha=config.alpha, k=config.k if config.channels is None else None,
        copy_norm_out=config.copy_norm_out, control=config.control,
        token_mask=_describe_mask(config.token_mask),
        source_image=None if not image_source else _describe(source),
        judge=judge is not None and judge_can_read(res),
        **nbytes,
    )
    mask = p[0] if bool((p == p[:1]).all()) else p
    return TransportResult(source=src, target=tgt, result=res, token_mask=mask,
                           channels=channels, metrics=metrics, meta=meta)


def _check_image_source(src: ImageSource) -> None:
    if isinstance(src.image, (str, Path)) and not Path(src.image).is_file():
        raise MassactError(f"image file {str(src.image)!r} does not exist; accepted: a PNG or JPEG file")
    if not isinstance(src.caption, str) or not src.caption.strip():
        raise MassactError("empty source caption; accepted: a non-empty --source-caption")


def _describe_mask(spec: Any) -> Any:
    if isinstance(spec, (list, tuple)):
        return [_describe_mask(s) for s in spec]
    return str(spec) if isinstance(spec, (str, Path)) else "given tensor"


def _describe(src: ImageSource) -> dict:
    img = src.image if isinstance(src.image, (str, Path)) else type(src.image).__name__
    return {"image": str(img), "caption": src.caption, "posterior": src.posterior}


def _channels(plan: Plan, stats: Any, config: TransportConfig) -> dict[str, torch.Tensor]:
    if config.channels is not None:
        missing = [s.module for s in plan.sites if s.module not in config.channels]
        if missing:
            raise MassactError(f"no channels given for sites {missing}; accepted: a channel list "
                               f"for each of {[s.module for s in plan.sites]}")
        return {s.module: channel_ids(config.channels[s.module], s.channels, f"site {s.module}")
                for s in plan.sites}
    if stats is None:
        raise MassactError("no channel mask: pass a statistics run (--stats DIR) or channels per site")
    return channel_sets(load_stats(stats), plan.sites, "top", config.k)


def _generate(model: Any, plan: Plan, prompts: list[str], n: int, copies: int, body: Any) -> torch.Tensor:
    """One generation of ``copies`` copies of ``n`` pairs' rows, ``body(call)`` at every call.

    Row ``c * n + j`` belongs to pair j: its seed and its entries of per-pair lists.
    """
    rows = [j for _ in range(copies) for j in range(n)]
    kw = replace(plan, gen=per_prompt_rows(plan.gen, rows)).kwargs(len(prompts), 0, plan.device)
    kw["generator"] = _pair_gens(plan, n, copies, plan.device)
    with model.generate(prompts, **kw) as tracer:
        for i in tracer.iter[: len(plan.schedule)]:
            body(plan.schedule[i])
        res = tracer.result.save()
    return res[0].float().cpu()


def _pair_gens(plan: Plan, n: int, copies: int, device: Any) -> list[torch.Generator]:
    # Pair j gets seed + j in every copy (source, target, result): identical noise per pair.
    return [torch.Generator(device).manual_seed(plan.gen.seed + j) for _ in range(copies) for j in range(n)]


def _groups(plan: Plan, p: torch.Tensor, n: int, copies: int, src_copy: int | None, per_pair: bool,
            device: Any) -> list[dict]:
    """Per group of pairs sharing a token mask: its token ids and source/result rows (on device)."""
    out = []
    for pairs, tokens in mask_groups(p, per_pair):
        g = {"tokens": tokens.to(device),
             "res": group_rows(pairs, copies - 1, n, copies, plan.batched_cfg).to(device)}
        if src_copy is not None:
            g["src"] = group_rows(pairs, src_copy, n, copies, plan.batched_cfg).to(device)
        out.append(g)
    return out


def _per_site(model: Any, plan: Plan, channels: dict[str, torch.Tensor], copy_norm_out: bool,
              fn: Any, write: bool) -> Any:
    """A trace body running ``fn(h, module, channel_ids, call)`` at every site and active call.

    ``h`` is each site's image stream (and, with ``copy_norm_out``, ``norm_out``'s output over
    all its channels). With ``write``, what ``fn`` returns replaces the stream: a whole-output
    assignment of a new tensor (docs/nnsight-pitfalls.md, 6). Channel ids move to the device once.
    """
    device = plan.device
    chans = move_packed(channels, device)
    blocks = {s.module: model.transformer.get(s.module) for s in plan.sites}
    norm_out = model.transformer.norm_out if copy_norm_out else None  # not every family has one
    every: dict = {}  # norm_out's channel ids, built at its first call

    def body(call):
        if not plan.active(call):
            return
        for s in plan.sites:
            blk, lay = blocks[s.module], plan.layouts[s.module]
            out = blk.output
            new = fn(read_image(lay, out, plan.n_img, s.module), s.module, chans[s.module], call)
            if write:
                blk.output = write_image(lay, out, new, plan.n_img)
        if copy_norm_out:
            x = norm_out.output
            if "ids" not in every:
                every["ids"] = torch.arange(x.shape[-1], device=x.device)
            new = fn(x, "norm_out", every["ids"], call)
            if write:
                norm_out.output = new

    return body


def _batched(model, plan, sources, targets, channels, p, config):
    n = len(targets)
    copies = 3 if config.control else 2  # [sources; targets; results] or [sources; results]
    device = plan.device
    groups = _groups(plan, p, n, copies, 0, False, device)

    def edit(h: torch.Tensor, _module: str, ch: torch.Tensor, _call: Any) -> torch.Tensor:
        # Only the |p| x k entries of the result rows change, read from the source rows.
        new = h.clone()
        for g in groups:
            scatter_blend_(new, gather(h, g["tokens"], ch, g["src"]), g["tokens"], ch, config.alpha, g["res"])
        return new

    body = _per_site(model, plan, channels, config.copy_norm_out, edit, write=True)
    prompts = sources + targets * (copies - 1)
    images = _generate(model, plan, prompts, n, copies, body)
    target = images[n:2 * n] if config.control else None
    return images[:n], target, images[-n:], {"stored_bytes": 0, "full_bytes": 0}


def _capture(model, plan, sources, channels, p, config):
    n = len(sources)
    device = plan.device
    groups = _groups(plan, p, n, 1, 0, False, device)
    stored: dict = {}
    count = {"stored_bytes": 0, "full_bytes": 0}

    def keep(h: torch.Tensor, module: str, ch: torch.Tensor, call: Any) -> None:
        for gi, g in enumerate(groups):
            # Advanced indexing copies: what is kept is only [rows, |p|, k], never a view of h.
            x = gather(h, g["tokens"], ch, g["src"])
            stored[(call.index, module, gi)] = x
            count["stored_bytes"] += x.numel() * x.element_size()
        count["full_bytes"] += h.numel() * h.element_size()

    body = _per_site(model, plan, channels, config.copy_norm_out, keep, write=False)
    images = _generate(model, plan, list(sources), n, 1, body)
    return images, stored, count


def _inject(model, plan, targets, stored, channels, p, config, per_pair: bool):
    n = len(targets)
    copies = 2 if config.control else 1  # [targets; results] or [results]
    device = plan.device
    groups = _groups(plan, p, n, copies, None, per_pair, device)  # the capture's grouping

    def put(h: torch.Tensor, module: str, ch: torch.Tensor, call: Any) -> torch.Tensor:
        new = h.clone()
        for gi, g in enumerate(groups):
            scatter_blend_(new, stored[(call.index, module, gi)], g["tokens"], ch, config.alpha, g["res"])
        return new

    body = _per_site(model, plan, channels, config.copy_norm_out, put, write=True)
    images = _generate(model, plan, targets * copies, n, copies, body)
    return (images[:n] if config.control else None), images[-n:]


def _capture_image(model, plan, source: ImageSource, n, channels, p, config):
    from .transport_parts import capture_real_image

    return capture_real_image(model, plan, source, n, channels, p, config.copy_norm_out)


def save_transport(result: TransportResult, folder: str | Path) -> Path:
    """Save the result and its PNGs.

    ``source.png``, ``target.png``, ``result.png`` (pairs in a row) and ``mask.png`` (the token
    mask at image resolution); no ``target.png`` for a run without the control row.
    """
    from massact_nn.images import upsample_mask

    folder = Path(folder)
    # meta.json goes first and comes back last (with result.save): a save that dies midway
    # leaves no folder that reads as complete with the older run's images.
    (folder / "meta.json").unlink(missing_ok=True)
    pngs = {"source": result.source, "target": result.target, "result": result.result}
    write_pngs(folder, {k: v for k, v in pngs.items() if v is not None})
    if result.target is None:  # a folder reused from a run with the control must not keep its target
        (folder / "target.png").unlink(missing_ok=True)
    h, w = result.result.shape[-2:]
    masks = result.token_mask if result.token_mask.ndim == 3 else result.token_mask[None]
    pix = torch.stack([upsample_mask(m, (h, w)) for m in masks]).float()
    write_pngs(folder, {"mask": pix[:, None].expand(-1, 3, -1, -1)})
    result.save(folder)
    return folder
