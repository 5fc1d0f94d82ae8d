"""Per-channel reductions over the tokens of one site: the kernels behind the statistics.

Every formulation returns the same three ``[rows, channels]`` tensors (sum and sum of absolute
values in float32, largest absolute value in the input's dtype) and never makes a float32 copy
of the activations. They differ only in speed, which depends on the device:

- CPU: :func:`channel_sums_abs` (one ``abs()`` copy, then plain reductions).
- GPU, eager: :func:`channel_sums_norms`, three reductions that each read the activations once.
- GPU, compiled: :func:`channel_sums_fused`, one ``torch.compile``d reduction (Triton) that reads
  them once.

Which one a run uses is :func:`plan_compiled`'s answer for its ``reduction`` setting
(``"auto"``, ``"eager"`` or ``"compiled"``). Measured on an H200 (``benchmarks/README.md``): for
[1, 4096, 3072] bf16 the compiled kernel takes 0.021 ms of GPU time against 0.056 ms for the
eager norms, and statistics at every site of a wide FLUX.1 cost 1.025x the plain pipeline with
it against 1.044x eager (4 steps; 1.014x against 1.021x at 28). But compiling takes about half
a second per process and memory layout of a shape (a second for FLUX's two), a call costs
~0.08 ms more host time, and where the host is the bottleneck ([1, 1024, 3072]: 1.46x against
1.28x) the compiled kernel loses. ``"auto"`` therefore compiles a shape only where it is large
and the run reduces it often enough to repay the compilation.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Mapping

import torch

from .errors import MassactError, choice_error

Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Shape = tuple[int, ...]

REDUCTIONS = ("auto", "eager", "compiled")
"""Accepted ``reduction`` settings (see :func:`plan_compiled`)."""

COMPILE_SECONDS = 0.55
"""One-off cost of compiling the reduction for one layout of a shape. On an H200 (torch 2.11)
the first compiled generation of a wide FLUX.1 took 1.05-1.08 s longer than the next ones; its
[1, 4096, 3072] activations come in two layouts (double and single blocks)."""

SAVED_SECONDS_PER_ELEMENT = 0.035e-3 / (4096 * 3072)
"""GPU time the compiled kernel saves per reduced element (0.056 - 0.021 ms for [1, 4096, 3072])."""

MIN_COMPILED_ELEMENTS = 2**23
"""Smallest activation ``"auto"`` compiles for: at [1, 1024, 3072] (3.1 M) the host was the
bottleneck and the compiled call's extra host time made statistics slower."""

_compiled: dict[str, Callable[[torch.Tensor], Sums] | None] = {}
_compiled_shapes: set[Shape] = set()  # shapes this process has compiled (free from now on)
_refused: set[tuple] = set()  # (shape, strides, dtype) past torch.compile's recompile limit


def plan_compiled(
    reduction: str, device: torch.device | str, calls: Mapping[Shape, int],
    layouts: Mapping[Shape, int] | None = None,
) -> frozenset[Shape]:
    """Which activation shapes a run reduces with the compiled kernel.

    Args:
        reduction: ``"eager"``: none. ``"compiled"``: all of them. ``"auto"``: those of at least
            :data:`MIN_COMPILED_ELEMENTS` elements whose planned reductions save more GPU time than
            compiling costs (:data:`COMPILE_SECONDS` per layout; nothing for a shape already
            compiled in this process). On FLUX.1-dev at 1024² (57 sites × 28 steps a prompt, two
            layouts) that is from about 20 prompts on.
        device: Where the activations are; only CUDA with Triton compiles (``"compiled"``
            elsewhere warns and runs eager).
        calls: Planned reductions per activation shape [rows, tokens, channels].
        layouts: Memory layouts (strides) each shape comes in, each compiled separately (FLUX's
            single blocks return a slice of the joint stream, its double blocks a tensor of
            their own: 2). Default 1.

    Returns:
        The shapes to pass to :func:`channel_sums` with ``compiled=True``.

    Raises:
        MassactError: for an unknown ``reduction``.
    """
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise choice_error("reduction", reduction, REDUCTIONS)
    if reduction == "eager" or torch.device(device).type != "cuda":
        if reduction == "compiled":
            warnings.warn(f"massact_nn: reduction='compiled' needs a CUDA device; on {device} the "
                          "reductions run eager", stacklevel=2)
        return frozenset()
    if _fused() is None:
        if reduction == "compiled":
            warnings.warn("massact_nn: reduction='compiled' needs Triton (torch.compile); running "
                          "eager reductions", stacklevel=2)
        return frozenset()
    if reduction == "compiled":
        return frozenset(calls)
    layouts = layouts or {}
    return frozenset(
        shape for shape, n in calls.items()
        if math.prod(shape) >= MIN_COMPILED_ELEMENTS
        and (shape in _compiled_shapes
             or n * math.prod(shape) * SAVED_SECONDS_PER_ELEMENT >= COMPILE_SECONDS * layouts.get(shape, 1))
    )


