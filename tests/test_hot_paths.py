"""The per-call paths read nothing back from the device.

On a GPU every ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)`` or ``.cpu()`` waits for all queued
work: one such read per site and step is what made statistics cost 1.6x a generation on an H200
(benchmarks/README.md). So does ``torch.tensor(list, device=...)``: a copy from ordinary host memory.
So do operators whose output size depends on the data (``x[mask]``, ``nonzero``, ``unique``,
``masked_select``, ...): a GPU must finish them before the host can size the result. These tests
run the statistics, disruption and transport paths on CPU with those methods,
``torch.tensor / as_tensor / from_numpy`` and those operators watched (at the dispatcher, so any
Python spelling of a data-sized operator is seen; a device-to-host copy dispatches nothing on a
CPU, which is why ``.cpu()`` is watched as a method), and fail if any is used by a function that
runs at every site and step.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import massact_nn.tracing
import pytest
import torch
from massact_nn.tracing.generation import GenerationConfig
from massact_nn.tracing.probes.common import make_plan
from massact_nn.tracing.probes.disruption import generate_images
from massact_nn.tracing.probes.transport import TransportConfig, transport
from massact_nn.tracing.sites import sites_of
from massact_nn.tracing.stats import StatsConfig, collect_stats
from massact_nn.tracing.testing.dispatch import OpLog, waits_for_device
from torch.utils._python_dispatch import TorchDispatchMode

import massact_nn

# The package's source folders (tracing/ installs as massact_nn.tracing from its own folder).
ROOTS = {Path(m.__file__).resolve().parent for m in (massact_nn, massact_nn.tracing)}
# Functions that run at every site and step (or per flush), by file.
HOT = {
    "stats.py": {"update", "fold", "_fold_group", "_fold_run", "fold_key", "_runs", "_group_regular",
                 "_group_general", "_close", "_index", "_spread", "measure", "_check_rows"},
    "disruption.py": {"ablate", "disrupt_output"},
    "transport.py": {"body", "edit", "keep", "put", "gather", "scatter_blend_"},
    "base.py": {"read_image", "write_image"},
    Path(__file__).name: {"planted_read", "planted_copy", "planted_mask", "planted_unique"},
}
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")
# Tensors built from host data: on a GPU each is a host-to-device copy from ordinary (pageable)
# memory, which waits for the GPU like a read does.
CREATES = ("tensor", "as_tensor", "from_numpy")
GEN = GenerationConfig(steps=2, seed=1, height=32, width=32)


def _hot_caller(frame) -> str | None:
    """``file:function`` of the innermost hot function at or above ``frame``, if any."""
    while frame is not None:  # a read anywhere below a hot function counts
        code = frame.f_code
        file = Path(code.co_filename)
        if code.co_name in HOT.get(file.name, ()) and (
                file.name == Path(__file__).name or ROOTS & set(file.resolve().parents)):
            return f"{file.name}:{code.co_name}"
        frame = frame.f_back
    return None


class _WatchOps(TorchDispatchMode):
    def __init__(self, hits: list[str]):
        super().__init__()
        self.hits = hits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if waits_for_device(func, args, kwargs):
            where = _hot_caller(sys._getframe(1))
            if where:
                self.hits.append(f"{where} runs aten.{func.overloadpacket.__name__}")
        return func(*args, **kwargs)


@contextmanager
def watched_reads():
    """Record each host read, tensor built from host data, or data-sized operator of a hot function.

    Anything below a hot function counts, down to the aten operators it dispatches.
    """
    hits: list[str] = []
    watched = [(torch.Tensor, name, f"Tensor.{name}") for name in READS]
    watched += [(torch, name, f"torch.{name}") for name in CREATES]
    originals = [(owner, name, label, getattr(owner, name)) for owner, name, label in watched]

    def wrap(label, original):
        def read(*args, **kwargs):
            where = _hot_caller(sys._getframe(1))
            if where:
                hits.append(f"{where} -> {sys._getframe(1).f_code.co_name} calls {label}")
            return original(*args, **kwargs)

        return read

    for owner, name, label, original in originals:
        setattr(owner, name, wrap(label, original))
    try:
        with _WatchOps(hits):
            yield hits
    finally:
        for owner, name, _, original in originals:
            setattr(owner, name, original)


def planted_read(x: torch.Tensor) -> float:
    return float(x.sum())


def planted_copy(x: torch.Tensor) -> torch.Tensor:
    return x + torch.tensor([1.0, 2.0, 3.0], device=x.device)


def planted_mask(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0].sum() + torch.where(x > 1)[0].sum()


def planted_unique(x: torch.Tensor) -> torch.Tensor:
    return x.unique().sum() + x.repeat_interleave(x.long()).sum()


def test_the_watch_sees_planted_reads_copies_and_data_sized_ops():
    x = torch.arange(3.0)
    with watched_reads() as hits:
        planted_read(x)
        planted_copy(x)
        planted_mask(x)
        planted_unique(x)
        # Outside a hot function nothing counts, and sizes known without the data never count.
        x[x > 0].sum()
        x.repeat_interleave(torch.tensor([1, 1, 1]), output_size=3)
    assert hits == ["test_hot_paths.py:planted_read -> planted_read calls Tensor.__float__",
                    "test_hot_paths.py:planted_read runs aten._local_scalar_dense",
                    "test_hot_paths.py:planted_copy -> planted_copy calls torch.tensor",
                    "test_hot_paths.py:planted_mask runs aten.index",
                    "test_hot_paths.py:planted_mask runs aten.nonzero",
                    "test_hot_paths.py:planted_unique runs aten._unique2",
                    "test_hot_paths.py:planted_unique runs aten.repeat_interleave"]


def test_statistics_read_nothing_back_per_call(tiny_flux):
    cfg = StatsConfig(GenerationConfig(steps=3, seed=0, height=32, width=32, guidance_scale=None),
                      k=2, per_step=True, progress=False)
    with watched_reads() as hits:
        st = collect_stats(tiny_flux, ["a red cat", "a dog"], cfg)
    assert hits == [], sorted(set(hits))
    assert st.stat(st.sites[0].module, "abs_mean").shape == (st.sites[0].channels,)


@pytest.mark.parametrize("mode", ["zero", "mean", "scale"])
def test_disruption_reads_nothing_back_per_call(tiny_flux, mode):
    plan = make_plan(tiny_flux, GEN)
    edit = {s.module: (torch.tensor([1, 5]), torch.tensor([0.5, -0.5])) for s in plan.sites}
    with watched_reads() as hits:
        generate_images(tiny_flux, plan, ["a red cat"], edit, mode, alpha=0.5)
    assert hits == [], sorted(set(hits))


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
def test_transport_reads_nothing_back_per_call(tiny_flux, mode):
    chans = {s.module: torch.tensor([0, 3, 7]) for s in sites_of(tiny_flux)}
    p = torch.zeros(2, 8, 8, dtype=torch.bool)
    p[0, :4] = True
    p[1, :, 2:] = True
    cfg = TransportConfig(generation=GEN, channels=chans, token_mask=p, alpha=0.5, mode=mode,
                          copy_norm_out=True, judge=False, progress=False)
    with watched_reads() as hits:
        transport(tiny_flux, ["a red cat", "a tree"], ["a blue dog", "a cat"], None, cfg)
    assert hits == [], sorted(set(hits))


def _ops_of_stats(model, sites: list[int]) -> OpLog:
    cfg = StatsConfig(GenerationConfig(steps=3, seed=0, height=32, width=32, guidance_scale=None),
                      k=2, sites=sites, progress=False)
    with OpLog(ROOTS).follow(model.pipeline.transformer) as log:
        collect_stats(model, ["a red cat"], cfg)
    return log


def test_statistics_launch_no_more_after_the_generation_for_more_sites(tiny_flux):
    # What runs after the transformer's last call has no GPU work to hide behind: the fold must
    # have been queued inside the trace, and the results leave in one transfer whatever the sites.
    n = len(sites_of(tiny_flux))
    few, every = _ops_of_stats(tiny_flux, [0, 1]), _ops_of_stats(tiny_flux, list(range(n)))
    assert every.calls == few.calls == 3
    assert every.ours["after"] == few.ours["after"] <= 30, (few.ours, every.ours)
    assert every.ours["before"] == few.ours["before"]
    assert every.ours["call"] > few.ours["call"]  # the per-site work is inside the calls
    assert not [w for w in every.waits if not w.startswith("after ")], every.waits
