"""Rectified-flow training of the toy Flux on the shapes world, resumable, time-budgeted.

Conventions match what ``FluxPipeline.__call__`` feeds the transformer at inference:
latents are ``(vae.encode(x).mode() - shift_factor) * scaling_factor``, packed 2x2 with
``FluxPipeline._pack_latents``; ``img_ids`` come from ``FluxPipeline._prepare_latent_image_ids``
on the 16x16 token grid and ``txt_ids`` are zeros; ``x_t = (1 - t) x0 + t eps`` with the
timestep passed as ``t`` in [0, 1] (the pipeline passes ``sigma * 1000 / 1000``; the
transformer multiplies by 1000 itself), and the target is the velocity ``eps - x0``.

Layout of ``out_dir``:
    ``pipeline/``   a complete FluxPipeline folder; its transformer holds the EMA weights of
                    the latest checkpoint (what evaluate/export read).
    ``state.pt``    raw + EMA weights, optimizer, step, elapsed seconds, RNG states.
    ``train.log``   one line per log interval.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from tqdm import tqdm

from massact_nn import world as W
from massact_nn.errors import MassactError

from . import build

STATE_FILE = "state.pt"
PIPELINE_DIR = "pipeline"


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults: the small-wide recipe of the design notes)."""

    minutes: float = 110.0
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    ema: float = 0.998
    warmup_steps: int = 200
    cooldown_frac: float = 0.12  # final linear LR decay, as a fraction of the time budget
    caption_dropout: float = 0.1  # empty captions: keeps true-CFG available at inference
    # Shift of the logit-normal t towards noise, t' = s t / (1 + (s - 1) t): colours and shape
    # are decided at high noise, which plain logit-normal (s = 1) rarely samples.
    t_shift: float = 3.0
    checkpoint_minutes: float = 4.0
    log_every: int = 50
    vae_seconds: float = 120.0
    transformer_overrides: dict[str, Any] | None = None


RESUMABLE_KEYS = ("minutes", "checkpoint_minutes", "log_every")
"""Config keys a resume may change: the budget and the bookkeeping cadence, never the model."""


def check_minutes(minutes: Any, name: str = "minutes") -> float:
    """``minutes`` as a float, refusing anything but a finite number > 0.

    Raises:
        MassactError: naming the value, for a non-number, NaN, infinity, zero or a negative.
    """
    try:
        if isinstance(minutes, bool):
            raise TypeError
        value = float(minutes)
    except (TypeError, ValueError):
        raise MassactError(f"{name}={minutes!r} is not a number; accepted: a finite number of "
                           "minutes > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise MassactError(f"{name}={minutes!r} is out of range; accepted: a finite number of "
                           "minutes > 0")
    return value


def _comparable(value: Any) -> Any:
    """A config value with tuples as lists, so saved and requested values compare as JSON."""
    return json.loads(json.dumps(value))


