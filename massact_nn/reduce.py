"""Per-channel reductions over the tokens of one site: the kernels behind the statistics.

Every formulation returns the same three ``[rows, channels]`` tensors (sum and sum of absolute
values in float32, largest absolute value in the input's dtype) and never makes a float32 copy
of the activations. They differ only in speed, which depends on the device:

- CPU: :func:`channel_sums_abs` (one ``abs()`` copy, then plain reductions).
- GPU: :func:`channel_sums_norms`, three eager reductions that each read the activations once
  (the default); or, with ``FUSED = True``, :func:`channel_sums_fused`: one compiled reduction
  (``torch.compile``, Triton; it ran as three small kernels) that reads them once.

Measured on [1, 4096, 3072] bf16 (``benchmarks/README.md``): in a generation on an H200 the
compiled reduction took 0.019 ms of GPU time per site against 0.057 ms for the eager norms, but
a call costs about 0.08 ms more host time (guards and the compiled wrapper), and it compiles
for a few seconds per process and shape. Whether that pays depends on whether the GPU or the
host is the bottleneck; no interleaved comparison of whole generations has settled it yet, so
it is off by default.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

from .errors import MassactError

Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

FUSED: bool = False
"""Reduce GPU activations with the compiled one-pass reduction (:func:`channel_sums_fused`)."""

_compiled: dict[str, Callable[[torch.Tensor], Sums] | None] = {}


def channel_sums(h: torch.Tensor) -> Sums:
    """Per row and channel: the sum, the sum of absolute values and the largest absolute value.

    Args:
        h: Activations; a floating dtype, any device.

    Returns:
        ``(sum, abs_sum, abs_max)``: sums in float32, the maximum in ``h``'s dtype (exact there).

    Raises:
        MassactError: for a shape other than [rows, tokens, channels] with at least one token,
            a non-floating dtype, or a ``FUSED`` other than True or False.

    Shapes:
        h: [rows, tokens, channels] -> three [rows, channels].
    """
    if FUSED is not True and FUSED is not False:
        raise MassactError(f"massact_nn.reduce.FUSED={FUSED!r}; accepted: True, False")
    if h.ndim != 3 or h.shape[1] < 1:
        raise MassactError(f"activations of shape {tuple(h.shape)}; accepted: [rows, tokens >= 1, "
                           "channels]")
    if not h.is_floating_point():
        raise MassactError(f"activations of dtype {h.dtype}; accepted: a floating dtype")
    if h.device.type == "cpu":
        return channel_sums_abs(h)
    fused = _fused() if FUSED else None
    if fused is not None:
        try:
            return fused(h)
        except Exception as e:  # the input is valid (checked above): a compiler or driver problem
            _compiled["fused"] = None
            warnings.warn(f"massact_nn: the fused channel reduction failed ({type(e).__name__}: "
                          f"{str(e)[:200]}); using eager reductions from now on", stacklevel=2)
    return channel_sums_norms(h)


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
    if "fused" not in _compiled:
        ok = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
        # Specialised per shape (dynamic=False): a generation's shapes are fixed, and a kernel
        # compiled for symbolic shapes after a second shape was seen would be slower.
        _compiled["fused"] = torch.compile(one_pass, fullgraph=True, dynamic=False) if ok else None
    return _compiled["fused"]
