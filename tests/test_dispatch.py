"""The operator log used by test_hot_paths and the benchmarks' ``--ops`` table."""

from __future__ import annotations

from pathlib import Path

import torch
from massact_nn.tracing.testing.dispatch import OpLog, waits_for_device

HERE = Path(__file__)
# Code compiled under another file name plays the pipeline: its operators are not ours.
PIPELINE = compile("for _ in range(2):\n    model(x)\n    x = x * 0.5\n", "<pipeline>", "exec")


def ours_between_and_after(x: torch.Tensor) -> None:
    (x + 1).sum()


def ours_waiting(x: torch.Tensor) -> None:
    x[x > 0]


def test_ops_are_split_by_origin_and_phase():
    model = torch.nn.Linear(3, 3)
    x = torch.ones(2, 3)
    calls: list[int] = []

    def inside(_mod, _inp, out):  # our hook inside each call: two operators (mul, add)
        calls.append(1)
        return out * 2 + 1

    model.register_forward_hook(inside)
    log = OpLog([HERE])
    model.register_forward_pre_hook(log.enter_call)
    model.register_forward_hook(log.exit_call)
    with log:
        x = x - 1  # before the first call: 1
        exec(PIPELINE, {"model": model, "x": x})
        ours_between_and_after(x)  # after the last call: add, sum
        ours_waiting(x)  # after, and waits for a GPU: gt, index (a boolean mask)
    assert log.calls == 2 and len(calls) == 2
    assert dict(log.ours) == {"before": 1, "call": 4, "between": 0, "after": 4}
    line = ours_waiting.__code__.co_firstlineno + 1
    assert dict(log.waits) == {f"after {HERE.name}:{line} index": 1}
    # The pipeline's own operators: per call a Linear (t, addmm) and the x * 0.5 after it.
    assert log.total == 1 + 2 * (2 + 2 + 1) + 2 + 2


def test_between_calls_is_not_after():
    model = torch.nn.Identity()
    log = OpLog([HERE])
    model.register_forward_pre_hook(log.enter_call)
    model.register_forward_hook(log.exit_call)
    x = torch.ones(3)
    with log:
        model(x)
        ours_between_and_after(x)
        ours_waiting(x)
        model(x)
    assert dict(log.ours) == {"between": 4, "after": 0}
    assert dict(log.waits) == {f"between {HERE.name}:{ours_waiting.__code__.co_firstlineno + 1} index": 1}


def test_device_waits_are_told_from_sizes_known_in_advance():
    def waits(fn) -> bool:
        seen = []

        class Spy(OpLog):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(waits_for_device(func, args, kwargs or {}))
                return func(*args, **(kwargs or {}))

        with Spy([HERE]):
            fn()
        return any(seen)

    x = torch.arange(4.0)
    ids = torch.tensor([0, 2])
    assert waits(lambda: x[x > 1]) and waits(lambda: x.nonzero()) and waits(lambda: x.unique())
    assert waits(lambda: float(x.sum())) and waits(lambda: x.repeat_interleave(ids.long().repeat(2)))
    assert waits(lambda: x.masked_select(x > 1)) and waits(lambda: torch.equal(x, x))
    assert not waits(lambda: x[ids]) and not waits(lambda: x.index_fill(0, ids, 0.0))
    assert not waits(lambda: x.repeat_interleave(torch.tensor([1, 1, 1, 1]), output_size=4))
    assert not waits(lambda: torch.where(x > 1, x, 0.0)) and not waits(lambda: x.topk(2))
