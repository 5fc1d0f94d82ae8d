"""The pure statistics layer against hand computations (no model involved)."""

from __future__ import annotations

import os

import pytest
import torch

from massact_nn.errors import MassactError
from massact_nn.sites import Site, resolve_sites
from massact_nn.stats import ChannelStats, StatsAccumulator

SITES = [Site(0, "blocks.0", 6), Site(1, "blocks.1", 6)]


def _feed(acc: StatsAccumulator, data: dict, prompts: int) -> None:
    """data[module]: [steps, prompts, tokens, channels]."""
    acc.begin_batch(prompts)
    for step in range(acc.steps):
        for s in acc.sites:
            acc.update(s.module, step, data[s.module][step])
    acc.end_batch()


def _data(seed: int, prompts: int = 3, steps: int = 2, tokens: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {s.module: torch.randn(steps, prompts, tokens, 6, generator=g) for s in SITES}


def test_accumulator_matches_hand_computation():
    data = _data(0)
    acc = StatsAccumulator(SITES, steps=2, k=2, per_step=True)
    _feed(acc, data, 3)
    st = acc.result({"model": "m"})
    for s in SITES:
        x = data[s.module]  # [S, P, N, C]
        m = x.mean(2)  # token mean, [S, P, C]
        torch.testing.assert_close(st.stat(s.module, "abs_mean"), m.abs().mean((0, 1)))
        torch.testing.assert_close(st.stat(s.module, "mean_abs"), x.abs().mean(2).mean((0, 1)))
        torch.testing.assert_close(st.stat(s.module, "max_abs"), x.abs().amax((0, 1, 2)))
        torch.testing.assert_close(st.stat(s.module, "mean"), m.mean((0, 1)))
        torch.testing.assert_close(st.stat(s.module, "per_step_abs_mean"), m.abs().mean(1))
        with pytest.raises(MassactError, match="not one value per channel"):
            st.top(s.module, 2, "per_step_abs_mean")  # top_k would cut the steps axis
        # per-prompt top-k sets come from the prompt's own abs_mean over steps
        want = torch.topk(m.abs().mean(0), 2, dim=1).indices
        assert torch.equal(st.tensors[f"prompt_topk/{s.module}"], want)


def test_merge_of_shards_equals_whole():
    data = _data(1, prompts=4)
    whole = StatsAccumulator(SITES, steps=2, k=2, per_step=True)
    _feed(whole, data, 4)
    a = StatsAccumulator(SITES, steps=2, k=2, per_step=True)
    b = StatsAccumulator(SITES, steps=2, k=2, per_step=True)
    _feed(a, {k: v[:, :1] for k, v in data.items()}, 1)
    _feed(b, {k: v[:, 1:] for k, v in data.items()}, 3)
    meta = {"model": "m", "prompts": ["p"]}
    merged = a.result(meta).merge(b.result(meta))
    ref = whole.result(meta)
    for key, value in ref.tensors.items():
        torch.testing.assert_close(merged.tensors[key], value, rtol=1e-6, atol=1e-7, msg=key)
    for got, want in zip(merged.summary(), ref.summary()):
        assert got["top"] == want["top"]
        for key in ("ratio_top1_median", "jaccard_prompts", "jaccard_steps"):
            assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_merge_refuses_shards_measured_differently_and_keeps_each_prompts_seed():
    data = _data(1, prompts=2)
    shards = []
    for first in (0, 1):
        acc = StatsAccumulator(SITES, steps=2, k=2)
        _feed(acc, {k: v[:, first:first + 1] for k, v in data.items()}, 1)
        shards.append(acc)
    base = {"model": "m", "include_uncond": False, "guidance_scale": 3.5, "dtype": "float32",
            "generation": {"extra": {"max_sequence_length": 16}}}
    a = shards[0].result({**base, "prompts": ["a"], "seed": 0})
    b = shards[1].result({**base, "prompts": ["b"], "seed": 10})
    assert a.merge(b).meta["prompt_seeds"] == [0, 10]
    assert "reduction" not in a.merge(b).meta  # runs from before the setting existed
    # The reduction form does not change what was measured: shards merge, and say how they ran.
    ra = shards[0].result({**base, "prompts": ["a"], "seed": 0, "reduction": "auto",
                           "compiled_shapes": [[1, 64, 6]]})
    rb = shards[1].result({**base, "prompts": ["b"], "seed": 10, "reduction": "eager",
                           "compiled_shapes": []})
    assert (ra.merge(rb).meta["reduction"], ra.merge(rb).meta["compiled_shapes"]) == ("mixed", [[1, 64, 6]])
    same = ChannelStats(ra.sites, rb.tensors, {**ra.meta, "prompts": ["c"]})
    assert ra.merge(same).meta["reduction"] == "auto"
    for key, value in (("include_uncond", True), ("guidance_scale", None), ("dtype", "bfloat16"),
                       ("generation", {"extra": {"max_sequence_length": 64}})):
        other = shards[1].result({**base, key: value, "prompts": ["b"], "seed": 10})
        with pytest.raises(MassactError, match="cannot merge: .* differs"):
            a.merge(other)


def test_merge_joins_per_prompt_pipeline_lists_and_runs_without_the_signed_mean():
    data = _data(3, prompts=3)
    a, b = StatsAccumulator(SITES, steps=2, k=2), StatsAccumulator(SITES, steps=2, k=2)
    _feed(a, {k: v[:, :1] for k, v in data.items()}, 1)
    _feed(b, {k: v[:, 1:] for k, v in data.items()}, 2)

    def meta(prompts, negatives, scalar="x"):
        return {"model": "m", "prompts": prompts, "generation": {"extra": {
            "negative_prompt": negatives, "max_sequence_length": 16, "prompt_2": scalar}}}

    # One run split in two: each shard's per-prompt negatives cover its own prompts.
    ra, rb = a.result(meta(["p0"], ["n0"])), b.result(meta(["p1", "p2"], ["n1", "n2"]))
    merged = ra.merge(rb)
    assert merged.meta["generation"]["extra"] == {"negative_prompt": ["n0", "n1", "n2"],
                                                  "max_sequence_length": 16, "prompt_2": "x"}
    with pytest.raises(MassactError, match="generation extra 'prompt_2' differs \\('x' vs 'y'\\)"):
        ra.merge(b.result(meta(["p1", "p2"], ["n1", "n2"], scalar="y")))
    # A run from before the signed mean was kept (load() accepts it) still merges, without it.
    old = ChannelStats(ra.sites, {k: v for k, v in ra.tensors.items() if not k.startswith("mean/")}, ra.meta)
    both = old.merge(rb)
    assert not any(k.startswith("mean/") for k in both.tensors)
    torch.testing.assert_close(both.stat("blocks.0"), merged.stat("blocks.0"))


def test_a_subset_runs_site_errors_list_its_own_layers():
    subset = [Site(1, "blocks.1", 6), Site(3, "blocks.3", 6)]
    with pytest.raises(MassactError, match=r"or layer indices 1, 3$"):
        resolve_sites(subset, [0])
    assert resolve_sites(subset, [3]) == [subset[1]]
    with pytest.raises(MassactError, match=r"layer indices 0\.\.1"):
        resolve_sites(SITES, [5])


def test_summary_refuses_a_k_above_the_runs_own():
    acc = StatsAccumulator(SITES, steps=2, k=2)
    _feed(acc, _data(2), 3)
    st = acc.result()
    assert len(st.summary(1)[0]["top"]) == 1
    with pytest.raises(MassactError, match=r"k=3 is out of range; accepted: 1\.\.2"):
        st.summary(3)


def test_save_load_round_trip_is_exact(tmp_path):
    acc = StatsAccumulator(SITES, steps=2, k=3, per_step=True)
    _feed(acc, _data(2), 3)
    meta = {"model": "m", "architecture": "flux", "versions": {"torch": "2.13.0", "nnsight": "0.8.1",
            "diffusers": "0.42.1"}, "prompts": ["a", "b", "c"], "seed": 7, "height": 32, "width": 48,
            "guidance_scale": 3.5, "generation": {"steps": 2, "seed": 7, "extra": {"x": [1, 2]}},
            "dtype": "bfloat16", "device": "cpu"}
    st = acc.result(meta)
    st.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["stats.json", "stats.safetensors"]  # no temp files left
    back = ChannelStats.load(tmp_path)
    assert back.sites == st.sites
    assert back.meta == st.meta and back.meta["steps"] == 2 and back.meta["k"] == 3
    assert back.tensors.keys() == st.tensors.keys()
    for k in st.tensors:
        assert torch.equal(back.tensors[k], st.tensors[k])
    assert back.summary() == st.summary()


def test_summary_ratio_and_top():
    acc = StatsAccumulator(SITES, steps=1, k=2)
    x = torch.ones(1, 4, 6) * torch.tensor([1.0, 2.0, 1.0, 1.0, 100.0, 1.0])
    acc.begin_batch(1)
    for s in SITES:
        acc.update(s.module, 0, x)
    acc.end_batch()
    row = acc.result().summary()[0]
    assert row["top"][0] == 4
    assert row["ratio_top1_median"] == pytest.approx(100.0)
    assert row["jaccard_prompts"] is None  # one prompt: no pairs


def test_nonfinite_names_site_and_step():
    acc = StatsAccumulator(SITES, steps=3, k=2)
    acc.begin_batch(1)
    for step in range(3):
        for s in SITES:
            x = torch.randn(1, 4, 6)
            if s.module == "blocks.1" and step == 2:
                x[0, 1, 3] = float("nan")
            acc.update(s.module, step, x)
    acc.end_batch()
    with pytest.raises(MassactError, match=r"site blocks\.1, step 2.*try --dtype float32"):
        acc.result()
    with pytest.raises(MassactError, match=r"site blocks\.1, step 2.*overflows in float32 too"):
        acc.result({"dtype": "float32"})


def test_bad_inputs_are_named():
    with pytest.raises(MassactError, match=r"k=7 is out of range; accepted: 1\.\.6"):
        StatsAccumulator(SITES, steps=1, k=7)
    with pytest.raises(MassactError, match=r"k=0"):
        StatsAccumulator(SITES, steps=1, k=0)
    acc = StatsAccumulator(SITES, steps=1, k=2)
    acc.begin_batch(1)
    with pytest.raises(MassactError, match=r"unknown site 'blocks\.9'; accepted: blocks\.0, blocks\.1"):
        acc.update("blocks.9", 0, torch.zeros(1, 2, 6))
    with pytest.raises(MassactError, match=r"expected image tokens \[rows >= 1, tokens >= 1, 6\], "
                                           r"got \(1, 2, 5\)"):
        acc.update("blocks.0", 0, torch.zeros(1, 2, 5))
    with pytest.raises(MassactError, match=r"tokens >= 1, 6\], got \(1, 0, 6\)"):
        acc.update("blocks.0", 0, torch.zeros(1, 0, 6))  # no tokens: no mean to take
    with pytest.raises(MassactError, match="fewer transformer calls"):
        acc.end_batch()
    with pytest.raises(MassactError, match="unknown site 'nope'"):
        resolve_sites(SITES, ["nope"])
    assert resolve_sites(SITES, ["1", "blocks.0"]) == SITES


def test_site_selections_of_one_and_of_numpy_or_torch_ints():
    import numpy as np

    one = [SITES[1]]
    for wanted in ("blocks.1", 1, np.int64(1), torch.tensor(1), [np.int64(1)], torch.tensor([1])):
        assert resolve_sites(SITES, wanted) == one, wanted  # "blocks.1" is not 8 characters
    want = r"is neither a module path nor a layer index; accepted: module paths \(e\.g\. 'blocks\.0'\)"
    for bad in ([True], True, [1.0], [None]):  # True is not layer 1
        with pytest.raises(MassactError, match=want + r" or layer indices 0\.\.1"):
            resolve_sites(SITES, bad)


def test_load_missing_folder_is_clear(tmp_path):
    with pytest.raises(MassactError, match="no statistics in"):
        ChannelStats.load(tmp_path)


def test_step_sets_combine_two_calls_of_one_step():
    """Two calls of one step (true CFG, both branches counted) form one per-step top-k set."""
    acc = StatsAccumulator(SITES[:1], steps=1, k=1)
    acc.begin_batch(1)
    cond = torch.zeros(1, 2, 6)
    cond[..., 1] = 3.0
    uncond = torch.zeros(1, 2, 6)
    uncond[..., 4] = 2.5
    uncond[..., 1] = 2.0
    acc.update("blocks.0", 0, cond)
    acc.update("blocks.0", 0, uncond)
    acc.end_batch()
    # channel 1: 3 + 2 = 5 beats channel 4: 2.5; the second call alone would pick channel 4.
    assert acc.result().tensors["step_topk/blocks.0"].tolist() == [[[1]]]


def _hand(x: torch.Tensor, k: int):
    """Hand computation for x [step, call, prompt, token, channel] (every call counted)."""
    m = x.mean(3)  # [S, calls, P, C]
    per_step = m.abs().sum(1)  # [S, P, C]
    steps = torch.topk(per_step, k, dim=2).indices.transpose(0, 1)
    return m, steps, torch.topk(per_step.sum(0), k, dim=1).indices


@pytest.mark.parametrize("flush_every", [1, 3, 8, 32])
@pytest.mark.parametrize("layout", ["two_calls", "stacked_rows", "explicit_ids"])
def test_deferred_folding_is_exact_for_any_flush_interval(flush_every, layout):
    """Reductions are folded in batches; where the batches end must not change any result.

    Two samples per (step, prompt) fed as two calls per step (true CFG, both counted), as one call
    of [uncond; cond] rows (batched CFG), or with explicit, shuffled prompt ids; all against a hand
    computation of every statistic and of the per-step and per-prompt top-k sets.
    """
    g = torch.Generator().manual_seed(5)
    steps, prompts = 4, 3
    x = torch.randn(steps, 2, prompts, 7, 6, generator=g)  # [step, call, prompt, token, channel]
    acc = StatsAccumulator(SITES[:1], steps=steps, k=2, per_step=True, flush_every=flush_every)
    acc.begin_batch(prompts)
    for step in range(steps):
        if layout == "two_calls":
            for call in range(2):
                acc.update("blocks.0", step, x[step, call])
        elif layout == "stacked_rows":
            acc.update("blocks.0", step, x[step].reshape(2 * prompts, 7, 6))
        else:
            order = torch.tensor([4, 0, 2, 5, 1, 3])  # row i holds sample order[i] of [uncond; cond]
            acc.update("blocks.0", step, x[step].reshape(2 * prompts, 7, 6)[order], order % prompts)
    acc.end_batch()
    st = acc.result()
    m, want_steps, want_prompts = _hand(x, 2)
    torch.testing.assert_close(st.stat("blocks.0", "abs_mean"), m.abs().mean((0, 1, 2)))
    torch.testing.assert_close(st.stat("blocks.0", "mean_abs"), x.abs().mean(3).mean((0, 1, 2)))
    torch.testing.assert_close(st.stat("blocks.0", "max_abs"), x.abs().amax((0, 1, 2, 3)))
    torch.testing.assert_close(st.stat("blocks.0", "per_step_abs_mean"), m.abs().mean((1, 2)))
    assert torch.equal(st.tensors["step_topk/blocks.0"], want_steps)
    assert torch.equal(st.tensors["prompt_topk/blocks.0"], want_prompts)
    assert st.tensors["step_count/blocks.0"].tolist() == [6] * steps


def test_updates_may_differ_in_rows_within_a_flush():
    # A pipeline that drops its unconditional rows on later steps (e.g. CFG truncation).
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 2, 5, 6, generator=g)  # [step, call, prompt, token, channel]
    acc = StatsAccumulator(SITES[:1], steps=3, k=2, flush_every=4)
    acc.begin_batch(2)
    for step in range(3):
        acc.update("blocks.0", step, x[step, 0], torch.tensor([0, 1]))
        if step < 2:
            acc.update("blocks.0", step, x[step, 1, :1], torch.tensor([0]))
    acc.end_batch()
    st = acc.result()
    m = x.mean(3).abs()
    total = m[:, 0].sum((0, 1)) + m[:2, 1, 0].sum(0)
    torch.testing.assert_close(st.stat("blocks.0", "abs_mean"), total / 8)
    assert st.tensors["step_count/blocks.0"].tolist() == [3, 3, 2]


