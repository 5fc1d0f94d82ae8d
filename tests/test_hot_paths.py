"""The per-call paths read nothing back from the device.

On a GPU every ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)`` or ``.cpu()`` waits for all queued
work: one such read per site and step is what made statistics cost 1.6x a generation on an H200
(benchmarks/README.md). So does ``torch.tensor(list, device=...)``: a copy from ordinary host memory.
These tests run the statistics, disruption and transport paths on CPU with those methods and
``torch.tensor / as_tensor / from_numpy`` watched, and fail if any is called from a function that
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
    Path(__file__).name: {"planted_read", "planted_copy"},
}
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")
# Tensors built from host data: on a GPU each is a host-to-device copy from ordinary (pageable)
# memory, which waits for the GPU like a read does.
CREATES = ("tensor", "as_tensor", "from_numpy")
GEN = GenerationConfig(steps=2, seed=1, height=32, width=32)


@contextmanager
def watched_reads():
    """Record each host read (or tensor built from host data) made by a hot function or below it."""
    hits: list[str] = []
    watched = [(torch.Tensor, name, f"Tensor.{name}") for name in READS]
    watched += [(torch, name, f"torch.{name}") for name in CREATES]
    originals = [(owner, name, label, getattr(owner, name)) for owner, name, label in watched]

    def wrap(label, original):
        def read(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:  # a read anywhere below a hot function counts
                code = frame.f_code
                file = Path(code.co_filename)
                if code.co_name in HOT.get(file.name, ()) and (
                        file.name == Path(__file__).name or ROOTS & set(file.resolve().parents)):
                    hits.append(f"{file.name}:{code.co_name} -> {sys._getframe(1).f_code.co_name}"
                                f" calls {label}")
                    break
                frame = frame.f_back
            return original(*args, **kwargs)

        return read

    for owner, name, label, original in originals:
        setattr(owner, name, wrap(label, original))
    try:
        yield hits
    finally:
        for owner, name, _, original in originals:
            setattr(owner, name, original)


def planted_read(x: torch.Tensor) -> float:
    return float(x.sum())


def planted_copy(x: torch.Tensor) -> torch.Tensor:
    return x + torch.tensor([1.0, 2.0, 3.0], device=x.device)


def test_the_watch_sees_a_planted_read_and_copy():
    with watched_reads() as hits:
        planted_read(torch.ones(3))
        planted_copy(torch.ones(3))
    assert hits == ["test_hot_paths.py:planted_read -> planted_read calls Tensor.__float__",
                    "test_hot_paths.py:planted_copy -> planted_copy calls torch.tensor"]


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
