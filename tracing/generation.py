"""How one generation is run: pipeline arguments, seeds, and the transformer-call schedule."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from massact_nn.errors import MassactError, check_positive_int
from massact_nn.stats import PER_PROMPT

from .adapters import Adapter
from .adapters.base import call_arg, call_parameters


@dataclass
class GenerationConfig:
    """Settings of the trajectories a probe or a statistics run generates.

    Attributes:
        steps: Denoising steps (always passed: nnsight's traced default is 1). ``None``: the
            model folder's default, else the pipeline's own ``num_inference_steps`` default.
        seed: The i-th prompt gets ``torch.Generator(device).manual_seed(seed + i)``.
        height: Image height in pixels (``None``: the model folder's or pipeline's default).
        width: Image width in pixels.
        guidance_scale: Passed to the pipeline when set.
        batch_size: Prompts per pipeline call.
        extra: Any further pipeline keyword arguments (``negative_prompt``, ``true_cfg_scale``,
            ``max_sequence_length``, ...).
    """

    steps: int | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 8
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """Plain-JSON form for run metadata."""
        return asdict(self)


def folder_defaults(model: Any) -> dict:
    """Call defaults a model folder declares in ``massact.json`` or ``massact_toy.json``."""
    pipe = getattr(model, "pipeline", model)
    name = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if not name:
        return {}
    for fname in ("massact.json", "massact_toy.json"):
        p = os.path.join(str(name), fname)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            # Parsed once per file version (~0.1 ms a run before the first call otherwise). A
            # file changed within the clock's granularity of its last change could keep its
            # stamp, so a file younger than 2 s is read afresh (git's "racy" rule).
            version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < 2_000_000_000:
                return _parse_defaults(p)
            return copy.deepcopy(_cached_defaults(p, version))
    return {}


def _parse_defaults(path: str) -> dict:
    d = json.loads(Path(path).read_text())
    return dict(d.get("call_defaults", d.get("call", d)))


@functools.lru_cache(maxsize=32)
def _cached_defaults(path: str, version: tuple) -> dict:
    return _parse_defaults(path)


def resolve(config: GenerationConfig, model: Any, adapter: Adapter) -> GenerationConfig:
    """Fill unset sizes from the model folder or pipeline defaults and check them.

    Raises:
        MassactError: for steps or batch_size < 1, or a height/width the model cannot take.
    """
    pipe = getattr(model, "pipeline", model)
    fd = folder_defaults(model)
    cfg = GenerationConfig(**{**asdict(config), "extra": dict(config.extra)})
    if cfg.steps is None:
        cfg.steps = fd.get("num_inference_steps", fd.get("steps"))
        cfg.steps = cfg.steps or _call_default(pipe, "num_inference_steps", 4)
    if cfg.steps < 1:
        raise MassactError(f"steps={cfg.steps!r} is out of range; accepted: an integer >= 1")
    cfg.batch_size = check_positive_int("batch_size", cfg.batch_size)
    for name in ("height", "width"):  # 0 must not read as "unset" and become the default size
        if getattr(cfg, name) is not None:
            setattr(cfg, name, check_positive_int(name, getattr(cfg, name)))
    default_px = None
    if hasattr(pipe, "default_sample_size") and hasattr(pipe, "vae_scale_factor"):
        default_px = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    cfg.height = cfg.height or fd.get("height") or default_px
    cfg.width = cfg.width or fd.get("width") or default_px
    if cfg.guidance_scale is None and "guidance_scale" in fd:
        cfg.guidance_scale = fd["guidance_scale"]
    if cfg.guidance_scale is not None and not math.isfinite(float(cfg.guidance_scale)):
        raise MassactError(f"guidance_scale={cfg.guidance_scale!r} is out of range; "
                           "accepted: a finite number")
    # Any other call default the folder declares (max_sequence_length, use_resolution_binning, ...)
    # goes to the pipeline when its __call__ takes it.
    takes = call_parameters(pipe) if fd else {}
    for key, value in fd.items():
        if key not in ("height", "width", "guidance_scale", "num_inference_steps", "steps") and key in takes:
            cfg.extra.setdefault(key, value)
    for key, value in adapter.call_defaults.items():
        cfg.extra.setdefault(key, value)
    if cfg.height is None or cfg.width is None:
        raise MassactError("height/width are unknown for this pipeline; pass --height and --width")
    unit = adapter_unit(pipe, adapter)
    if cfg.height < unit or cfg.width < unit or cfg.height % unit or cfg.width % unit:
        raise MassactError(
            f"height={cfg.height}, width={cfg.width} cannot be taken by this model; "
            f"accepted: positive multiples of {unit} pixels"
        )
    return cfg


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    param = call_parameters(pipe).get(name)
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return fallback
    return param.default


def adapter_unit(pipe: Any, adapter: Adapter) -> int:
    """Pixels per image token along one side (the size granularity the model accepts)."""
    big = 1 << 12
    rows, _ = adapter.grid(pipe, big, big)
    return max(big // max(rows, 1), 1)


def n_image_tokens(pipe: Any, adapter: Adapter, height: int, width: int) -> int:
    """Image tokens per sample at this size."""
    rows, cols = adapter.grid(pipe, height, width)
    return rows * cols


def as_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts, checked: a string is one prompt (diffusers' convention).

    A bare string is a ``Sequence[str]`` too; taken as such it would run one prompt per character.

    Raises:
        MassactError: for no prompts, or one that is not a non-empty string (naming it).
    """
    out = [prompts] if isinstance(prompts, str) else list(prompts)
    if not out:
        raise MassactError("no prompts given; accepted: one or more --prompt or a --prompts-file")
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise MassactError(f"prompt {i} is {p!r}; accepted: non-empty strings")
    return out




def pipeline_kwargs(
    cfg: GenerationConfig, prompts: Sequence[str], first_index: int, device: torch.device | str,
    total: int | None = None,
) -> dict:
    """Keyword arguments of one pipeline call over a batch of prompts.

    The batch starts at index ``first_index`` of the whole prompt list, so prompt i always gets
    seed ``seed + i`` whatever the batch size. Per-prompt lists in ``cfg.extra`` (a negative
    prompt per prompt, ...) of the whole list's length (``total``) are cut to the batch alike.

    Raises:
        MassactError: for a per-prompt list that fits neither the whole list nor the batch (it
            would pair prompts with the wrong entries, or fail inside the pipeline).
    """
    n = len(prompts)
    gens = [torch.Generator(device).manual_seed(cfg.seed + first_index + i) for i in range(n)]
    kw = dict(
        num_inference_steps=cfg.steps, height=cfg.height, width=cfg.width, generator=gens, **cfg.extra
    )
    for key in PER_PROMPT:
        v = kw.get(key)
        if not isinstance(v, (list, tuple)):
            continue
        if total is not None and len(v) == total:
            kw[key] = list(v[first_index:first_index + n])
        elif len(v) != n:
            raise MassactError(f"{key} has {len(v)} entries for {total if total is not None else n} "
                               f"prompts; accepted: one string for every prompt, or one per prompt")
    if cfg.guidance_scale is not None:
        kw["guidance_scale"] = cfg.guidance_scale
    return kw


def check_per_prompt(cfg: GenerationConfig, n: int, what: str = "prompts") -> None:
    """Raise unless each per-prompt list in ``cfg.extra`` has one entry for each of ``n``.

    Raises:
        MassactError: naming the list, its length and the count accepted.
    """
    for key in PER_PROMPT:
        v = cfg.extra.get(key)
        if isinstance(v, (list, tuple)) and len(v) != n:
            raise MassactError(f"{key} has {len(v)} entries for {n} {what}; accepted: one string for "
                               f"every {what[:-1]}, or one per {what[:-1]}")


def per_prompt_rows(cfg: GenerationConfig, index: Sequence[int]) -> GenerationConfig:
    """``cfg`` with each per-prompt list re-indexed: row r of a batch gets entry ``index[r]``.

    For batches whose rows are not the prompts one to one: a probe's structural check on the
    first prompt (``[0]``), or transport's copies of each pair (source, target, result).
    """
    extra = dict(cfg.extra)
    for key in PER_PROMPT:
        v = extra.get(key)
        if isinstance(v, (list, tuple)):
            if not v:
                raise MassactError(f"{key} is an empty list; accepted: one string, or one per prompt")
            extra[key] = [v[i] for i in index]
    return replace(cfg, extra=extra)


def guidance_meta(pipe: Any, kwargs: dict, calls_per_step: int, batched_cfg: bool,
                  adapter: Adapter | None = None) -> dict:
    """How guidance really ran, for a run's metadata.

    The scales the pipeline used (its own defaults where the call left them out; ``None`` for a
    ``guidance_scale`` the pipeline ignores, per ``adapter.scale_ignored``) and the structure:
    ``none``, ``batched [uncond; cond]`` or ``two calls per step (cond, then uncond)``.
    """
    if calls_per_step == 2:
        how = "two calls per step (cond, then uncond)"
    else:
        how = "batched [uncond; cond]" if batched_cfg else "none"
    ignored = adapter is not None and adapter.scale_ignored(pipe, kwargs)
    return {"guidance_scale_used": None if ignored else call_arg(pipe, kwargs, "guidance_scale"),
            "guidance_scale_ignored": ignored,
            "true_cfg_scale_used": call_arg(pipe, kwargs, "true_cfg_scale"), "guidance": how}


@dataclass(frozen=True)
class Call:
    """One transformer call of a generation: its index, denoising step and branch."""

    index: int
    step: int
    conditional: bool


def call_schedule(steps: int, calls_per_step: int) -> list[Call]:
    """Transformer calls in order; with two calls per step the conditional one comes first."""
    return [Call(i, i // calls_per_step, i % calls_per_step == 0) for i in range(steps * calls_per_step)]


def batches(items: Sequence[str], size: int) -> Iterator[tuple[int, list[str]]]:
    """``(first_index, chunk)`` pairs of consecutive chunks."""
    if size < 1:
        raise MassactError(f"batch_size={size!r} is out of range; accepted: an integer >= 1")
    for i in range(0, len(items), size):
        yield i, list(items[i : i + size])