def _config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """``key: saved vs requested`` for every config entry a resume must not change.

    ``transformer_overrides`` compare as the transformer config they produce (``None``, ``{}``
    and overrides equal to the defaults are the same model), entry by entry.
    """
    now = asdict(cfg)
    diffs = []
    for key in now:
        if key in RESUMABLE_KEYS:
            continue
        if key == "transformer_overrides":
            a = _comparable({**build.TRANSFORMER_CONFIG, **(saved.get(key) or {})})
            b = _comparable({**build.TRANSFORMER_CONFIG, **(now[key] or {})})
            diffs += [f"transformer_overrides[{k!r}]: saved {a.get(k)!r}, requested {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key not in saved:
            diffs.append(f"{key}: not saved, requested {now[key]!r}")
        elif _comparable(saved[key]) != _comparable(now[key]):
            diffs.append(f"{key}: saved {saved[key]!r}, requested {now[key]!r}")
    return diffs


def _repair_transformer(out: Path) -> None:
    """Finish a checkpoint swap a kill interrupted: put ``transformer.old`` back in place.

    The swap moves ``transformer`` to ``transformer.old`` before moving the new folder in; a
    kill between the two leaves ``transformer`` missing. The old folder is complete (the
    weights themselves come from ``state.pt`` on resume and the next checkpoint rewrites it).
    """
    target = out / PIPELINE_DIR / "transformer"
    old = target.with_name("transformer.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    if target.exists():
        shutil.rmtree(target.with_name("transformer.tmp"), ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def lr_factor(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Warm-up by step, constant, then linear to zero over the last ``cooldown_frac`` of time."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    budget = cfg.minutes * 60.0
    cool_start = budget * (1.0 - cfg.cooldown_frac)
    if elapsed <= cool_start:
        return warm
    return warm * max(0.0, (budget - elapsed) / max(1e-9, budget - cool_start))


class CaptionCache:
    """Text embeddings of every world caption (and the empty one), computed once.

    The encoders are frozen, so the pipeline's own ``encode_prompt`` output is exact.
    """

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int) -> None:
        self.captions = ["", *W.all_captions()]
        self.index = {c: i for i, c in enumerate(self.captions)}
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                self.captions, prompt_2=None, max_sequence_length=max_sequence_length
            )
        self.embeds, self.pooled = embeds, pooled  # [N, L, D_t5], [N, D_clip]

    def lookup(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings for a batch. Shapes: ([B, L, D_t5], [B, D_clip])."""
        idx = torch.tensor([self.index[c] for c in captions])
        return self.embeds[idx], self.pooled[idx]


def encode_images(pipe: FluxPipeline, images: torch.Tensor) -> torch.Tensor:
    """World images to packed, normalised latents.

    Shapes: images [B, 3, H, W] in [-1, 1] -> [B, (H/2)*(W/2), 4*C].
    """
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def flow_loss(
    transformer: FluxTransformer2DModel,
    x0: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    img_ids: torch.Tensor,
    gen: torch.Generator,
    t_shift: float = 1.0,
) -> torch.Tensor:
    """Rectified-flow MSE with (shifted) logit-normal t.

    Shapes: x0 [B, N, C]; embeds [B, L, D]; pooled [B, P]; img_ids [N, 3].
    """
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=gen))
    t = t_shift * t / (1.0 + (t_shift - 1.0) * t)
    eps = torch.randn(x0.shape, generator=gen)
    tt = t[:, None, None]
    x_t = (1.0 - tt) * x0 + tt * eps
    txt_ids = torch.zeros(embeds.shape[1], 3)
    pred = transformer(
        hidden_states=x_t,
        timestep=t,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred, eps - x0)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_transformer(ema: FluxTransformer2DModel, out: Path) -> None:
    """Swap the pipeline's transformer folder for the EMA weights, never leaving it missing."""
    target = out / PIPELINE_DIR / "transformer"
    tmp, old = target.with_name("transformer.tmp"), target.with_name("transformer.old")
    shutil.rmtree(tmp, ignore_errors=True)
    ema.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def train(
    out_dir: str | Path,
    minutes: float = 110.0,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train (or resume) the toy model for a wall-clock budget of ``minutes``.

    Args:
        out_dir: run folder (created); see the module docstring for its layout.
        minutes: total training time budget, counted across resumes; the LR cooldown
            occupies its final ``cooldown_frac``.
        seed: seed of the world stream, noise, and every initialisation.
        resume: continue from ``out_dir/state.pt`` when it exists (a folder with only
            ``pipeline/``, a run stopped before its first checkpoint, starts over). The run must
            be resumed with its own configuration: only the keys in :data:`RESUMABLE_KEYS`
            (the budget, the checkpoint and log cadence) may change. ``False``: a new run,
            which needs a folder that holds no run (no ``state.pt``, no ``pipeline/``).
        progress: show a tqdm bar.
        **overrides: other :class:`TrainConfig` fields.

    Returns:
        Summary: steps, elapsed seconds, last smoothed loss.

    Raises:
        MassactError: before any work, for a budget that is not a finite number > 0, an
            unknown option, a new run into a folder that holds one, a resume with another
            configuration, or a run folder that cannot be resumed (``state.pt`` without a
            complete ``pipeline/``). An interrupted checkpoint swap (``transformer.old`` left
            in place of ``transformer``) is repaired on resume.
    """
    minutes = check_minutes(minutes)
    fields = [f for f in TrainConfig.__dataclass_fields__ if f not in ("minutes", "seed")]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise MassactError(f"unknown training option(s) {', '.join(unknown)}; accepted: "
                           f"{', '.join(fields)}")
    cfg = TrainConfig(minutes=minutes, seed=seed, **overrides)
    out = Path(out_dir)
    state_path, pipe_dir = out / STATE_FILE, out / PIPELINE_DIR
    held = [name for name, p in ((STATE_FILE, state_path), (PIPELINE_DIR + "/", pipe_dir)) if p.exists()]
    if held and not resume:
        raise MassactError(
            f"{str(out)!r} already holds a toy run ({', '.join(held)}); accepted: resume=True "
            "(CLI: --resume) to continue it, or a new or empty folder for a new run"
        )
    state = None
    if resume and state_path.exists():
        if not pipe_dir.is_dir():
            raise MassactError(
                f"{str(out)!r} holds {STATE_FILE} but no {PIPELINE_DIR}/ (its VAE and text encoders): "
                "the run cannot be resumed; accepted: a run folder with both, or a new or empty "
                "folder for a new run"
            )
        state = torch.load(state_path, weights_only=False)
        diffs = _config_differences(state.get("config") or {}, cfg)
        if diffs:
            raise MassactError(
                f"cannot resume {str(out)!r} with another configuration ({'; '.join(diffs)}); "
                f"accepted: the saved run's values (only {', '.join(RESUMABLE_KEYS)} may change), "
                "or a new folder for a new run"
            )
        _repair_transformer(out)
        if not (pipe_dir / "transformer" / "config.json").is_file():
            raise MassactError(
                f"{str(pipe_dir / 'transformer')!r} is missing or incomplete (no transformer.old "
                "to restore it "
                "from): the run cannot be resumed; accepted: a run folder whose pipeline/ is "
                "complete, or a new or empty folder for a new run"
            )
        built = json.loads((pipe_dir / "transformer" / "config.json").read_text())
        wanted = _comparable({**build.TRANSFORMER_CONFIG, **(cfg.transformer_overrides or {})})
        diffs = [f"{k}: {str(pipe_dir)!r} has {built.get(k)!r}, requested {v!r}"
                 for k, v in wanted.items() if _comparable(built.get(k)) != v]
        if diffs:
            raise MassactError(
                f"cannot resume {str(out)!r}: its transformer is not the configured one "
                f"({'; '.join(diffs)}); accepted: transformer_overrides matching the saved "
                "transformer, or a new folder for a new run"
            )
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a", buffering=1)  # noqa: SIM115 - lives for the run

    def log(msg: str) -> None:
        logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    if state is None:
        log(f"new run: {json.dumps(asdict(cfg))}")
        pipe = build.build_base(seed, vae_seconds=cfg.vae_seconds, log=log)
        if cfg.transformer_overrides:
            pipe.transformer = build.build_transformer(seed, **cfg.transformer_overrides)
        build.save_pipeline(pipe, pipe_dir, {"train": asdict(cfg)})
    else:
        pipe = FluxPipeline.from_pretrained(pipe_dir)
        done = f"{state['step']} ({state['elapsed'] / 60:.1f} min)"
        log(f"resume at step {done}: {json.dumps(asdict(cfg))}")
    model = pipe.transformer
    model.train()
    ema = FluxTransformer2DModel.from_config(model.config)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas
    )
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        rng.bit_generator.state = state["np_rng"]
        gen.set_state(state["torch_rng"])
        ema.load_state_dict(state["ema"])
    else:
        ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)

    cache = CaptionCache(pipe, build.MAX_SEQUENCE_LENGTH)
    world = W.World(seed)
    grid = W.SIZE // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, grid, grid, "cpu", torch.float32)
    budget = cfg.minutes * 60.0
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())

    def checkpoint() -> None:
        _atomic_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "np_rng": rng.bit_generator.state,
                "torch_rng": gen.get_state(),
                "config": asdict(cfg),
            },
            state_path,
        )
        _write_transformer(ema, out)
        log(f"checkpoint step {step} elapsed {elapsed / 60:.1f} min")

    bar = tqdm(total=round(budget), initial=round(min(elapsed, budget)), unit="s",
               disable=not progress, desc="toy flux")
    smooth, last_ckpt = float("nan"), elapsed
    while elapsed < budget:
        t0 = time.time()
        batch = world.sample(cfg.batch_size, rng)
        captions = [
            "" if rng.random() < cfg.caption_dropout else c for c in batch.captions
        ]
        x0 = encode_images(pipe, torch.from_numpy(batch.images))
        embeds, pooled = cache.lookup(captions)
        factor = lr_factor(step, elapsed, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * factor
        loss = flow_loss(model, x0, embeds, pooled, img_ids, gen, cfg.t_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - cfg.ema)
        step += 1
        val = loss.item()
        if not math.isfinite(val):
            log(f"non-finite loss at step {step}; stopping without checkpoint")
            raise FloatingPointError(f"loss {val} at step {step}")
        smooth = val if math.isnan(smooth) else 0.98 * smooth + 0.02 * val
        dt = time.time() - t0
        elapsed += dt
        bar.update(round(elapsed) - bar.n)
        if step % cfg.log_every == 0:
            log(f"step {step} loss {smooth:.4f} lr {cfg.lr * factor:.2e} "
                f"elapsed {elapsed / 60:.2f} min {1.0 / max(dt, 1e-9):.2f} it/s")
            bar.set_postfix(step=step, loss=f"{smooth:.4f}")
        if elapsed - last_ckpt >= cfg.checkpoint_minutes * 60.0:
            checkpoint()
            last_ckpt = elapsed
    checkpoint()
    bar.close()
    log(f"done: {step} steps, {elapsed / 60:.1f} min, loss {smooth:.4f}")
    logf.close()
    return {"steps": step, "elapsed": elapsed, "loss": smooth}
