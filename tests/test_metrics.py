"""Image distances and image/mask helpers (pure)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from massact_nn.errors import MassactError
from massact_nn.images import from_pil, grid, load_png, mask_from_png, save_png, to_pil, upsample_mask
from massact_nn.metrics import inside_outside, masked_mse, mse, psnr, summarise


def test_mse_and_psnr_known_values():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.5  # every pixel of image 0 off by 0.5
    assert mse(a, b).tolist() == [0.25, 0.0]
    p = psnr(a, b)
    assert p[0].item() == pytest.approx(10 * math.log10(1 / 0.25))
    assert math.isinf(p[1].item())
    assert summarise(p[1:]) is None  # identical images: no finite PSNR in JSON


def test_masked_distances_split_inside_and_outside():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[..., :2, :] = 1.0  # differs only on the top half
    top = torch.zeros(4, 4, dtype=torch.bool)
    top[:2] = True
    d = inside_outside(a, b, top)
    assert d["inside"].item() == 1.0 and d["outside"].item() == 0.0
    assert d["all"].item() == 0.5
    assert math.isnan(masked_mse(a, b, torch.zeros(4, 4, dtype=torch.bool)).item())


def test_per_image_masks_apply_to_their_own_image():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0, :, 0, 0] = 1.0  # image 0 differs at one pixel, image 1 at another
    b[1, :, 3, 3] = 2.0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True  # image 0's mask covers its own difference
    masks[1, :2] = True  # image 1's mask misses it (a shared mask taken from image 0 would not)
    d = inside_outside(a, b, masks)
    assert d["inside"].tolist() == [1.0, 0.0]
    assert d["outside"].tolist() == [0.0, 4.0 / 8]
    assert d["all"].tolist() == [1.0 / 16, 4.0 / 16]


def test_summarise_skips_nan_and_refuses_non_finite():
    assert summarise(torch.tensor([1.0, math.nan, 3.0])) == 2.0
    assert summarise(torch.tensor([math.nan, math.nan])) is None
    assert summarise(torch.tensor([1.0, math.inf])) is None
    assert summarise(torch.tensor([0.25, 0.75])) == 0.5


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(MassactError, match="shapes differ"):
        mse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8))
    with pytest.raises(MassactError, match="mask shape"):
        masked_mse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.ones(3, 3, dtype=torch.bool))


def test_png_round_trip_is_exact_on_8bit_values(tmp_path):
    x = torch.randint(0, 256, (3, 5, 7)).float() / 255
    assert torch.equal(from_pil(to_pil(x)), x)
    save_png(tmp_path / "x.png", x)
    assert torch.equal(load_png(tmp_path / "x.png"), x)


def test_grid_places_tiles_row_major():
    imgs = torch.stack([torch.full((3, 2, 2), float(i) / 4) for i in range(4)])
    g = grid(imgs, ncols=2, pad=1, value=1.0)
    assert g.shape == (3, 5, 5)
    assert g[0, 0, 0] == 0.0 and g[0, 0, 3] == 0.25 and g[0, 3, 0] == 0.5 and g[0, 3, 3] == 0.75
    assert g[0, 2, 2] == 1.0  # padding


def test_mask_png_resizes_to_token_grid_and_back(tmp_path):
    arr = torch.zeros(32, 32, dtype=torch.uint8)
    arr[:, :16] = 255  # left half white
    Image.fromarray(arr.numpy()).save(tmp_path / "m.png")
    m = mask_from_png(tmp_path / "m.png", (4, 8))
    assert m.shape == (4, 8) and m[:, :4].all() and not m[:, 4:].any()
    up = upsample_mask(m, (32, 64))
    assert up.shape == (32, 64) and up[:, :32].all() and not up[:, 32:].any()
    with pytest.raises(MassactError, match="multiple"):
        upsample_mask(m, (30, 64))


def test_soft_pixel_masks_are_refused_not_read_as_everywhere():
    a, b = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    for soft in (torch.full((4, 4), 0.1), torch.full((4, 4), 255.0)):
        with pytest.raises(MassactError, match="pixel mask has values other than 0 and 1"):
            masked_mse(a, b, soft)
        with pytest.raises(MassactError, match="pixel mask has values other than 0 and 1"):
            inside_outside(a, b, soft)
    m = torch.zeros(4, 4)
    m[1:3] = 1  # 0/1 floats are a mask
    out = inside_outside(a, b, m)
    err = (a - b).pow(2).mean(1)
    torch.testing.assert_close(out["inside"], err[:, 1:3].flatten(1).mean(1))
    torch.testing.assert_close(out["outside"], torch.cat([err[:, :1], err[:, 3:]], 1).flatten(1).mean(1))
