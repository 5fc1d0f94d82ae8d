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


class _Further(torch.Tensor):
    """Like ``_Elsewhere``, on yet another device."""

    @property
    def device(self):  # noqa: D102
        return torch.device("cuda", 1)


def test_one_copy_per_source_device_and_lazy_views_resolved():
    x = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1.0, -2.0, 3.0])
    given = {
        "conj": x.conj().as_subclass(_Elsewhere),  # a lazy conjugate view: its bytes are x's
        "neg": y._neg_view().as_subclass(_Further),  # a lazy negation view
        "ids": torch.tensor([3, 1]).as_subclass(_Further),
        "more": torch.tensor([7, 8]).as_subclass(_Elsewhere),
    }
    copies = []
    real_cat = torch.cat
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "cat", lambda ts, *a, **k: copies.append(len(ts)) or real_cat(ts, *a, **k))
        out = move_packed(given, "cpu")
    assert sorted(copies) == [2, 2]  # one buffer per source device
    assert torch.equal(out["conj"].as_subclass(torch.Tensor), x.conj().resolve_conj())
    assert torch.equal(out["neg"].as_subclass(torch.Tensor), -y)
    assert out["ids"].as_subclass(torch.Tensor).tolist() == [3, 1]
    assert out["more"].as_subclass(torch.Tensor).tolist() == [7, 8]


def test_tensors_whose_bytes_cannot_be_viewed_move_one_by_one():
    sparse = torch.tensor([[0.0, 1.0], [2.0, 0.0]]).to_sparse()
    out = move_packed({"sparse": sparse, "dense": torch.ones(2)}, "meta")
    assert out["sparse"].is_sparse and out["sparse"].device.type == "meta"
    assert out["dense"].device.type == "meta" and out["dense"].shape == (2,)
