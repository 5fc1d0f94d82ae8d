"""The per-channel reductions: every formulation against a float64 oracle, and the GPU fallback."""

from __future__ import annotations

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
    monkeypatch.setattr(red, "FUSED", True)
    h = torch.empty(2, 16, 8, device="meta")  # not a CPU tensor: the GPU path is taken
    with pytest.warns(UserWarning, match="fused channel reduction failed.*no triton here"):
        s, l1, linf = red.channel_sums(h)
    assert (s.shape, l1.shape, linf.shape) == ((2, 8),) * 3 and s.dtype == torch.float32
    red.channel_sums(h)  # no second attempt: the kernel is dropped after one failure
    assert calls == [(2, 16, 8)] and red._compiled["fused"] is None


def test_fused_can_be_switched_off(monkeypatch):
    def never(h):
        raise AssertionError("compiled kernel used although FUSED is False")

    monkeypatch.setattr(red, "_compiled", {"fused": never})
    monkeypatch.setattr(red, "FUSED", False)
    s, _, _ = red.channel_sums(torch.empty(1, 4, 3, device="meta"))
    assert s.shape == (1, 3)


def test_an_unknown_fused_setting_is_refused_on_every_device(monkeypatch):
    for bad in ("yes", 1, "auto"):
        monkeypatch.setattr(red, "FUSED", bad)
        for dev in ("cpu", "meta"):
            with pytest.raises(MassactError, match=f"FUSED={bad!r}; accepted: True, False"):
                red.channel_sums(torch.zeros(1, 4, 3, device=dev))


@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_bad_activations_are_refused_before_any_kernel(monkeypatch, dev):
    def never(h):
        raise AssertionError("the compiled kernel saw an invalid input")

    monkeypatch.setattr(red, "_compiled", {"fused": never})
    monkeypatch.setattr(red, "FUSED", True)
    with pytest.raises(MassactError, match=r"shape \(1, 0, 3\); accepted: \[rows, tokens >= 1"):
        red.channel_sums(torch.zeros(1, 0, 3, device=dev))
    with pytest.raises(MassactError, match=r"shape \(4, 3\)"):
        red.channel_sums(torch.zeros(4, 3, device=dev))
    with pytest.raises(MassactError, match="dtype torch.int64; accepted: a floating dtype"):
        red.channel_sums(torch.zeros(1, 4, 3, dtype=torch.long, device=dev))
    assert red._compiled["fused"] is never  # not dropped: the input was at fault, not the compiler