def channel_sums(h: torch.Tensor, compiled: bool = False) -> Sums:
    """Per row and channel: the sum, the sum of absolute values and the largest absolute value.

    Args:
        h: Activations; a floating dtype, any device.
        compiled: Use the compiled one-pass kernel (CUDA with Triton; elsewhere, or if it fails,
            the eager kernels, after one warning). See :func:`plan_compiled`.

    Returns:
        ``(sum, abs_sum, abs_max)``: sums in float32, the maximum in ``h``'s dtype (exact there).

    Raises:
        MassactError: for a shape other than [rows, tokens, channels] with at least one token,
            or a non-floating dtype.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    return reduce_sums(h, compiled)[0]


def reduce_sums(h: torch.Tensor, compiled: bool = False) -> tuple[Sums, bool]:
    """:func:`channel_sums`, and whether the compiled kernel computed them.

    Each layout of an activation (shape, strides, dtype) is a compilation of its own. Once
    torch.compile refuses more of them (its ``recompile_limit``), further layouts are reduced
    eagerly, with one warning each, while the layouts compiled so far keep their kernels.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    if h.ndim != 3 or h.shape[1] < 1:
        raise MassactError(f"activations of shape {tuple(h.shape)}; accepted: [rows, tokens >= 1, "
                           "channels]")
    if not h.is_floating_point():
        raise MassactError(f"activations of dtype {h.dtype}; accepted: a floating dtype")
    if h.device.type == "cpu":
        return channel_sums_abs(h), False
    fused = _fused() if compiled else None
    if fused is not None:
        key = (tuple(h.shape), h.stride(), h.dtype)
        if key not in _refused:
            try:
                out = fused(h)
            except Exception as e:  # the input is valid (checked above): the compiler's problem
                if _is_recompile_limit(e):
                    _refused.add(key)
                    warnings.warn(f"massact_nn: torch.compile's recompile limit is reached; activations "
                                  f"of shape {key[0]}, strides {key[1]}, {key[2]} are reduced eagerly "
                                  "(torch._dynamo.config.recompile_limit allows more)", stacklevel=3)
                else:
                    _compiled["fused"] = None
                    warnings.warn(f"massact_nn: the fused channel reduction failed ({type(e).__name__}: "
                                  f"{str(e)[:200]}); using eager reductions from now on", stacklevel=3)
            else:
                _compiled_shapes.add(key[0])
                return out, True
    return channel_sums_norms(h), False


def _is_recompile_limit(e: BaseException | None) -> bool:
    # torch.compile(fullgraph=True) raises FailOnRecompileLimitHit (FailOnCacheLimitHit before
    # torch 2.6) past its limit; a wrapped one counts too.
    while e is not None:
        if type(e).__name__ in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
            return True
        e = e.__cause__ or e.__context__
    return False


def channel_sums_abs(h: torch.Tensor) -> Sums:
    """:func:`channel_sums` through one ``abs()`` copy: the fastest form on a CPU.

    On CPU the norm kernels over the token dim were 6-11x slower (1.0 ms vs 0.12 ms for
    [1, 1024, 256]), which alone cost 2.5% of a generation.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    habs = h.abs()
    return (torch.sum(h, dim=1, dtype=torch.float32), torch.sum(habs, dim=1, dtype=torch.float32),
            torch.amax(habs, dim=1))


def channel_sums_norms(h: torch.Tensor) -> Sums:
    """:func:`channel_sums` as three reductions of ``h`` itself: the GPU default.

    Each norm reads ``h`` once and writes nothing, where ``abs()`` writes a copy and reads it
    back twice: 0.059 ms against 0.090 ms for [1, 4096, 3072] bf16 on an H100.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    return (torch.sum(h, dim=1, dtype=torch.float32),
            torch.linalg.vector_norm(h, 1, dim=1, dtype=torch.float32),
            torch.linalg.vector_norm(h, float("inf"), dim=1))


def one_pass(h: torch.Tensor) -> Sums:
    """The body of :func:`channel_sums_fused`, written for the compiler.

    Eagerly it makes float32 copies; compiled, the upcast and ``abs`` are fused into the
    reduction, which reads ``h`` once. Tests run it eagerly as the reference of that kernel.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    hf = h.float()
    a = hf.abs()
    return hf.sum(1), a.sum(1), a.amax(1).to(h.dtype)


def channel_sums_fused(h: torch.Tensor) -> Sums:
    """:func:`channel_sums` compiled for a GPU; eager :func:`channel_sums_norms` where it cannot be.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    fused = _fused()
    return channel_sums_norms(h) if fused is None else fused(h)


def _fused() -> Callable[[torch.Tensor], Sums] | None:
    """The compiled reduction, or None where it cannot be built (no CUDA, no Triton, a failure)."""
    if "fused" not in _compiled:
        ok = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
        # Specialised per shape (dynamic=False): a generation's shapes are fixed, and a kernel
        # compiled for symbolic shapes after a second shape was seen would be slower.
        _compiled["fused"] = torch.compile(one_pass, fullgraph=True, dynamic=False) if ok else None
    return _compiled["fused"]