@pytest.mark.parametrize("flush_every", [1, 8])
def test_planted_nonfinite_value_is_reported_at_its_step(flush_every):
    x = torch.randn(4, 2, 5, 6)
    x[2, 1, 3, 4] = float("inf")
    x[3, 0, 0, 0] = float("nan")
    acc = StatsAccumulator(SITES[:1], steps=4, flush_every=flush_every)
    acc.begin_batch(2)
    for step in range(4):
        acc.update("blocks.0", step, x[step])
    acc.end_batch()
    for check in (acc.check_finite, acc.result):  # the public check and the one result() runs
        with pytest.raises(MassactError, match=r"site blocks.0, step 2 \(steps affected there: \[2, 3\]\)"):
            check()


def test_bad_prompt_ids_are_named_on_cpu_and_after_the_batch():
    acc = StatsAccumulator(SITES[:1], steps=1)
    acc.begin_batch(2)
    with pytest.raises(MassactError, match=r"prompt ids \[0, 2\] out of range; accepted: 0..1"):
        acc.update("blocks.0", 0, torch.zeros(2, 3, 6), torch.tensor([0, 2]))
    with pytest.raises(MassactError, match="prompt_of_row has shape"):
        acc.update("blocks.0", 0, torch.zeros(2, 3, 6), torch.tensor([0]))
    with pytest.raises(MassactError, match="3 rows for 2 prompts"):
        acc.update("blocks.0", 0, torch.zeros(3, 3, 6))


