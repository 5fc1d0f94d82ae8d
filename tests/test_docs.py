"""The code on the documentation pages runs, and does what the page says."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest
import torch
from massact_nn.tracing.model import toy_path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _snippets(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def _run(code: str, name: str, ns: dict) -> None:
    # nnsight reads a trace's source through linecache, as it does for notebook cells.
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    exec(compile(code, name, "exec"), ns)


@pytest.mark.skipif(toy_path() is None, reason="the toy model is not shipped in this checkout")
def test_performance_page_snippets_measure_and_zero_the_top_channels():
    from massact_nn.tracing.stats import StatsConfig, collect_stats

    stats_code, zero_code, *_ = _snippets("performance.md")
    ns: dict = {}
    _run(stats_code, "<docs/performance.md#stats>", ns)
    plan, prompts, model = ns["plan"], ns["prompts"], ns["model"]
    assert plan.gen.height == 32 and plan.n_img == 256  # the toy's own size, not the pipeline's 1024
    # The hand-written trace gives what the library's own collect_stats gives.
    want = collect_stats(model, prompts, StatsConfig(plan.gen, k=4, progress=False))
    for s in plan.sites:
        torch.testing.assert_close(ns["stats"].stat(s.module), want.stat(s.module), rtol=1e-5, atol=1e-6)

    # The zeroing snippet; a check added around it: the chosen channels of each site's edited
    # output read 0 where the next block takes them in.
    order = [s.module for s in plan.sites]
    seen: dict[str, torch.Tensor] = {}

    def record(prev):
        def hook(_m, args, kwargs):
            seen[prev] = (kwargs.get("hidden_states", args[0] if args else None)).detach().clone()
        return hook

    tr = model.pipeline.transformer
    handles = [tr.get_submodule(nxt).register_forward_pre_hook(record(prev), with_kwargs=True)
               for prev, nxt in zip(order, order[1:])]
    try:
        _run(zero_code, "<docs/performance.md#zero>", ns)
    finally:
        for h in handles:
            h.remove()
    assert ns["images"].shape == (len(prompts), 3, 32, 32) and torch.isfinite(ns["images"]).all()
    for prev in order[:-1]:
        top = ns["top"][prev]
        img = seen[prev][:, -plan.n_img:]  # the image stream the next block reads
        assert img[..., top].abs().max() == 0, prev
        assert img.abs().amax((0, 1)).gt(0).sum() > len(top)  # and not everything is zero
