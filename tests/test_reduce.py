"""The per-channel reductions: every formulation against a float64 oracle, and the GPU fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import massact_nn.reduce as red
from massact_nn.errors import MassactError

FORMS = [red.channel_sums_abs, red.channel_sums_norms, red.one_pass, red.channel_sums]


def _oracle(h: torch.Tensor):
    d = h.double()
    return d.sum(1), d.abs().sum(1), d.abs().amax(1)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_form_matches_the_oracle(form, dtype):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 257, 40, generator=g) * 4).to(dtype)
    h[1, 5, 7] = -300.0  # a massive negative entry: its magnitude must win the maximum
    s, l1, linf = form(h)
    want = _oracle(h)
    assert s.dtype == l1.dtype == torch.float32 and linf.dtype == dtype
    assert s.shape == l1.shape == linf.shape == (3, 40)
    torch.testing.assert_close(s.double(), want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l1.double(), want[1], rtol=1e-5, atol=1e-4)
    assert torch.equal(linf.double(), want[2])  # exact in the input's own dtype
    assert float(linf[1, 7]) == 300.0


def test_no_compiled_kernel_without_a_gpu(monkeypatch):
    monkeypatch.setattr(red, "_compiled", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert red._fused() is None
    h = torch.randn(1, 8, 4)
    for a, b in zip(red.channel_sums_fused(h), red.channel_sums_norms(h)):
        assert torch.equal(a, b)


def test_a_failing_compiled_kernel_falls_back_once_with_a_warning(monkeypatch):
    calls = []

    def broken(h):
        calls.append(h.shape)
        raise RuntimeError("no triton here")

    monkeypatch.setattr(red, "_compiled", {"fused": broken})
    h = torch.empty(2, 16, 8, device="meta")  # not a CPU tensor: the GPU path is taken
    with pytest.warns(UserWarning, match="fused channel reduction failed.*no triton here"):
        s, l1, linf = red.channel_sums(h, compiled=True)
    assert (s.shape, l1.shape, linf.shape) == ((2, 8),) * 3 and s.dtype == torch.float32
    red.channel_sums(h, compiled=True)  # no second attempt: the kernel is dropped after one failure
    assert calls == [(2, 16, 8)] and red._compiled["fused"] is None


def test_the_compiled_kernel_runs_only_when_asked(monkeypatch):
    seen = []

    def fake(h):
        seen.append(tuple(h.shape))
        return red.channel_sums_norms(h)

    monkeypatch.setattr(red, "_compiled", {"fused": fake})
    monkeypatch.setattr(red, "_compiled_shapes", set())
    red.channel_sums(torch.empty(1, 4, 3, device="meta"))
    assert seen == [] and red._compiled_shapes == set()
    red.channel_sums(torch.empty(1, 4, 3, device="meta"), compiled=True)
    assert seen == [(1, 4, 3)] and red._compiled_shapes == {(1, 4, 3)}  # compiled in this process
    red.channel_sums(torch.ones(1, 4, 3), compiled=True)  # a CPU tensor: always the CPU kernels
    assert seen == [(1, 4, 3)]


@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_bad_activations_are_refused_before_any_kernel(monkeypatch, dev):
    def never(h):
        raise AssertionError("the compiled kernel saw an invalid input")

    monkeypatch.setattr(red, "_compiled", {"fused": never})
    with pytest.raises(MassactError, match=r"shape \(1, 0, 3\); accepted: \[rows, tokens >= 1"):
        red.channel_sums(torch.zeros(1, 0, 3, device=dev), compiled=True)
    with pytest.raises(MassactError, match=r"shape \(4, 3\)"):
        red.channel_sums(torch.zeros(4, 3, device=dev), compiled=True)
    with pytest.raises(MassactError, match="dtype torch.int64; accepted: a floating dtype"):
        red.channel_sums(torch.zeros(1, 4, 3, dtype=torch.long, device=dev), compiled=True)
    assert red._compiled["fused"] is never  # not dropped: the input was at fault, not the compiler


def test_past_the_recompile_limit_new_layouts_run_eager_and_compiled_ones_keep_their_kernel(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    # The compiler's own eager backend: real guards and recompile limit, no GPU needed.
    compiled = torch.compile(red.one_pass, fullgraph=True, dynamic=False, backend="eager")
    monkeypatch.setattr(red, "_compiled", {"fused": compiled})
    monkeypatch.setattr(red, "_compiled_shapes", set())
    monkeypatch.setattr(red, "_refused", set())
    joint = torch.empty(2, 72, 32, device="meta")
    layouts = [torch.empty(2, 64, 32, device="meta"), joint[:, 8:]]  # one shape, two strides
    assert [red.reduce_sums(h, True)[1] for h in layouts] == [True, True]
    third = torch.empty(1, 64, 32, device="meta")
    with pytest.warns(UserWarning, match=r"recompile limit is reached; activations of shape \(1, 64, 32\)"):
        (s, l1, linf), used = red.reduce_sums(third, True)
    assert not used and s.shape == l1.shape == linf.shape == (1, 32)
    assert red._compiled["fused"] is compiled  # not dropped: the other layouts keep compiling
    assert [red.reduce_sums(h, True)[1] for h in layouts] == [True, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused once: no second attempt, no second warning
        assert red.reduce_sums(third, True)[1] is False
    torch._dynamo.reset()


FLUX_DEV = (1, 4096, 3072)  # one row of FLUX.1-dev at 1024x1024
PER_PROMPT = 57 * 28  # its sites x steps


@pytest.fixture
def compiler(monkeypatch):
    """A stand-in for a working torch.compile on a CUDA machine."""
    monkeypatch.setattr(red, "_compiled", {"fused": red.channel_sums_norms})
    monkeypatch.setattr(red, "_compiled_shapes", set())


def test_auto_compiles_once_the_run_repays_the_compilation(compiler):
    # The documented break-even: about 20 prompts of FLUX.1-dev at 1024x1024 (two layouts).
    two = {FLUX_DEV: 2}
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 19 * PER_PROMPT}, two) == frozenset()
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 20 * PER_PROMPT}, two) == {FLUX_DEV}
    # One layout compiles once: half the run repays it.
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 9 * PER_PROMPT}) == frozenset()
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 10 * PER_PROMPT}) == {FLUX_DEV}
    # Per shape: a smaller last batch is not compiled for unless it repays its own compilation.
    tail = (3, 4096, 3072)
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 40 * PER_PROMPT, tail: 3 * PER_PROMPT}) == {FLUX_DEV}


def test_auto_leaves_small_activations_eager_however_long_the_run(compiler):
    small = (1, 1024, 3072)  # host-bound on an H200: the compiled call made statistics slower
    assert red.plan_compiled("auto", "cuda", {small: 10**9}) == frozenset()
    assert red.plan_compiled("compiled", "cuda", {small: 1}) == {small}


def test_auto_reuses_a_shape_this_process_compiled(compiler):
    red._compiled_shapes.add(FLUX_DEV)
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 1}) == {FLUX_DEV}


def test_eager_and_non_cuda_devices_never_compile(compiler):
    assert red.plan_compiled("eager", "cuda", {FLUX_DEV: 10**9}) == frozenset()
    assert red.plan_compiled("auto", "cpu", {FLUX_DEV: 10**9}) == frozenset()
    for dev in ("cpu", "meta"):
        with pytest.warns(UserWarning, match=f"'compiled' needs a CUDA device; on {dev}"):
            assert red.plan_compiled("compiled", dev, {FLUX_DEV: 1}) == frozenset()


def test_compiled_without_a_compiler_warns_and_runs_eager(monkeypatch):
    monkeypatch.setattr(red, "_compiled", {"fused": None})
    with pytest.warns(UserWarning, match="needs Triton"):
        assert red.plan_compiled("compiled", "cuda", {FLUX_DEV: 1}) == frozenset()
    assert red.plan_compiled("auto", "cuda", {FLUX_DEV: 10**9}) == frozenset()


@pytest.mark.parametrize("bad", ["Compiled", "fused", True, None, 1])
def test_an_unknown_reduction_is_refused(bad):
    with pytest.raises(MassactError, match=f"unknown reduction {bad!r}; accepted: auto, eager, compiled"):
        red.plan_compiled(bad, "cpu", {})
