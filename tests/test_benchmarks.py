"""The benchmark script runs and prints what the issue asks of it (no timing is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def test_benchmark_script_prints_the_table_and_its_last_line(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--tokens", "1024", "--steps", "1", "--reps", "1", "--no-memory",
           "--cases", "plain", "stats", "transport_two_pass", "--json", str(tmp_path / "b.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"stats/plain at 1024 tokens: \d+\.\d{3}", lines[-1]), lines[-1]
    # Two-pass transport stores k / channels of the hidden states: 4 of the tiny model's 256.
    assert "stored/full=0.01562" in out.stdout and "(k/channels 0.01562)" in out.stdout
    assert (tmp_path / "b.json").is_file()
