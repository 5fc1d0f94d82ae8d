"""Pure segmentation math: token masks, IoU, K=2 clustering, foreground rules, the result type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massact_nn.clustering import cluster_mask, name_foreground, prepare_features, segment_tokens, vote
from massact_nn.errors import MassactError
from massact_nn.masks import (
    border_tokens,
    centre_blob,
    check_complement,
    check_mask_shape,
    colour_mask,
    downsample_majority,
    iou,
    load_png_mask,
    save_png_mask,
    upsample_nearest,
)
from massact_nn.segmentation_result import SegmentationResult

ROWS, COLS = 8, 8


def _planted(region: torch.Tensor, a: float = 3.0, channels: int = 3, noise: float = 0.1, seed: int = 0):
    """Tokens [64, channels]: +a on the region, -a elsewhere on every channel, plus noise."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(region.flatten(), a, -a)[:, None]
    return sign.repeat(1, channels) + noise * torch.randn(region.numel(), channels, generator=g)


def _box(r0, r1, c0, c1):
    m = torch.zeros(ROWS, COLS, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


# -- masks ---------------------------------------------------------------------------------------
def test_iou_on_hand_made_masks():
    a, b = _box(0, 2, 0, 2), _box(1, 3, 0, 2)  # 4 and 4 tokens, overlap 2
    assert iou(a, b) == pytest.approx(2 / 6)
    assert iou(a, a) == 1.0
    assert iou(a, ~a) == 0.0
    empty = torch.zeros(ROWS, COLS, dtype=torch.bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, a) == 0.0
    with pytest.raises(MassactError, match="shapes differ"):
        iou(a, a[:4])


def test_upsample_then_downsample_is_identity_and_majority_rule():
    m = _box(2, 5, 1, 4)
    up = upsample_nearest(m, 32, 32)
    assert up.shape == (32, 32) and up[8:20, 4:16].all() and up.sum() == m.sum() * 16
    assert torch.equal(downsample_majority(up, ROWS, COLS), m)
    px = torch.zeros(4, 4, dtype=torch.bool)
    px[0, 0] = px[0, 1] = True  # half of the top-left 2x2 block: a tie counts as foreground
    px[2, 2] = True  # a quarter of the bottom-right block: background
    assert downsample_majority(px, 2, 2).tolist() == [[True, False], [False, False]]
    with pytest.raises(MassactError, match="multiple"):
        upsample_nearest(m, 30, 32)


def test_complement_check_and_shape_check():
    m = _box(2, 5, 1, 4)
    check_complement(m, ~m)
    with pytest.raises(MassactError, match="overlap"):
        check_complement(m, ~m | _box(2, 3, 1, 2))
    with pytest.raises(MassactError, match="neither"):
        check_complement(m, ~m & ~_box(0, 1, 7, 8))
    with pytest.raises(MassactError, match=r"shape \(8, 7\); accepted: \(8, 8\)"):
        check_mask_shape(m[:, :7], (8, 8))


def test_png_mask_roundtrip_and_missing_file(tmp_path):
    m = upsample_nearest(_box(2, 5, 1, 4), 32, 32)
    save_png_mask(tmp_path / "m.png", m)
    assert torch.equal(load_png_mask(tmp_path / "m.png", (32, 32)), m)
    with pytest.raises(MassactError, match="accepted: \\(16, 16\\)"):
        load_png_mask(tmp_path / "m.png", (16, 16))
    with pytest.raises(MassactError, match="does not exist"):
        load_png_mask(tmp_path / "nope.png")


def test_border_centre_and_colour_masks():
    ring = border_tokens(ROWS, COLS)
    assert ring.sum() == 4 * ROWS - 4 and not ring[1:-1, 1:-1].any()
    blob = centre_blob(ROWS, COLS)
    assert blob[3:5, 3:5].all() and not (blob & ring).any()
    assert torch.equal(blob, blob.flip(0)) and torch.equal(blob, blob.T)
    img = torch.zeros(3, 4, 4)
    img[0, :2] = 1.0  # red top half on black
    cm = colour_mask(img, torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 0, 0]))
    assert cm[:2].all() and not cm[2:].any()


# -- clustering ----------------------------------------------------------------------------------
def test_planted_region_recovered_exactly():
    region = _box(2, 6, 1, 4)
    mask = cluster_mask(_planted(region), ROWS, COLS)
    assert torch.equal(mask, region)


def test_a_tie_under_every_rule_names_label_1():
    # 2 x 2 grid: every token is on the border, the clusters are the same size and norm.
    labels = np.array([0, 1, 1, 0])
    for rule in ("border", "minority", "magnitude"):
        assert name_foreground(labels, np.ones((4, 3)), 2, 2, rule) == 1
        assert name_foreground(1 - labels, np.ones((4, 3)), 2, 2, rule) == 1
    raw = np.ones((4, 3))
    raw[labels == 0] *= 2  # label 0 has the larger norm: magnitude decides once the others tie
    assert name_foreground(labels, raw, 2, 2, "border") == 0


def test_foreground_rules_differ_as_documented():
    # A big central region (36 of 64 tokens, the majority) with a small norm, surrounded by a
    # ring with a large norm: border -> the centre, minority -> the ring, magnitude -> the ring.
    centre = _box(1, 7, 1, 7)
    x = torch.where(centre.flatten(), 1.0, 5.0)[:, None].repeat(1, 2)
    assert torch.equal(cluster_mask(x, ROWS, COLS, foreground="border"), centre)
    assert torch.equal(cluster_mask(x, ROWS, COLS, foreground="minority"), ~centre)
    assert torch.equal(cluster_mask(x, ROWS, COLS, foreground="magnitude"), ~centre)
    # Magnitude follows the norm, not the position: the centre now has the larger values.
    y = torch.where(centre.flatten(), 5.0, 1.0)[:, None].repeat(1, 2)
    assert torch.equal(cluster_mask(y, ROWS, COLS, foreground="magnitude"), centre)


