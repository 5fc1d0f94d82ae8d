"""The operator log used by test_hot_paths and the benchmarks' ``--ops`` table."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from massact_nn.tracing.testing.dispatch import _TORCH_DIR, SYNC_WARNING, OpLog, SyncReports, waits_for_device

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
    with OpLog([HERE]).follow(model) as log:
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
    x = torch.ones(3)
    with OpLog([HERE]).follow(model) as log:
        model(x)
        ours_between_and_after(x)
        ours_waiting(x)
        model(x)
    assert dict(log.ours) == {"between": 4, "after": 0}
    assert dict(log.waits) == {f"between {HERE.name}:{ours_waiting.__code__.co_firstlineno + 1} index": 1}


def test_a_second_block_goes_on_counting_without_moving_again():
    model = torch.nn.Identity()
    x = torch.ones(3)
    log = OpLog([HERE])
    with log.follow(model):
        model(x)
        ours_between_and_after(x)
    with log.follow(model):
        ours_waiting(x)
    assert not model._forward_hooks and not model._forward_pre_hooks  # follow() removed its hooks
    line = ours_waiting.__code__.co_firstlineno + 1
    assert dict(log.ours) == {"between": 0, "after": 4}
    assert dict(log.waits) == {f"after {HERE.name}:{line} index": 1}


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

    def put(value, accumulate: bool = False):
        y = x.clone()
        mask = x > 1
        return lambda: y.index_put_((mask,), value, accumulate=accumulate)

    # x[mask] = scalar is a masked_fill in ATen; a tensor of values, or accumulating, needs nonzero.
    assert not waits(put(torch.tensor(0.0)))
    assert waits(put(torch.tensor([5.0, 6.0]))) and waits(put(torch.tensor(0.0), accumulate=True))


# Code that torch's own Python would run: a warning raised there names torch's file.
TORCH_SIDE = compile(f"def op():\n    warnings.warn({SYNC_WARNING!r} + ' (Triggered internally)')\n",
                     str(_TORCH_DIR / "_fake_sync_op.py"), "exec")
PIPELINE_SYNC = compile("op()\n", "<pipeline>", "exec")


def test_sync_reports_name_the_library_s_line_behind_torch_code():
    space: dict = {"warnings": warnings}
    exec(TORCH_SIDE, space)
    op = space["op"]

    def ours_syncing():
        op()

    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("always")
        with SyncReports([HERE]) as rep:
            ours_syncing()
            ours_syncing()
            exec(PIPELINE_SYNC, {"op": op})  # the pipeline's sync: counted, not ours
            warnings.warn("something else", stacklevel=1)  # passes through, not counted
    line = ours_syncing.__code__.co_firstlineno + 1
    assert rep.total == 3 and dict(rep.ours) == {f"{HERE.name}:{line}": 2}
    assert [str(w.message) for w in other] == ["something else"]
