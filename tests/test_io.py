"""Atomic writes: a result file is either the old one or the complete new one, never half."""

from __future__ import annotations

import os
import stat

import pytest

from massact_nn._io import atomic_write, load_json, save_json


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "meta.json"
    save_json(path, {"v": 1})

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"v": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert load_json(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_the_target_changes_only_when_the_write_is_complete(tmp_path):
    path = tmp_path / "meta.json"
    save_json(path, {"v": 1})
    seen = []

    def write(tmp: str) -> None:
        assert tmp != str(path) and os.path.dirname(tmp) == str(tmp_path)  # same folder: rename
        with open(tmp, "w") as f:
            f.write('{"v": 2}')
        seen.append(load_json(path))  # while writing, readers still see the old file

    atomic_write(path, write)
    assert seen == [{"v": 1}] and load_json(path) == {"v": 2}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp makes 0600 files; results are shared, so they get 0666 minus the umask.
    old = os.umask(0o022)
    try:
        save_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_tensors_that_share_memory_are_saved_apart(tmp_path):
    import torch

    from massact_nn._io import load_tensors, save_tensors

    ids = torch.tensor([3, 1, 2])
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a/ids": ids, "b/ids": ids, "whole": base, "row": base[1], "empty": torch.zeros(0)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_statistics_run_saved_over_a_language_model_run_is_not_read_as_one(tmp_path):
    import torch

    from massact_nn.errors import MassactError
    from massact_nn.llm_stats import LLMStats, TokenPositions
    from massact_nn.sites import Site
    from massact_nn.stats import ChannelStats, StatsAccumulator

    acc = StatsAccumulator([Site(0, "layers.0", 4)], steps=1, k=2)
    acc.begin_batch(1)
    acc.update("layers.0", 0, torch.randn(1, 3, 4))
    acc.end_batch()
    st = acc.result({"model": "m"})
    LLMStats(channels=st, positions=TokenPositions(layers=[], tokens=[])).save(tmp_path)
    assert LLMStats.load(tmp_path).channels.meta["model"] == "m"
    ChannelStats(sites=st.sites, tensors=st.tensors, meta={"model": "a DiT"}).save(tmp_path)
    assert not (tmp_path / "llm.json").exists()
    with pytest.raises(MassactError):
        LLMStats.load(tmp_path)


def test_a_segmentation_load_of_another_results_folder_names_it(tmp_path):
    from massact_nn._io import save_run
    from massact_nn.errors import MassactError
    from massact_nn.segmentation_result import SegmentationResult

    save_run(tmp_path, {}, {}, {"model": "m", "mode": "zero"})  # the shape of a probe's folder
    with pytest.raises(MassactError, match="holds another kind of result, not a segmentation"):
        SegmentationResult.load(tmp_path)


def _die_on(monkeypatch, module, name: str) -> None:
    """Make ``module.save_json`` fail when it writes ``name``, as a killed process would."""
    real = module.save_json

    def save_json(path, obj):
        if os.path.basename(str(path)) == name:
            raise KeyboardInterrupt("killed")
        real(path, obj)

    monkeypatch.setattr(module, "save_json", save_json)


def test_a_statistics_save_that_dies_over_an_older_run_leaves_no_readable_mix(tmp_path, monkeypatch):
    import torch

    import massact_nn.stats as stats_mod
    from massact_nn.errors import MassactError
    from massact_nn.sites import Site
    from massact_nn.stats import ChannelStats, StatsAccumulator

    def run(prompts: int) -> ChannelStats:
        acc = StatsAccumulator([Site(0, "layers.0", 4)], steps=1, k=2)
        acc.begin_batch(prompts)
        acc.update("layers.0", 0, torch.randn(prompts, 3, 4))
        acc.end_batch()
        return acc.result({"prompts": ["p"] * prompts})

    run(1).save(tmp_path)
    _die_on(monkeypatch, stats_mod, "stats.json")
    with pytest.raises(KeyboardInterrupt):
        run(3).save(tmp_path)  # the new tensors are written, then the process dies
    with pytest.raises(MassactError, match="no statistics in"):
        ChannelStats.load(tmp_path)  # not the old metadata over the new tensors


def test_a_probe_or_segmentation_save_that_dies_is_refused_on_load(tmp_path, monkeypatch):
    import numpy as np
    import torch
    from massact_nn.tracing.probes.transport_parts import _mask_file

    import massact_nn._io as io
    import massact_nn.segmentation_result as seg_mod
    from massact_nn.disruption import DisruptionResult
    from massact_nn.errors import MassactError
    from massact_nn.segmentation_result import SegmentationResult

    io.save_run(tmp_path / "probe", {"x": torch.zeros(1)}, {}, {"model": "old"})
    _die_on(monkeypatch, io, "meta.json")
    with pytest.raises(KeyboardInterrupt):
        io.save_run(tmp_path / "probe", {"x": torch.ones(2)}, {}, {"model": "new"})
    assert not (tmp_path / "probe" / "meta.json").exists()
    with pytest.raises(MassactError):
        DisruptionResult.load(tmp_path / "probe")

    seg = tmp_path / "seg"
    seg.mkdir()
    np.save(seg / "mask.npy", np.zeros((2, 2), dtype=bool))  # an older run's mask, no meta.json
    with pytest.raises(MassactError, match="an unfinished segmentation run"):
        _mask_file(seg, (2, 2))
    r = SegmentationResult(aggregated={"top": torch.ones(2, 2, dtype=torch.bool)}, per_block={},
                           channels={}, primary="top", image_size=(4, 4))
    r.save(seg)
    assert SegmentationResult.load(seg).mask.all()
    _die_on(monkeypatch, seg_mod, "meta.json")
    with pytest.raises(KeyboardInterrupt):
        SegmentationResult(aggregated={"top": torch.zeros(2, 2, dtype=torch.bool)}, per_block={},
                           channels={}, primary="top", image_size=(4, 4)).save(seg)
    with pytest.raises(MassactError, match="no segmentation result in"):
        SegmentationResult.load(seg)


def test_an_incomplete_transport_folder_is_one_clear_error(tmp_path):
    import torch

    from massact_nn._io import save_run
    from massact_nn.errors import MassactError
    from massact_nn.transport import TransportResult

    t = {"source": torch.zeros(1, 3, 4, 4), "result": torch.zeros(1, 3, 4, 4),
         "token_mask": torch.ones(1, 2, 2, dtype=torch.bool)}
    save_run(tmp_path, t, {}, {"kind": "transport", "channel_sites": ["blocks.0"]})
    with pytest.raises(MassactError, match=r"not a complete transport run \(missing "
                                           r"\['channels/blocks.0'\]\)"):
        TransportResult.load(tmp_path)
