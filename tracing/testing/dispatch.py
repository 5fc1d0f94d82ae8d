"""What a piece of code asks of the device, seen at torch's dispatcher (for tests and benchmarks).

On a GPU the host queues kernels while the device runs earlier ones. Two things break that
overlap, and both are visible on a CPU, at the dispatcher, as aten operator calls:

- an operator that must wait for the device: one that reads a value (``.item()``, ``bool(t)``)
  or sizes its output from the data (``x[mask]``, ``nonzero``, ``unique``);
- operators launched while the device has nothing queued: before the model's first call or after
  its last, each is host time the generation pays in full.

:func:`waits_for_device` classifies one operator call; :class:`OpLog` counts the operators a
block of code dispatches, split into what the library's own code launched (by Python frame) and
when (before the transformer's first call, inside a call, between calls, after the last). On a
GPU, :class:`SyncReports` counts the synchronisations torch itself reports, by the same origin
rule.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that read a value, or read the data to size their result: each waits for a GPU.
SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                      "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount"})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_TORCH_DIR = Path(torch.__file__).resolve().parent
PHASES = ("before", "call", "between", "after")
# What torch warns with under torch.cuda.set_sync_debug_mode("warn").
SYNC_WARNING = "called a synchronizing CUDA operation"
_WARNINGS_FILES = frozenset({"warnings.py", "_py_warnings.py"})


def waits_for_device(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether this aten call makes the host wait for a GPU (a value read or a data-sized result).

    Args:
        func: The aten overload, as ``__torch_dispatch__`` receives it.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
    """
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # tensor repeats size the output, unless output_size is given
        reps = args[0]
        return isinstance(reps, torch.Tensor) and reps.dim() > 0 and kwargs.get("output_size") is None
    if name in _INDEX_OPS:  # a boolean mask is a nonzero in disguise
        masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
        if not masks:
            return False
        # ``x[mask] = scalar`` becomes a masked_fill in ATen: no nonzero, no wait.
        values = args[2] if len(args) > 2 else None
        accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
        fill = (name != "index" and len(args[1]) == 1 and not accumulate
                and isinstance(values, torch.Tensor) and values.numel() == 1 and values.device.type == "cpu")
        return not fill
    return False


def _under(file: str, roots: Iterable[Path]) -> bool:
    """Whether ``file`` is one of ``roots`` or lies in a folder among them."""
    path = Path(file).resolve()
    return any(r == path or r in path.parents for r in roots)


class _Origins:
    """Which frames are the library's: the innermost one outside torch decides."""

    def __init__(self, roots: Iterable[Path]):
        self.roots = [Path(r).resolve() for r in roots]
        self._files: dict[str, str] = {}

    def of(self, frame: FrameType | None) -> FrameType | None:
        """The innermost frame at or above ``frame`` outside torch, if it is the library's."""
        while frame is not None:
            file = frame.f_code.co_filename
            if file not in self._files:
                self._files[file] = ("torch" if _under(file, [_TORCH_DIR]) else
                                     "ours" if _under(file, self.roots) else "other")
            kind = self._files[file]
            if kind != "torch":
                return frame if kind == "ours" else None
            frame = frame.f_back
        return None