class _DeviceIds(torch.Tensor):
    """Prompt ids that claim not to be on the CPU, so their check is deferred like on a GPU."""

    @property
    def device(self):  # noqa: D102
        return torch.device("meta")


def test_prompt_ids_on_the_device_are_checked_by_result_without_an_earlier_read():
    acc = StatsAccumulator(SITES[:1], steps=1)
    acc.begin_batch(2)
    acc.update("blocks.0", 0, torch.ones(2, 3, 6), torch.tensor([0, 1]).as_subclass(_DeviceIds))
    acc.end_batch()  # no read of the device here: it would wait for the generation
    acc.begin_batch(3)  # a bad batch after a good one, of another size, is named
    acc.update("blocks.0", 0, torch.ones(2, 3, 6), torch.tensor([0, 5]).as_subclass(_DeviceIds))
    acc.end_batch()
    acc.begin_batch(2)  # and a later, correct batch does not hide it
    acc.update("blocks.0", 0, torch.ones(2, 3, 6), torch.tensor([0, 1]).as_subclass(_DeviceIds))
    acc.end_batch()
    with pytest.raises(MassactError, match=r"site blocks.0: a prompt_of_row id was out of range in "
                                           r"batch 1 \(3 prompts\); accepted: 0..2$"):
        acc.result()
    with pytest.raises(MassactError, match="a batch of this accumulator failed"):
        acc.result()  # its rows are partly counted: refused from now on


