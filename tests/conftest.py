"""Shared fixtures: tiny pipelines built once per session, offline, one thread."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny random FLUX.1 pipeline folder (no planted channel)."""
    from massact_nn.tracing.testing.tiny import build_flux

    return build_flux(tmp_path_factory.mktemp("tiny_flux"), seed=0)


@pytest.fixture(scope="session")
def planted_flux_dir(tmp_path_factory):
    """A tiny FLUX.1 pipeline whose channel 5 is made massive by the first double block."""
    from massact_nn.tracing.testing.tiny import build_flux

    return build_flux(tmp_path_factory.mktemp("planted_flux"), seed=1, plant=(5, 50.0))


@pytest.fixture(scope="session")
def tiny_flux(tiny_flux_dir):
    """The tiny FLUX.1 pipeline loaded as an nnsight DiffusionModel."""
    from massact_nn.tracing.model import load_model

    return load_model(tiny_flux_dir)


@pytest.fixture
def cyclic_garbage():
    """``run(fn)``: the tensors and library objects that only the garbage collector frees after
    ``fn()`` (reference cycles), by type name.

    A cycle would keep a finished run's device tensors until a collection, which then runs at an
    unpredictable moment (milliseconds a GPU may wait through).
    """
    import gc

    def run(fn) -> list[str]:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            fn()
            gc.collect()
            return [type(o).__name__ for o in gc.garbage
                    if isinstance(o, torch.Tensor) or type(o).__module__.startswith("massact_nn")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    return run
