"""Architecture adapters: where a DiT's blocks are and how their image stream is laid out.

An adapter is data: block lists in execution order, each with an output *layout* name, plus a few
small rules (token grid, guidance). Reading and writing the image stream is done by the layout
functions below, which check the structure they are handed and fail loudly when a diffusers
release changed it, instead of silently reading the wrong tensor.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from massact_nn.errors import MassactError

# Output layouts of a block's forward, as diffusers 0.42 returns them.
#   pair_text_image: (encoder_hidden_states, hidden_states)   -> image = out[1]
#   pair_image_text: (hidden_states, encoder_hidden_states)   -> image = out[0]
#   tensor:          hidden_states (text enters by cross-attention, or there is none)
#   concat_text_image: one tensor cat([text, image], dim=1)   -> image = last n_image tokens
#                      (the check demands more than n_image tokens: a text-free tensor of the
#                      right length would otherwise be silently mistaken for the image stream)
#   concat_image_text: one tensor cat([image, text], dim=1)   -> image = first n_image tokens
#                      (image first at a fixed offset, then per-sample text and padding; more
#                      than n_image tokens demanded, as above)
#   image_then_pad:    one tensor [image; padding]            -> image = first n_image tokens
#                      (an image-only block over a sequence padded to a multiple of some length)
LAYOUTS = (
    "pair_text_image", "pair_image_text", "tensor",
    "concat_text_image", "concat_image_text", "image_then_pad",
)
_JOINT = ("concat_text_image", "concat_image_text")


@dataclass(frozen=True)
class BlockList:
    """One ``nn.ModuleList`` of blocks inside the transformer.

    Attributes:
        attr: Attribute path on the transformer, e.g. ``"single_transformer_blocks"``.
        kind: Short name used in site tables, e.g. ``"double"``.
        layout: One of :data:`LAYOUTS`.
    """

    attr: str
    kind: str
    layout: str

    @property
    def streams(self) -> tuple[str, ...]:
        """Streams this block outputs."""
        return ("image",) if self.layout in ("tensor", "image_then_pad") else ("image", "text")


@dataclass(frozen=True)
class Guidance:
    """How a pipeline runs classifier-free guidance.

    Attributes:
        mode: ``"none"`` (one call, no unconditional branch), ``"batched"`` (one call on
            ``[uncond; cond]`` rows) or ``"two_calls"`` (conditional call first, then the
            unconditional one, per step).
        active: Given the pipeline and the call's keyword arguments, whether guidance runs. It may
            raise :class:`MassactError` for a guidance setup the library cannot track.
    """

    mode: str
    active: Callable[[Any, dict], bool] = lambda pipe, kw: False


@dataclass(frozen=True)
class Adapter:
    """Architecture knowledge for one family of diffusers DiTs.

    Attributes:
        name: Family name (``"flux"``, ``"sana"``, ...).
        transformer_classes: diffusers transformer class names this adapter covers.
        blocks: Block lists in execution order.
        guidance: Guidance structure of the family's text-to-image pipeline.
        grid: ``(pipeline, height, width) -> (rows, cols)`` of the image token grid.
        width: ``transformer config -> channels`` of the residual stream.
        call_defaults: Pipeline keyword arguments this library passes unless the user does.
        notes: Free text shown in docs (what was verified, caveats).
        pipelines: Pipeline class names whose call structure (guidance, token layout) was verified;
            others are refused, since e.g. PAG, Sprint or Kontext variants change rows or tokens.
            Empty: not checked.
        scale_ignored: Given the pipeline and the call's keyword arguments, whether the pipeline
            ignores ``guidance_scale`` (FLUX.1-schnell has no guidance embedding), so that run
            metadata does not report a scale that changed nothing.
    """

    name: str
    transformer_classes: tuple[str, ...]
    blocks: tuple[BlockList, ...]
    guidance: Guidance
    grid: Callable[[Any, int, int], tuple[int, int]]
    width: Callable[[Any], int]
    call_defaults: dict = field(default_factory=dict)
    notes: str = ""
    pipelines: tuple[str, ...] = ()
    scale_ignored: Callable[[Any, dict], bool] = lambda pipe, kw: False

    def _active(self, pipe: Any, kwargs: dict) -> bool:
        cls = type(pipe).__name__
        if self.pipelines and cls not in self.pipelines:
            raise MassactError(
                f"pipeline {cls} is not verified with the {self.name!r} adapter (its guidance or token "
                f"layout may differ); accepted: {', '.join(self.pipelines)}"
            )
        # The predicate always runs: it may refuse a guidance setup the library cannot track.
        return self.guidance.active(pipe, kwargs)

    def calls_per_step(self, pipe: Any, kwargs: dict) -> int:
        """Transformer calls per denoising step for this call."""
        active = self._active(pipe, kwargs)
        return 2 if self.guidance.mode == "two_calls" and active else 1

    def batched_cfg(self, pipe: Any, kwargs: dict) -> bool:
        """Whether the transformer sees ``[uncond; cond]`` rows in one call."""
        active = self._active(pipe, kwargs)
        return self.guidance.mode == "batched" and active


def vae_scale(pipe: Any) -> int:
    """The pipeline's VAE downsampling factor (diffusers' ``vae_scale_factor``)."""
    f = getattr(pipe, "vae_scale_factor", None)
    if f is None:
        raise MassactError(f"{type(pipe).__name__} has no vae_scale_factor; cannot derive the token grid")
    return int(f)


def packed_grid(pipe: Any, height: int, width: int, patch: int = 2) -> tuple[int, int]:
    """Token grid of pipelines that pack ``patch × patch`` latent pixels into one token."""
    f = vae_scale(pipe)
    return height // (f * patch), width // (f * patch)


def patch_grid(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """Token grid of pipelines whose transformer patchifies the latent by its ``patch_size``."""
    f = vae_scale(pipe) * int(pipe.transformer.config.patch_size)
    return height // f, width // f


def call_arg(pipe: Any, kwargs: dict, name: str) -> Any:
    """A pipeline call's argument: from ``kwargs``, else the default of the pipeline's ``__call__``.

    Guidance predicates need the value the pipeline will really use: ``guidance_scale`` left out
    means the pipeline's own default (often > 1, so CFG runs).
    """
    if name in kwargs:
        return kwargs[name]
    param = call_parameters(pipe).get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def call_parameters(pipe: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters of the pipeline's ``__call__``, by name."""
    return _parameters(type(pipe).__call__)


