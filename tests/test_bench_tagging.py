"""The tagging benchmark stays runnable and its methods agree (a small smoke run, no goals)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tagging.py"


def test_tagging_benchmark_smoke_run_agrees() -> None:
    # --no-goals: ratios mean little at this size; a disagreement between DuckDB, the bare
    # join and pandas still fails the run (exit 1).
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--activities",
            "50000",
            "--intervals",
            "20000",
            "--sample",
            "5000",
            "--incremental",
            "5000",
            "--repeat",
            "1",
            "--no-variants",
            "--no-goals",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sample tags agree with DuckDB: yes" in result.stdout
