"""Real images as a source of activations: encode, noise to t, run the transformer at t.

The latent path follows diffusers' own img2img pipelines exactly, using the pipeline's own
pieces: ``image_processor.preprocess`` (to [-1, 1]), ``vae.encode`` then
``(z - shift_factor) * scaling_factor`` (``FluxImg2ImgPipeline._encode_vae_image``), Gaussian
noise drawn with ``randn_tensor`` on the unpacked latent shape, the rectified-flow forward
process ``x_t = t ε + (1 − t) x_0`` (``FlowMatchEulerDiscreteScheduler.scale_noise``), and the
pipeline's ``_pack_latents``. With ``posterior="sample"`` and one generator the encoder sample
and the noise are drawn in img2img's order, so the transformer input is bit-identical to what
``FluxImg2ImgPipeline`` feeds at the same t.

The transformer is run by the pipeline itself inside an nnsight trace (so the caption goes
through the pipeline's ``encode_prompt`` and every site can be read or written the usual way):
one denoising step on the given packed latents, with the transformer's ``timestep`` input
replaced by t. One row per t: a batch of noise levels costs one transformer call.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from massact_nn.errors import MassactError, channel_ids, choice_error
from massact_nn.images import open_image, upright
from massact_nn.sites import Site, resolve_sites

from ..adapters import read_image
from ..generation import GenerationConfig, n_image_tokens, per_prompt_rows, pipeline_kwargs, resolve
from ..model import model_adapter, transformer_device
from ..sites import sites_of

POSTERIOR = ("mode", "sample")


#: Families whose latent path (VAE scaling, 2x2 packing, img_ids, timestep convention) this module
#: reproduces and tests against the family's own img2img pipeline.
SUPPORTED_FAMILIES = ("flux",)


def check_supported(family: str) -> None:
    """Raise a clear error for a family whose real-image path is not implemented."""
    if family not in SUPPORTED_FAMILIES:
        raise MassactError(
            f"real-image inputs are not supported for the {family!r} family yet; accepted: "
            f"{', '.join(SUPPORTED_FAMILIES)} (generated trajectories work for every family)"
        )


def _pipe(model: Any) -> Any:
    return getattr(model, "pipeline", model)


def load_image(path: str | Path) -> Any:
    """Open an image file as an RGB PIL image.

    Raises:
        MassactError: for a missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise MassactError(f"image file {str(path)!r} does not exist; accepted: a PNG or JPEG file")
    with open_image(p) as img:
        return upright(img).convert("RGB")


def image_tensor(model: Any, image: Any, height: int, width: int) -> torch.Tensor:
    """An image (path, PIL, ``[3,H,W]``/``[B,3,H,W]`` tensor or array in [-1, 1]) as the VAE's input.

    Paths and PIL images go through the pipeline's ``image_processor.preprocess`` (resize and
    map [0, 1] to [-1, 1]); tensors and arrays are taken as already in [-1, 1] and must have
    the requested size.

    Shapes:
        -> [B, 3, height, width] in [-1, 1].
    """
    pipe = _pipe(model)
    if isinstance(image, (str, Path)):
        image = load_image(image)  # upright RGB already
    elif hasattr(image, "convert"):  # PIL: RGBA, grey or palette images have no 3 channels yet
        image = upright(image).convert("RGB")
    if isinstance(image, (torch.Tensor, np.ndarray)):
        given = torch.as_tensor(image)
        t = given[None] if given.ndim == 3 else given
        if t.ndim != 4 or t.shape[1] != 3 or tuple(t.shape[2:]) != (height, width):
            raise MassactError(
                f"image has shape {tuple(given.shape)}; accepted: [3, {height}, {width}] or "
                f"[B, 3, {height}, {width}] in [-1, 1]"
            )
        if not t.is_floating_point():
            raise MassactError(f"image tensor has dtype {str(given.dtype).replace('torch.', '')} "
                               "(0..255 pixels?); accepted: a float tensor in [-1, 1], or a PIL image")
        t = t.float()
        lo, hi = float(t.min()), float(t.max())
        if not (-1.0 - 1e-3 <= lo and hi <= 1.0 + 1e-3):  # NaN fails too
            raise MassactError(f"image tensor values span [{lo:g}, {hi:g}]; accepted: [-1, 1] "
                               "(map [0, 1] images with 2 * x - 1)")
        if lo >= 0.0 and hi - lo > 0.05:
            # Legal, but the mark of a [0, 1] image (diffusers' img2img reads those as [0, 1]).
            warnings.warn(f"image tensor values span [{lo:g}, {hi:g}], none negative: they are read "
                          "as [-1, 1]; if the image is in [0, 1], pass 2 * x - 1", stacklevel=2)
        return t
    return pipe.image_processor.preprocess(image, height=height, width=width)


