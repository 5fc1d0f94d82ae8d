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