def test_prompt_ids_on_the_device_in_range_give_the_cpu_ids_result():
    results = []
    for cls in (torch.Tensor, _DeviceIds):
        acc = StatsAccumulator(SITES[:1], steps=1, k=2)
        acc.begin_batch(2)
        h = torch.arange(36.0).reshape(3, 2, 6)
        acc.update("blocks.0", 0, h, torch.tensor([1, 0, 1]).as_subclass(cls))
        acc.end_batch()
        results.append(acc.result())
    for name in ("abs_mean", "mean_abs", "max_abs"):
        assert torch.equal(results[0].stat(0, name), results[1].stat(0, name))


def test_batch_order_is_enforced():
    acc = StatsAccumulator(SITES, steps=2)
    with pytest.raises(MassactError, match="outside a batch"):
        acc.update("blocks.0", 0, torch.zeros(1, 2, 6))
    acc.begin_batch(1)
    acc.update("blocks.0", 1, torch.zeros(1, 2, 6))
    with pytest.raises(MassactError, match="step 0 after step 1"):
        acc.update("blocks.0", 0, torch.zeros(1, 2, 6))
    with pytest.raises(MassactError, match="still open"):
        acc.result()
    with pytest.raises(MassactError, match="still open"):
        acc.begin_batch(1)


def _alone(site: Site, steps: int, prompts: int, feed: list) -> ChannelStats:
    """Reference: the updates of one site in an accumulator of its own, folded at every update."""
    acc = StatsAccumulator([site], steps=steps, k=2, per_step=True, flush_every=1)
    acc.begin_batch(prompts)
    for step, h, ids in feed:
        acc.update(site.module, step, h, ids)
    acc.end_batch()
    return acc.result()


