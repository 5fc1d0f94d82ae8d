"""Many small tensors moved between host and device in one copy, bit for bit."""

from __future__ import annotations

import pytest
import torch

from massact_nn.transfer import move_packed


class _Elsewhere(torch.Tensor):
    """A CPU tensor that claims to live on another device, so ``move_packed`` has to move it."""

    @property
    def device(self):  # noqa: D102
        return torch.device("meta")


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
        "f32": torch.randn(5, 3, generator=g),
        "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.randint(-9, 9, (2, 3), generator=g),
        "i32": torch.randint(-9, 9, (1, 5), generator=g, dtype=torch.int32),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],  # reshape(-1) of it is still strided
    }


def test_every_dtype_and_layout_comes_back_bit_for_bit():
    given = {k: t.as_subclass(_Elsewhere) for k, t in _mixed().items()}
    copies = []
    real_cat = torch.cat
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "cat", lambda ts, *a, **k: copies.append(len(ts)) or real_cat(ts, *a, **k))
        out = move_packed(given, "cpu")
    assert copies == [len(given)]  # one buffer, one copy
    assert list(out) == list(given)
    for key, value in _mixed().items():
        got = out[key].as_subclass(torch.Tensor)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key


def test_tensors_already_there_are_passed_through():
    here = torch.tensor([9, 9])
    moved = move_packed({"a": torch.tensor([1.5]).as_subclass(_Elsewhere), "here": here}, "cpu")
    assert moved["here"] is here
    assert torch.equal(moved["a"].as_subclass(torch.Tensor), torch.tensor([1.5]))
    assert move_packed({}, "cpu") == {}