def _where(frame: FrameType) -> str:
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class OpLog(TorchDispatchMode):
    """Count the aten operators dispatched inside ``with OpLog(roots):``, by phase and origin.

    An operator is the library's own when the innermost Python frame outside torch that
    dispatched it lies in one of ``roots`` (files or folders) (our own operators reached through
    ``torch.nn.functional`` count; diffusers' and nnsight's do not). Phases follow
    :meth:`enter_call` / :meth:`exit_call`, which the caller hooks to the transformer: ``before``
    its first call, inside a ``call``, ``between`` calls, ``after`` its last call (operators
    between the last two marks are moved there when the block ends). A second ``with`` block
    goes on counting from there.

    Attributes:
        total: Every operator dispatched.
        ours: The library's own operators per phase.
        waits: The library's own operators that wait for a GPU, as ``phase file:line op`` counts.
            On a CPU every tensor is a host tensor, so these are candidates: the same operator on
            host data (a result already moved to the host) waits for nothing.
        calls: Transformer calls seen.
    """

    def __init__(self, roots: Iterable[Path]):
        super().__init__()
        self._origins = _Origins(roots)
        self.total = 0
        self.ours: Counter[str] = Counter()
        self.waits: Counter[str] = Counter()
        self.calls = 0
        self._phase = "before"
        self._trailing = 0  # our operators since the last call ended
        self._trailing_waits: Counter[str] = Counter()  # and those of them that wait

    def enter_call(self, *_: Any) -> None:
        """Mark the start of a transformer call (usable as a forward pre-hook)."""
        self.calls += 1
        self._phase = "call"
        self._trailing = 0
        self._trailing_waits.clear()

    def exit_call(self, *_: Any) -> None:
        """Mark the end of a transformer call (usable as a forward hook)."""
        self._phase = "between"

    @contextmanager
    def follow(self, module: torch.nn.Module) -> Iterator[OpLog]:
        """Count inside the block, the phases following ``module``'s calls (plain hooks, removed after).

        ``with OpLog(roots).follow(pipe.transformer) as log: ...``
        """
        hooks = [module.register_forward_pre_hook(self.enter_call),
                 module.register_forward_hook(self.exit_call, always_call=True)]
        try:
            with self:
                yield self
        finally:
            for h in hooks:
                h.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.total += 1
        frame = self._origins.of(sys._getframe(1))
        if frame is not None:
            self.ours[self._phase] += 1
            if self._phase == "between":
                self._trailing += 1
            if waits_for_device(func, args, kwargs):
                key = f"{_where(frame)} {func.overloadpacket.__name__}"
                self.waits[f"{self._phase} {key}"] += 1
                if self._phase == "between":
                    self._trailing_waits[key] += 1
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> Any:
        if self.calls:  # what ran after the last call is "after", not "between"
            self.ours["between"] -= self._trailing
            self.ours["after"] += self._trailing
            for key, n in self._trailing_waits.items():
                self.waits[f"between {key}"] -= n
                self.waits[f"after {key}"] += n
                if not self.waits[f"between {key}"]:
                    del self.waits[f"between {key}"]
            self._phase, self._trailing = "after", 0  # moved once, not again by a later block
            self._trailing_waits.clear()
        return super().__exit__(*exc)


class SyncReports:
    """Count the synchronisations torch reports inside ``with SyncReports(roots):``, by origin.

    On a GPU the block runs under ``torch.cuda.set_sync_debug_mode("warn")``: torch then warns at
    every operation that makes the host wait for the device, including those no aten operator
    shows (a device-to-host copy). A warning raised from C++ carries the innermost Python frame,
    often torch's own code; like :class:`OpLog`, the report is the library's when the innermost
    frame outside torch is. Other warnings pass through untouched. Without CUDA nothing is
    switched on, and only warnings with ``text`` raised in the block are counted.

    Attributes:
        total: Synchronisations reported.
        ours: The library's, as ``file:line`` counts.
    """

    def __init__(self, roots: Iterable[Path], text: str = SYNC_WARNING):
        self._origins = _Origins(roots)
        self.text = text
        self.total = 0
        self.ours: Counter[str] = Counter()
        self._mode: int | None = None

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.text not in str(message):
            return self._passthrough(message, category, filename, lineno, file, line)
        self.total += 1
        frame = sys._getframe(1)
        while frame is not None and Path(frame.f_code.co_filename).name in _WARNINGS_FILES:
            frame = frame.f_back
        mine = self._origins.of(frame)
        if mine is not None:
            self.ours[_where(mine)] += 1

    def __enter__(self) -> SyncReports:
        self._caught = warnings.catch_warnings()
        self._caught.__enter__()
        warnings.filterwarnings("always", message=re.escape(self.text))
        self._passthrough = warnings.showwarning
        warnings.showwarning = self._show
        if torch.cuda.is_available():
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            torch.cuda.set_sync_debug_mode(self._mode)
            self._mode = None
        self._caught.__exit__(*exc)