def _assert_each_site_as_alone(
    sites: list, steps: int, prompts: int, flush_every: int, calls: list, feeds: dict
) -> None:
    """Feed ``calls`` ([(site, (step, h, ids))], in that order) to one accumulator of all sites;
    every statistic, top-k set and count of every site must equal that site accumulated alone."""
    acc = StatsAccumulator(sites, steps=steps, k=2, per_step=True, flush_every=flush_every)
    acc.begin_batch(prompts)
    for s, (step, x, ids) in calls:
        acc.update(s.module, step, x, ids)
    acc.end_batch()
    got = acc.result()
    for s in sites:
        want = _alone(s, steps, prompts, feeds[s.module])
        for name in ("abs_mean", "mean_abs", "mean", "max_abs", "per_step_abs_mean"):
            torch.testing.assert_close(got.stat(s.module, name), want.stat(s.module, name),
                                       rtol=1e-6, atol=1e-7, msg=f"{s.module} {name}")
        for name in ("prompt_topk", "step_topk", "count", "step_count"):
            key = f"{name}/{s.module}"
            assert torch.equal(got.tensors[key], want.tensors[key]), key


@pytest.mark.parametrize("flush_every", [1, 2, 8])
@pytest.mark.parametrize("order", ["per_call", "site_by_site", "one_site_lags"])
def test_sites_folded_together_equal_each_site_alone(flush_every, order):
    """Sites of one width are folded in one go; mixed widths, layouts and orders must not leak.

    Two widths interleaved (6, 8, 6, 6), one site with explicit prompt ids and one fed two calls
    per step, in the order a generation feeds them, site by site, or with one site lagging (its
    group cannot fold until it catches up). Every statistic and top-k set of every site must equal
    that site accumulated alone.
    """
    g = torch.Generator().manual_seed(11)
    steps, prompts = 5, 2
    sites = [Site(0, "a.0", 6), Site(1, "a.1", 8), Site(2, "a.2", 6), Site(3, "a.3", 6)]
    feeds: dict[str, list] = {s.module: [] for s in sites}
    for step in range(steps):
        for s in sites:
            x = torch.randn(prompts, 4, s.channels, generator=g) * (1 + torch.arange(s.channels))
            ids = torch.tensor([1, 0]) if s.module == "a.2" else None
            feeds[s.module].append((step, x, ids))
            if s.module == "a.3":  # a second call of the same step
                feeds[s.module].append((step, torch.randn(prompts, 4, 6, generator=g), None))
    if order == "per_call":
        calls = [(s, f) for i in range(steps) for s in sites for f in feeds[s.module] if f[0] == i]
    elif order == "site_by_site":
        calls = [(s, f) for s in sites for f in feeds[s.module]]
    else:
        calls = [(s, f) for s in sites if s.module == "a.0" for f in feeds[s.module]]
        calls += [(s, f) for i in range(steps) for s in sites if s.module != "a.0"
                  for f in feeds[s.module] if f[0] == i]
    _assert_each_site_as_alone(sites, steps, prompts, flush_every, calls, feeds)