def encode_image(
    model: Any, image: torch.Tensor, generator: torch.Generator | None = None, posterior: str = "mode"
) -> torch.Tensor:
    """VAE latents scaled as the pipeline's own latent path does.

    Args:
        model: An nnsight ``DiffusionModel`` or a diffusers pipeline.
        image: VAE input in [-1, 1].
        generator: Used when ``posterior="sample"``.
        posterior: ``mode`` (deterministic) or ``sample`` (img2img's default).

    Shapes:
        image: [B, 3, H, W] -> [B, latent_channels, H / f, W / f].
    """
    return _from_posterior(model, _posterior_of(model, image), generator, posterior)


def _posterior_of(model: Any, image: torch.Tensor) -> Any:
    vae = _pipe(model).vae
    with torch.no_grad():
        return vae.encode(image.to(vae.device, vae.dtype)).latent_dist


def _from_posterior(model: Any, dist: Any, generator: torch.Generator | None, posterior: str) -> torch.Tensor:
    if posterior not in POSTERIOR:
        raise choice_error("posterior", posterior, POSTERIOR)
    vae = _pipe(model).vae
    z = dist.mode() if posterior == "mode" else dist.sample(generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def decode_latents(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_image` (the pipeline's final decode, without postprocessing).

    Shapes:
        latents: [B, C, h, w] -> [B, 3, h * f, w * f] (about [-1, 1]).
    """
    vae = _pipe(model).vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]


def pack(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's ``_pack_latents``.

    Shapes:
        latents: [B, C, h, w] -> [B, (h/2)(w/2), 4C].
    """
    b, c, h, w = latents.shape
    return _pipe(model)._pack_latents(latents, b, c, h, w)


def unpack(model: Any, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pipeline's ``_unpack_latents`` (``height``/``width`` in pixels).

    Shapes:
        packed: [B, N, 4C] -> [B, C, h, w].
    """
    pipe = _pipe(model)
    return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)


def noise_to(x0: torch.Tensor, t: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward process ``x_t = t ε + (1 − t) x_0`` (t per row or scalar).

    Computed as ``scale_noise`` does, so ``t = 0`` returns ``x0`` exactly.

    Shapes:
        x0, noise: [B, ...]; t: scalar or [B] -> [B, ...].
    """
    sigma = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).flatten()
    if sigma.numel() not in (1, x0.shape[0]):
        raise MassactError(f"{sigma.numel()} noise levels for {x0.shape[0]} rows; accepted: 1 or one per row")
    if not ((sigma >= 0) & (sigma <= 1)).all():  # NaN fails both comparisons
        raise MassactError(f"t={sigma.tolist()} is out of range; accepted: 0 <= t <= 1")
    sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return sigma * noise + (1.0 - sigma) * x0


def _t_list(t_values: Sequence[float]) -> list[float]:
    """The noise levels as floats, checked before any cast to the model's dtype.

    (In bf16, t = 1.002 would round to 1.0 and pass.)
    """
    try:
        if isinstance(t_values, (str, bytes)):
            raise TypeError
        items = list(t_values)
    except TypeError:  # a bare number, a 0-d tensor
        raise MassactError(f"t_values={t_values!r} is not a list; accepted: a list of t in [0, 1], "
                           "e.g. [0.5]") from None
    out = []
    for t in items:
        try:
            if isinstance(t, bool):  # True would read as t = 1
                raise TypeError
            f = float(t)
        except (TypeError, ValueError):
            raise MassactError(f"t={t!r} is not a number; accepted: 0 <= t <= 1") from None
        if not 0.0 <= f <= 1.0:  # NaN fails too
            raise MassactError(f"t={t!r} is out of range; accepted: 0 <= t <= 1")
        out.append(f)
    if not out:
        raise MassactError("no noise levels given; accepted: one or more t in [0, 1]")
    return out


@dataclass
class NoisedImage:
    """A real image's packed latents, clean and noised to each t.

    Attributes:
        clean: Packed clean latents x_0 (one row, repeated per t). Shapes: [T, N, D].
        noisy: Packed x_t, row i at ``t_values[i]``. Shapes: [T, N, D].
        t_values: The noise levels.
        image: The VAE input. Shapes: [1, 3, H, W] in [-1, 1].
    """

    clean: torch.Tensor
    noisy: torch.Tensor
    t_values: list[float]
    image: torch.Tensor


def noised_image(
    model: Any, image: Any, t_values: Sequence[float], height: int, width: int,
    seed: int = 0, posterior: str = "mode", noise_first: bool = False,
) -> NoisedImage:
    """Encode one image and noise it to each t with the same seeded noise.

    One generator, ``torch.Generator(device).manual_seed(seed)``, draws the posterior sample
    (``posterior="sample"``) and the noise. By default the sample comes first, in img2img's
    order. With ``noise_first`` the noise is the generator's first draw, so it is the noise a
    generation with that seed starts from (image-conditioned transport shares it with the
    target); the sample is drawn after it.
    """
    ts = _t_list(t_values)
    pipe = _pipe(model)
    img = image_tensor(model, image, height, width)
    if img.shape[0] != 1:
        raise MassactError(f"got {img.shape[0]} images; accepted: one image per call")
    device = transformer_device(pipe)
    dtype = pipe.transformer.dtype
    gen = torch.Generator(device).manual_seed(int(seed))
    from diffusers.utils.torch_utils import randn_tensor

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return randn_tensor(shape, generator=gen, device=device, dtype=dtype)

    if posterior not in POSTERIOR:
        raise choice_error("posterior", posterior, POSTERIOR)
    dist = _posterior_of(model, img)
    eps = noise(tuple(dist.mode().shape)) if noise_first else None
    x0 = _from_posterior(model, dist, gen, posterior).to(device, dtype)
    if eps is None:
        eps = noise(tuple(x0.shape))
    n = len(ts)
    xt = noise_to(x0.expand(n, *x0.shape[1:]), torch.tensor(ts), eps.expand(n, *eps.shape[1:]))
    return NoisedImage(pack(model, x0.expand(n, *x0.shape[1:])), pack(model, xt), ts, img)


def trajectory_t_values(model: Any, generation: GenerationConfig, prompt: str = "t") -> list[float]:
    """The t (sigma) the pipeline feeds its transformer at each step of a generation.

    Read from a trace of the pipeline itself (so any scheduler shift is included), with the
    transformer skipped (its output replaced by zeros), which makes this cheap.
    """
    adapter = model_adapter(model)
    gen = resolve(generation, model, adapter)
    pipe = _pipe(model)
    # Only the schedule is read: the first entry of any per-prompt list stands for all.
    kw = pipeline_kwargs(per_prompt_rows(gen, [0]), [prompt], 0, transformer_device(pipe))
    per_step = adapter.calls_per_step(pipe, kw)
    out: list[float] = []
    with model.generate([prompt], output_type="latent", **kw) as tracer:
        for i in tracer.iter[: gen.steps * per_step]:
            _, kwargs = model.transformer.inputs
            if i % per_step == 0:
                out.append(float(kwargs["timestep"].flatten()[0]))
            model.transformer.skip((torch.zeros_like(kwargs["hidden_states"]),))
    return out


@dataclass
class RealActivations:
    """Image-stream tokens of one real image noised to several t.

    Attributes:
        tokens: Per site module: tokens on the requested channels, row i at ``t_values[i]``.
            Shapes: [T, N, c] each (c = all channels when none were requested).
        channels: Per site module: the channel ids kept (``None``: all). Shapes: [c].
        noised: The latents fed to the transformer.
    """

    tokens: dict[str, torch.Tensor]
    channels: dict[str, torch.Tensor | None]
    noised: NoisedImage


def real_image_activations(
    model: Any,
    image: Any,
    caption: str,
    t_values: Sequence[float],
    sites: Sequence[str | int] | None = None,
    channels: dict[str, torch.Tensor] | None = None,
    generation: GenerationConfig | None = None,
    seed: int = 0,
    posterior: str = "mode",
    noise_first: bool = False,
) -> RealActivations:
    """Run the transformer on a real image noised to each t, with its caption; read sites.

    For image-conditioned transport, pass the target trajectory's t per step (from
    :func:`trajectory_t_values`): row i of every returned tensor is then the source's value
    at target step i.

    Args:
        model: An nnsight ``DiffusionModel``.
        image: Path, PIL image, or a [1, 3, H, W] tensor in [-1, 1].
        caption: Text the transformer is conditioned on.
        t_values: Noise levels in [0, 1].
        sites: Module paths or layer indices (``None``: all).
        channels: Per module path, channel ids to keep (indexed on the device, so only these
            cross to the host); sites absent from the dict keep every channel.
        generation: Size, pipeline extras (``height``/``width`` default to the model's) and
            ``batch_size``: noise levels per transformer call.
        seed: Seed of the noise (and of the posterior sample).
        posterior: ``mode`` or ``sample`` (see :func:`encode_image`).
        noise_first: Draw the noise before the posterior sample: the noise is then the one a
            generation with ``seed`` starts from (see :func:`noised_image`).
    """
    if not isinstance(caption, str) or not caption.strip():
        raise MassactError("empty caption; accepted: a non-empty text")
    adapter = model_adapter(model)
    check_supported(adapter.name)
    gen = resolve(generation or GenerationConfig(steps=1), model, adapter)
    pipe = _pipe(model)
    chosen = resolve_sites(sites_of(model), sites)
    channels = _checked_channels(channels, chosen)
    noised = noised_image(model, image, t_values, gen.height, gen.width, seed, posterior, noise_first)
    n = len(noised.t_values)
    # The pipeline feeds t_scheduler / 1000 with t_scheduler = sigma * 1000; mirror that rounding.
    t_feed = (torch.tensor(noised.t_values, dtype=torch.float32) * 1000).to(noised.noisy.dtype) / 1000
    # One caption for every row: per-prompt lists (a negative prompt per pair) take their first
    # entry; a caller with one entry per pair passes that pair's generation config.
    kw = {k: v for k, v in pipeline_kwargs(per_prompt_rows(gen, [0]), [caption], 0,
                                           transformer_device(pipe)).items()
          if k not in ("generator", "num_inference_steps")}
    parts = []
    for a in range(0, n, gen.batch_size):  # generation.batch_size noise levels per call
        b = min(a + gen.batch_size, n)
        parts.append(_run_at_t(model, adapter, [caption] * (b - a), noised.noisy[a:b], t_feed[a:b],
                               chosen, channels or {}, kw))
    tokens = {m: torch.cat([p[m] for p in parts]) for m in parts[0]}
    keep = {s.module: (channels or {}).get(s.module) for s in chosen}
    return RealActivations(tokens=tokens, channels=keep, noised=noised)


def _checked_channels(channels: dict | None, chosen: list[Site]) -> dict[str, torch.Tensor] | None:
    """Integer ids in range per chosen site, checked once on the host before any trace."""
    if channels is None:
        return None
    width = {s.module: s.channels for s in chosen}
    unknown = [m for m in channels if m not in width]
    if unknown:
        raise MassactError(f"channels given for sites {unknown} that are not measured; accepted: "
                           f"{', '.join(width)}")
    return {m: channel_ids(torch.as_tensor(c).cpu(), width[m], f"site {m}") for m, c in channels.items()}


def _run_at_t(
    model: Any, adapter: Any, captions: list[str], latents: torch.Tensor, t_feed: torch.Tensor,
    sites: list[Site], channels: dict[str, torch.Tensor], kw: dict,
) -> dict[str, torch.Tensor]:
    pipe = _pipe(model)
    n_img = n_image_tokens(pipe, adapter, kw["height"], kw["width"])
    if latents.shape[1] != n_img:
        raise MassactError(f"latents have {latents.shape[1]} tokens; the pipeline expects {n_img}")
    layout = {f"{bl.attr}.": bl.layout for bl in adapter.blocks}
    dev = transformer_device(pipe)
    idx = {m: torch.as_tensor(c, dtype=torch.long, device=dev) for m, c in channels.items()}
    got: dict[str, torch.Tensor] = {}
    with model.trace(captions, latents=latents, num_inference_steps=1, output_type="latent", **kw):
        args, kwargs = model.transformer.inputs
        new_kwargs = dict(kwargs)
        new_kwargs["timestep"] = t_feed.to(kwargs["timestep"].device, kwargs["timestep"].dtype)
        model.transformer.inputs = (args, new_kwargs)
        for s in sites:
            out = model.transformer.get(s.module).output
            h = read_image(layout[s.module.rsplit(".", 1)[0] + "."], out, n_img, s.module)
            h = h[..., idx[s.module]] if s.module in idx else h
            got[s.module] = h.detach().clone().cpu()
    return got