@functools.lru_cache(maxsize=256)
def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    # inspect.signature costs ~40 µs a call, and a run asks several times before the first
    # transformer call (host time a GPU idles through).
    return inspect.signature(fn).parameters


def scale_above_one(name: str) -> Callable[[Any, dict], bool]:
    """Guidance predicate ``call_arg(name) > 1`` (diffusers' ``do_classifier_free_guidance``)."""

    def active(pipe: Any, kwargs: dict) -> bool:
        value = call_arg(pipe, kwargs, name)
        return value is not None and float(value) > 1

    return active


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}[" + ", ".join(_shape(v) for v in x) + "]"
    return type(x).__name__


def _layout_error(where: str, layout: str, out: Any, why: str) -> MassactError:
    return MassactError(
        f"block {where}: output {_shape(out)} does not match the adapter's layout {layout!r} "
        f"({why}); this diffusers version may have changed the block's return value"
    )


def read_image(layout: str, out: Any, n_image: int, where: str = "?") -> torch.Tensor:
    """The image-stream tokens of a block output.

    Args:
        layout: One of :data:`LAYOUTS`.
        out: What the block's forward returned.
        n_image: Expected number of image tokens.
        where: Site name for error messages.

    Shapes:
        -> [batch, n_image, channels] (a view of the block's output where the layout allows).
    """
    if layout in ("pair_text_image", "pair_image_text"):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _layout_error(where, layout, out, "expected a pair")
        img = out[1] if layout == "pair_text_image" else out[0]
    elif layout in ("tensor", "image_then_pad", *_JOINT):
        if not isinstance(out, torch.Tensor):
            raise _layout_error(where, layout, out, "expected one tensor")
        if layout in _JOINT and (out.ndim != 3 or out.shape[1] <= n_image):
            side = "before" if layout == "concat_text_image" else "after"
            raise _layout_error(where, layout, out, f"expected text tokens {side} {n_image} image tokens")
        if layout == "tensor":
            img = out
        elif layout == "concat_text_image":
            img = out[:, out.shape[1] - n_image:]
        else:
            img = out[:, :n_image]
    else:
        raise MassactError(f"unknown layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    if isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[1] != n_image:
        # Either the generation ran at another size, or the layout changed: say both.
        raise _layout_error(where, layout, out, (
            f"expected {n_image} image tokens, got {img.shape[1]}; if the generation ran at another "
            "height or width than the token count was computed for, pass the model's own (a toy's "
            "32x32 comes with make_plan(...).kwargs())"))
    if not isinstance(img, torch.Tensor) or img.ndim != 3:
        raise _layout_error(where, layout, out, f"expected {n_image} image tokens")
    return img


def write_image(layout: str, out: Any, image: torch.Tensor, n_image: int) -> Any:
    """A new block output whose image stream is ``image`` (everything else unchanged).

    A new object is built rather than editing in place: under several nnsight invokes each one
    sees a concatenated copy, so in-place edits would be lost (docs/nnsight-pitfalls.md, 6).

    Shapes:
        image: [batch, n_image, channels].
    """
    if layout == "pair_text_image":
        return (out[0], image)
    if layout == "pair_image_text":
        return (image, out[1])
    if layout == "tensor":
        return image
    if layout == "concat_text_image":
        return torch.cat([out[:, : out.shape[1] - n_image], image], dim=1)
    if layout in ("concat_image_text", "image_then_pad"):
        return torch.cat([image, out[:, n_image:]], dim=1)
    raise MassactError(f"unknown layout {layout!r}; accepted: {', '.join(LAYOUTS)}")


def input_tokens(args: tuple, kwargs: dict, row: int, grid: tuple[int, int]) -> torch.Tensor:
    """The transformer's noisy image input for one batch row, as tokens in grid order.

    Pipelines differ in how they hand it over: FLUX-style ones pass a packed ``[B, N, D]`` token
    sequence; PixArt, SANA, SD3, CogView and others a ``[B, C, H, W]`` latent that the
    transformer patchifies itself (each token then gets its ``C × ph × pw`` latent values);
    Z-Image a list of ``[C, F, H, W]`` latents. Some pass it positionally.

    Args:
        args: The transformer call's positional arguments.
        kwargs: Its keyword arguments.
        row: Batch row.
        grid: The image token grid (rows, cols).

    Shapes:
        -> [rows * cols, D], row-major over the grid.
    """
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    if x is None:
        raise MassactError("the transformer call has no image input (neither `hidden_states` nor a "
                           "first positional argument); accepted: a DiT called on its latents")
    x = x[row]
    rows, cols = grid
    if x.ndim >= 3:  # a latent [C, H, W] (or [C, F, H, W]): patchify it the way the grid cuts it
        x = x.reshape(-1, *x.shape[-2:])
        c, h, w = x.shape
        if h % rows or w % cols:
            raise MassactError(f"latent input {h}x{w} does not split into the {rows}x{cols} token grid")
        ph, pw = h // rows, w // cols
        x = x.reshape(c, rows, ph, cols, pw).permute(1, 3, 0, 2, 4).reshape(rows * cols, c * ph * pw)
    if x.ndim != 2 or x.shape[0] != rows * cols:
        raise MassactError(f"the transformer's image input has shape {tuple(x.shape)}; accepted: "
                           f"{rows * cols} tokens ({rows}x{cols}) or a latent that splits into them")
    return x


def input_timestep(args: tuple, kwargs: dict, row: int) -> float:
    """The timestep a transformer call was given for one batch row (keyword or second argument)."""
    t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
    if not isinstance(t, torch.Tensor):
        return float("nan") if t is None else float(t)
    t = t.flatten()
    return float(t[row] if t.numel() > row else t[0])
