"""The synthetic shapes world: determinism, exact masks, captions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from massact_nn import world as W


def test_same_seed_same_batch_and_different_seed_differs():
    a = W.World(0).sample(16, seed=5)
    b = W.World(99).sample(16, seed=5)
    c = W.World(0).sample(16, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_internal_stream_is_deterministic_by_world_seed():
    w1, w2 = W.World(3), W.World(3)
    first = w1.sample(8)
    second = w1.sample(8)
    np.testing.assert_array_equal(first.images, w2.sample(8).images)
    assert not np.array_equal(first.images, second.images)


def test_batch_shapes_and_ranges():
    b = W.World(0).sample(32, seed=1)
    assert b.images.shape == (32, 3, W.SIZE, W.SIZE) and b.images.dtype == np.float32
    assert b.masks.shape == (32, W.SIZE, W.SIZE) and b.masks.dtype == bool
    assert b.images.min() >= -1.0 and b.images.max() <= 1.0
    assert len(b) == 32
    for key in ("fg_colour", "shape", "bg_colour"):
        assert b.attributes[key].shape == (32,)


def test_foreground_pixels_have_exactly_the_foreground_colour():
    b = W.World(0).sample(64, seed=2)
    for i in range(64):
        fg = W.RGB[b.attributes["fg_colour"][i]]
        pix = b.images[i][:, b.masks[i]]  # [3, n_fg]
        np.testing.assert_allclose(pix, np.clip(fg, -1, 1)[:, None].repeat(pix.shape[1], 1))


def test_background_pixels_are_near_the_background_colour_and_far_from_fg():
    b = W.World(0).sample(64, seed=3)
    for i in range(64):
        bg = W.RGB[b.attributes["bg_colour"][i]]
        fg = W.RGB[b.attributes["fg_colour"][i]]
        pix = b.images[i][:, ~b.masks[i]].T  # [n_bg, 3]
        assert np.abs(pix.mean(0) - np.clip(bg, -1, 1)).max() < 0.1
        # Every background pixel is closer to its bg colour than to the fg colour.
        assert (np.linalg.norm(pix - bg, axis=1) < np.linalg.norm(pix - fg, axis=1)).all()


def test_foreground_and_background_colours_always_differ():
    b = W.World(0).sample(2000, seed=4)
    assert (b.attributes["fg_colour"] != b.attributes["bg_colour"]).all()
    # All four shapes and all colours occur.
    assert set(b.attributes["shape"].tolist()) == set(range(len(W.SHAPES)))
    assert set(b.attributes["fg_colour"].tolist()) == set(range(len(W.COLOURS)))


def test_shapes_are_large_and_mutually_distinct():
    n = len(W.SHAPES)
    attrs = {
        "fg_colour": np.zeros(n, dtype=int),
        "shape": np.arange(n),
        "bg_colour": np.ones(n, dtype=int),
        "half": np.full(n, 10),
    }
    _, masks = W.render(attrs)
    area = W.SIZE * W.SIZE
    assert (masks.reshape(n, -1).sum(1) > 0.15 * area).all()
    for a, b in itertools.combinations(range(n), 2):
        assert (masks[a] ^ masks[b]).sum() > 0.07 * area, (W.SHAPES[a], W.SHAPES[b])


def test_each_shape_name_draws_that_shape():
    # Centred, half-extent 10 px on the 32 px canvas (centre 16): geometric facts per name.
    n = len(W.SHAPES)
    attrs = {"fg_colour": np.zeros(n, dtype=int), "shape": np.arange(n), "bg_colour": np.ones(n, dtype=int),
             "half": np.full(n, 10), "dx": np.zeros(n), "dy": np.zeros(n)}
    _, masks = W.render(attrs)
    m = dict(zip(W.SHAPES, masks, strict=True))
    assert m["square"][6:26, 6:26].all() and m["square"].sum() == 20 * 20  # corners included
    assert not m["circle"][7, 7] and m["circle"][16, 7] and m["circle"].sum() == pytest.approx(
        np.pi * 9 ** 2, rel=0.05)  # radius 0.9 x half, no corners
    assert m["triangle"][24, 5] and not m["triangle"][8, 5] and m["triangle"][7, 16]  # apex up
    assert m["cross"][16, 7] and m["cross"][7, 16] and not m["cross"][8, 8]  # arms, no corners


def test_render_without_rng_is_noise_free_and_matches_masks():
    b = W.World(0).sample(16, seed=7)
    images, masks = W.render(b.attributes)
    np.testing.assert_array_equal(masks, b.masks)
    np.testing.assert_array_equal(images[:, :, masks[0]][0], b.images[:, :, masks[0]][0])
    assert np.abs(images - b.images).max() < 0.15  # only the faint background noise differs


def test_captions_parse_back_to_attributes():
    b = W.World(0).sample(64, seed=8)
    for i, cap in enumerate(b.captions):
        parsed = W.parse_caption(cap)
        assert parsed == {k: int(b.attributes[k][i]) for k in ("fg_colour", "shape", "bg_colour")}
        assert W.caption_for(**parsed) == cap
    assert W.caption_for(0, 0, 2) == "a red circle on a blue background"


@pytest.mark.parametrize(
    "bad", ["", "a red circle", "a purple circle on a blue background", "the red circle on a blue bg",
            "a red circle on a red background"]  # the world never draws a shape on its own colour
)
def test_parse_caption_rejects_non_world_text(bad):
    with pytest.raises(ValueError):
        W.parse_caption(bad)


def test_all_captions_enumerates_every_valid_triple_once():
    caps = W.all_captions()
    assert len(caps) == len(set(caps)) == len(W.COLOURS) * len(W.SHAPES) * (len(W.BG_COLOURS) - 1)
    assert all(W.parse_caption(c)["fg_colour"] != W.parse_caption(c)["bg_colour"] for c in caps)


def test_world_module_stays_free_of_heavy_dependencies():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(W))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"diffusers", "transformers", "nnsight", "plotly", "torch"}