def test_border_rule_and_its_tie_fallback():
    left = _box(0, 8, 0, 3)  # a band on the left edge: fewer ring tokens than the rest
    x = torch.where(left.flatten(), 1.0, -1.0)[:, None]
    ring = border_tokens(ROWS, COLS)
    assert int((left & ring).sum()) < int((~left & ring).sum())
    assert torch.equal(cluster_mask(x, ROWS, COLS, foreground="border"), left)
    # Top half: ring counts tie (14 each) and sizes tie, so the chain ends at magnitude.
    half = _box(0, 4, 0, 8)
    z = torch.where(half.flatten(), 2.0, -1.0)[:, None]
    assert int((half & ring).sum()) == int((~half & ring).sum())
    assert torch.equal(cluster_mask(z, ROWS, COLS, foreground="border"), half)


def test_centring_changes_nothing_and_standardising_reweights():
    region = _box(2, 6, 2, 6)
    x = _planted(region) + 100.0
    raw = cluster_mask(x, ROWS, COLS, features="raw")
    assert torch.equal(raw, cluster_mask(x, ROWS, COLS, features="centred"))
    np.testing.assert_allclose(prepare_features(x, "centred").mean(0), 0, atol=1e-9)
    # One informative channel (+-1) next to a loud uninformative one (uniform in +-10): raw
    # distances follow the loud channel, standardised ones the informative two-mode split.
    g = torch.Generator().manual_seed(1)
    informative = torch.where(region.flatten(), 1.0, -1.0) + 0.05 * torch.randn(64, generator=g)
    loud = 20.0 * (torch.rand(64, generator=g) - 0.5)
    x2 = torch.stack([informative, loud], 1)
    assert not torch.equal(cluster_mask(x2, ROWS, COLS, features="raw"), region)
    assert torch.equal(cluster_mask(x2, ROWS, COLS, features="standardised"), region)


def test_vote_and_concat_aggregation():
    a, b, c = _box(2, 6, 2, 6), _box(2, 6, 2, 5), _box(3, 6, 2, 6)
    assert torch.equal(vote([a, b, c]), a & (b | c) | (b & c))
    assert not vote([a, ~a]).any()  # a tie goes to the background
    region = _box(2, 6, 1, 4)
    blocks = [_planted(region, seed=s) for s in range(3)]
    for agg in ("vote", "concat"):
        mask, each = segment_tokens(blocks, ROWS, COLS, aggregation=agg)
        assert torch.equal(mask, region) and len(each) == 3


def test_single_cluster_gives_all_background():
    x = torch.ones(64, 2)
    m = cluster_mask(x, ROWS, COLS)
    assert m.shape == (ROWS, COLS) and not m.any()


@pytest.mark.parametrize("kw, match", [
    ({"features": "zscore"}, "unknown feature option 'zscore'; accepted: raw, centred, standardised"),
    ({"foreground": "left"}, "unknown foreground rule 'left'; accepted: border, minority, magnitude"),
    ({"aggregation": "mean"}, "unknown aggregation 'mean'; accepted: vote, concat"),
])
def test_bad_options_name_value_and_accepted(kw, match):
    with pytest.raises(MassactError, match=match):
        segment_tokens([torch.randn(64, 2)], ROWS, COLS, **kw)


def test_wrong_token_count_is_one_clear_error():
    with pytest.raises(MassactError, match=r"accepted: \[64 tokens, channels\]"):
        cluster_mask(torch.randn(60, 2), ROWS, COLS)


# -- result --------------------------------------------------------------------------------------
def _result():
    region = _box(2, 6, 1, 4)
    return SegmentationResult(
        aggregated={"top": region, "all": _box(2, 6, 1, 5)},
        per_block={"top/transformer_blocks.0/1": region, "all/transformer_blocks.0/1": ~region},
        channels={"top/transformer_blocks.0": torch.tensor([7]),
                  "all/transformer_blocks.0": torch.arange(32)},
        baselines={"centre": centre_blob(ROWS, COLS)}, primary="top", image_size=(32, 32),
        image=torch.rand(3, 32, 32), meta={"model": "m", "steps": [1], "t": None},
    )


def test_result_saves_and_loads_back_exactly(tmp_path):
    r = _result()
    r.save(tmp_path / "run")
    back = SegmentationResult.load(tmp_path / "run")
    assert back.primary == r.primary and back.image_size == r.image_size and back.meta == r.meta
    for name in ("aggregated", "per_block", "channels", "baselines"):
        a, b = getattr(r, name), getattr(back, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                            for k in a)
    assert torch.equal(back.image, r.image)
    with pytest.raises(MassactError, match="no segmentation result"):
        SegmentationResult.load(tmp_path / "empty")


def test_result_iou_pixel_mask_and_overlay():
    r = _result()
    truth = upsample_nearest(r.mask, 32, 32)
    scores = r.iou(truth)
    assert scores["top"] == 1.0 and scores["all"] == pytest.approx(12 / 16)
    assert set(scores) == {"top", "all", "centre"}
    check_complement(r.mask, r.background)
    assert r.overlay().shape == (3, 32, 32)
    with pytest.raises(MassactError, match=r"ground-truth mask has shape \(8, 8\); accepted: \(32, 32\)"):
        r.iou(r.mask)
    with pytest.raises(MassactError, match="unknown channel set 'nope'"):
        r.set_mask("nope")