def test_fold_closes_the_batch_to_updates():
    acc = StatsAccumulator(SITES, steps=1)
    acc.begin_batch(1)
    for s in SITES:
        acc.update(s.module, 0, torch.ones(1, 2, 6))
    acc.fold()
    acc.fold()  # a second call changes nothing
    with pytest.raises(MassactError, match=r"update\(\) after fold\(\)"):
        acc.update("blocks.0", 0, torch.ones(1, 2, 6))
    acc.end_batch()
    assert acc.result().tensors["count/blocks.0"].tolist() == [1]
    with pytest.raises(MassactError, match="no batch is open"):
        acc.fold()


def test_results_split_per_site_save_and_load(tmp_path):
    """Per-site results are rows of one per-group tensor; saving must still write each one."""
    acc = StatsAccumulator(SITES, steps=2, per_step=True)
    _feed(acc, _data(3), 3)
    st = acc.result()
    back = ChannelStats.load(st.save(tmp_path))
    assert back.tensors.keys() == st.tensors.keys()
    for key, value in st.tensors.items():
        assert torch.equal(back.tensors[key], value), key


@pytest.mark.parametrize("seed", range(40))
def test_random_update_orders_equal_each_site_alone(seed):
    """Any interleaving of the sites' updates gives every site what it gets alone.

    Random schedules reach the fold's corner cases: a site folded alone because its group lags,
    sites between two foldable ones holding nothing, neighbours with equal updates but different
    open steps, mixed calls per step and explicit prompt ids.
    """
    rng = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=rng))  # noqa: E731
    steps, prompts, flush_every = 2 + pick(5), 1 + pick(2), 1 + pick(3)
    sites = [Site(i, f"b.{i}", 8 if i == 2 else 6) for i in range(5)]
    feeds = {}
    for s in sites:
        # Per site: 1-2 calls per step; rows one per prompt, [uncond; cond] (two per prompt,
        # default layout), or either at random per call; explicit prompt ids on some calls.
        calls, rows_kind, ids = 1 + pick(2), pick(3), pick(4) == 0
        feed = []
        for step in range(steps):
            for _ in range(calls):
                m = 2 if rows_kind == 1 or (rows_kind == 2 and pick(2)) else 1
                x = torch.randn(m * prompts, 3, s.channels, generator=rng).exp() * 3 ** pick(3)
                feed.append((step, x, torch.arange(m * prompts).flip(0) % prompts if ids else None))
        feeds[s.module] = feed
    queue = {m: list(f) for m, f in feeds.items()}
    by_module = {s.module: s for s in sites}
    calls = []
    while queue:
        m = sorted(queue)[pick(len(queue))]
        calls.append((by_module[m], queue[m].pop(0)))
        if not queue[m]:
            del queue[m]
    _assert_each_site_as_alone(sites, steps, prompts, flush_every, calls, feeds)


