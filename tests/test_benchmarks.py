"""The benchmark script runs and prints what the issue asks of it (no timing is asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_benchmark_script_prints_the_table_and_its_last_line(tmp_path):
    out = _run("--tokens", "1024", "--steps", "1", "--reps", "1", "--no-memory",
               "--cases", "plain", "stats", "transport_two_pass", "--json", str(tmp_path / "b.json"))
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"stats/plain at 1024 tokens: \d+\.\d{3}", lines[-1]), lines[-1]
    # Two-pass transport stores k / channels of the hidden states: 4 of the tiny model's 256.
    assert "stored/full=0.01562" in out.stdout and "(k/channels 0.01562)" in out.stdout
    assert (tmp_path / "b.json").is_file()


def test_operator_counts_split_the_library_s_own_by_phase(tmp_path):
    out = _run("--ops", "--width", "64", "--tokens", "16", "--steps", "2",
               "--cases", "plain", "nnsight_empty", "stats", "--json", str(tmp_path / "ops.json"))
    rows = {r["case"]: r for r in json.loads((tmp_path / "ops.json").read_text())}
    assert rows["plain"]["ops"] == rows["nnsight_empty"]["ops"] > 0  # an empty trace adds nothing
    phases = ("before", "call", "between", "after")
    for case in ("plain", "nnsight_empty"):
        assert not any(rows[case][f"ours_{p}"] for p in phases)
    st = rows["stats"]
    assert st["calls"] == 2 and st["ours_call"] > 0 and 0 < st["ours_after"] <= 30
    # nnsight adds no operator of its own: every one over plain is the library's.
    assert st["ops"] - rows["plain"]["ops"] == sum(st[f"ours_{p}"] for p in phases)
    assert all(w.startswith("after ") for w in st["waits"])  # nothing waits before or in the calls
    assert re.search(r"^  stats +\d+ +\+\d+ \|", out.stdout, re.M), out.stdout


def test_call_span_counts_host_time_before_the_first_call_and_after_the_last(monkeypatch):
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import run
    finally:
        sys.path.remove(str(SCRIPT.parent))
    clock = [0.0]
    monkeypatch.setattr(run.time, "perf_counter", lambda: clock[0])
    module = torch.nn.Linear(2, 2)
    span = run.CallSpan(module)
    start = clock[0]
    clock[0] += 3.0  # before the first call
    module(torch.zeros(2))
    clock[0] += 100.0  # between calls: the model's time, not counted
    module(torch.zeros(2))
    clock[0] += 5.0  # after the last call
    assert span.outside(start, clock[0]) == 8.0
    # Reset after each reading; a case that never calls the module is outside from end to end.
    assert span.outside(clock[0], clock[0] + 7.0) == 7.0
    span.remove()
    module(torch.zeros(2))
    assert span.first is None and span.last is None
