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


def test_ties_keep_channel_order():
    s = torch.tensor([2.0, 5.0, 2.0, 5.0, 2.0, 5.0, 1.0])
    assert top_k(s, 2).tolist() == [1, 3] and top_k(s, 4).tolist() == [1, 3, 5, 0]
    assert low_k(s, 3).tolist() == [6, 0, 2]
    wide = torch.zeros(3072)  # long enough for torch's own sort paths, all tied
    assert top_k(wide, 5).tolist() == [0, 1, 2, 3, 4] and low_k(wide, 3).tolist() == [0, 1, 2]


def test_control_sets_by_name():
    s = torch.tensor([3.0, 9.0, 1.0, 5.0, 0.5, 7.0])
    assert torch.equal(control_set("top", s, 2), top_k(s, 2))
    low = control_set("low", s, 2)
    assert low.tolist() == [4, 2] and not set(low.tolist()) & set(top_k(s, 2).tolist())
    assert control_set("none", s, 4).numel() == 0
    with pytest.raises(MassactError, match="unknown channel set 'best'; accepted: top, low, random, none"):
        control_set("best", s, 4)


def test_random_is_seeded_sorted_private_and_excludes_top():
    s = torch.arange(20.0)
    a = control_set("random", s, 4, seed=3)
    assert torch.equal(a, control_set("random", s, 4, seed=3))
    assert not torch.equal(a, control_set("random", s, 4, seed=4))
    assert a.tolist() == sorted(a.tolist())
    # 6 channels, top-3 excluded: any draw of 3 that did not exclude them would overlap often.
    small = torch.tensor([0.0, 5.0, 1.0, 6.0, 2.0, 7.0])
    for seed in range(40):
        d = control_set("random", small, 3, seed=seed)
        assert d.tolist() == [0, 2, 4], seed  # exactly the channels left
    draws = {tuple(control_set("random", s, 4, seed=seed).tolist()) for seed in range(40)}
    assert len(draws) > 30 and not {c for d in draws for c in d} & set(top_k(s, 4).tolist())
    assert control_set("random", s, 16, seed=0, exclude_top=False).numel() == 16
    # The global RNG is untouched.
    torch.manual_seed(123)
    before = torch.get_rng_state()
    control_set("random", s, 4, seed=9)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(MassactError, match=r"k \(random draw\)=17 is out of range; accepted: 1\.\.16"):
        random_k(20, 17, 0, exclude=top_k(s, 4))


@pytest.mark.parametrize("k,why", [(6, "is out of range"), (0, "is out of range"), (-1, "is out of range"),
                                   (True, "is not an integer"), (2.0, "is not an integer")])
def test_k_out_of_range(k, why):
    for fn in (top_k, low_k):
        with pytest.raises(MassactError, match=rf"k={k!r} {why}; accepted: (an integer )?1\.\.5"):
            fn(torch.zeros(5), k)


def test_jaccard_and_ratio():
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0 and jaccard([1], []) == 0.0
    assert mean_pairwise_jaccard([[1, 2]]) != mean_pairwise_jaccard([[1, 2]])  # NaN: no pair
    assert mean_pairwise_jaccard([[1, 2], [2, 3], [1, 2]]) == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert ratio_top1_median(torch.tensor([1.0, 1.0, 1.0, 10.0, 1.0])) == pytest.approx(10.0)
    assert ratio_top1_median(torch.tensor([0.0, 0.0, 3.0])) == float("inf")
    # An even count takes the lower of the two middle values (torch.median): 10 / 2.
    assert ratio_top1_median(torch.tensor([1.0, 2.0, 4.0, 10.0])) == pytest.approx(5.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_fast_pairwise_jaccard_equals_reference(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    sets = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(n)])
    assert mean_pairwise_jaccard_fast(sets, 8) == pytest.approx(mean_pairwise_jaccard(sets))