def test_a_failed_batch_refuses_further_use():
    """A batch that fails at end_batch has some rows counted: later results would be wrong."""
    acc = StatsAccumulator(SITES, steps=2)
    acc.begin_batch(1)
    for s in SITES:
        acc.update(s.module, 0, torch.ones(1, 2, 6))  # step 1 never comes
    with pytest.raises(MassactError, match=r"no activations seen at steps \[1\]"):
        acc.end_batch()
    for call in (lambda: acc.begin_batch(1), acc.result, acc.fold):
        with pytest.raises(MassactError, match="a batch of this accumulator failed .*a new StatsAccumulator"):
            call()


def test_prompt_ids_may_be_reused_by_the_caller():
    """Ids are held until the fold; a caller that refills its buffer must not change the result."""
    x = torch.randn(3, 2, 4, 6, generator=torch.Generator().manual_seed(4))  # [step, row, token, C]
    results = []
    for reuse in (False, True):
        acc = StatsAccumulator(SITES[:1], steps=3, k=2, flush_every=8)
        acc.begin_batch(2)
        buf = torch.tensor([1, 0])
        for step in range(3):
            ids = buf if reuse else torch.tensor([1, 0])
            acc.update("blocks.0", step, x[step], ids)
            buf[:] = torch.tensor([0, 0])  # the caller reuses its buffer
            buf[:] = torch.tensor([1, 0]) if step < 2 else buf
        acc.end_batch()
        results.append(acc.result().tensors)
    for key, value in results[0].items():
        assert torch.equal(results[1][key], value), key


