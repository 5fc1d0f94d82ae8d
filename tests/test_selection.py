"""Channel selection and set-stability helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from massact_nn.errors import MassactError
from massact_nn.selection import (
    control_set,
    jaccard,
    low_k,
    mean_pairwise_jaccard,
    mean_pairwise_jaccard_fast,
    random_k,
    ratio_top1_median,
    top_k,
)


def test_top_low_order():
    s = torch.tensor([3.0, 9.0, 1.0, 5.0, 0.5])
    assert top_k(s, 2).tolist() == [1, 3]
    assert low_k(s, 2).tolist() == [4, 2]


def test_random_is_seeded_and_excludes_top():
    s = torch.arange(20.0)
    a = control_set("random", s, 4, seed=3)
    assert torch.equal(a, control_set("random", s, 4, seed=3))
    assert not torch.equal(a, control_set("random", s, 4, seed=4))
    assert not set(a.tolist()) & set(top_k(s, 4).tolist())
    assert control_set("none", s, 4).numel() == 0
    with pytest.raises(MassactError, match="unknown channel set 'best'"):
        control_set("best", s, 4)
    with pytest.raises(MassactError, match=r"k \(random draw\)=17"):
        random_k(20, 17, 0, exclude=top_k(s, 4))


def test_k_out_of_range():
    with pytest.raises(MassactError, match=r"k=6 is out of range; accepted: 1\.\.5"):
        top_k(torch.zeros(5), 6)


def test_jaccard_and_ratio():
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert ratio_top1_median(torch.tensor([1.0, 1.0, 1.0, 10.0, 1.0])) == pytest.approx(10.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_fast_pairwise_jaccard_equals_reference(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    sets = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(n)])
    assert mean_pairwise_jaccard_fast(sets, 8) == pytest.approx(mean_pairwise_jaccard(sets))