def test_results_are_independent_of_the_accumulator():
    """Later batches, or edits of a result, change neither an earlier result nor the sums."""
    acc = StatsAccumulator(SITES, steps=1, k=2)

    def batch(x: float) -> None:
        acc.begin_batch(1)
        for s in SITES:
            acc.update(s.module, 0, torch.full((1, 4, 6), x))
        acc.end_batch()

    batch(1.0)
    first = acc.result()
    kept = {k: v.clone() for k, v in first.tensors.items()}
    batch(5.0)
    for key, value in kept.items():
        assert torch.equal(first.tensors[key], value), key
    second = acc.result()
    for value in second.tensors.values():
        value.zero_()
    third = acc.result()
    assert third.tensors["max_abs/blocks.0"].tolist() == [5.0] * 6
    assert third.tensors["abs_mean/blocks.1"].tolist() == [3.0] * 6


def test_repr_is_a_summary_and_a_merge_that_drops_per_step_curves_says_so():
    shards = []
    for per_step, first in ((True, 0), (False, 1)):
        acc = StatsAccumulator(SITES, steps=2, k=2, per_step=per_step)
        _feed(acc, {k: v[:, first:first + 1] for k, v in _data(4, prompts=2).items()}, 1)
        shards.append(acc.result({"model": "m", "prompts": [f"p{first}"], "seed": first}))
    r = repr(shards[0])
    assert r.startswith("ChannelStats(model='m', sites=2") and "per_step=True" in r and len(r) < 300
    with pytest.warns(UserWarning, match="only one shard kept per-step curves"):
        merged = shards[0].merge(shards[1])
    assert not merged.has_per_step


def test_merge_refuses_the_same_trajectory_twice_but_not_the_same_prompt_otherwise_conditioned():
    def shard(neg, seed=0):
        acc = StatsAccumulator(SITES, steps=2, k=2)
        _feed(acc, {k: v[:, :1] for k, v in _data(5, prompts=1).items()}, 1)
        return acc.result({"model": "m", "prompts": ["a cat"], "seed": seed,
                           "generation": {"extra": {"negative_prompt": [neg]}}})

    merged = shard("blurry").merge(shard("dark"))  # another negative prompt: another trajectory
    assert merged.meta["prompts"] == ["a cat", "a cat"]
    assert shard("blurry").merge(shard("blurry", seed=1)).meta["prompt_seeds"] == [0, 1]
    with pytest.raises(MassactError, match="the shards overlap"):
        shard("blurry").merge(shard("blurry"))


def test_the_accumulator_asks_for_the_compiled_kernel_for_planned_shapes_only(monkeypatch):
    import massact_nn.stats as st

    asked = []
    real = st.channel_sums
    monkeypatch.setattr(st, "channel_sums", lambda h: asked.append(("eager", h.shape[0])) or real(h))
    # The compiled kernel "runs" for two rows only; one row falls back (a refused layout).
    def reduce_sums(h, compiled):
        asked.append(("compiled", h.shape[0]))
        return real(h), h.shape[0] == 2

    monkeypatch.setattr(st, "reduce_sums", reduce_sums)
    acc = StatsAccumulator([Site(0, "a.0", 8)], steps=3, k=2, compiled=[(1, 16, 8), (2, 16, 8)])
    acc.begin_batch(2)
    acc.update("a.0", 0, torch.randn(1, 16, 8))
    acc.update("a.0", 1, torch.randn(2, 16, 8))
    acc.update("a.0", 2, torch.randn(2, 15, 8))
    acc.end_batch()
    assert asked == [("compiled", 1), ("compiled", 2), ("eager", 2)]
    assert acc.ran_compiled == {(2, 16, 8)}  # what ran, not what was planned


def test_a_dropped_accumulator_is_freed_without_the_garbage_collector(cyclic_garbage):
    def run():
        acc = StatsAccumulator(SITES, steps=2, k=2, per_step=True)
        _feed(acc, _data(1, prompts=2), 2)
        acc.result({"model": "m"})

    assert cyclic_garbage(run) == []
