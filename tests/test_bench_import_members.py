"""The import benchmark stays runnable on the lake: a small run imports every member."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "import_members.py"


def test_import_benchmark_smoke_run_imports_every_member() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--members", "5000", "--repeat", "1", "--latency-ms", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The bench asserts itself that the import stored every member (exit 1 otherwise).
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"groupsync import: +\d+\.\d+ s .* 6 pages", out), out
    assert re.search(r"into a new lake: +\d+\.\d+ s .* 6 pages", out), out
    ratio = float(re.search(r"ratio import / bare download: (\d+\.\d+)x", out).group(1))  # type: ignore[union-attr]
    assert ratio > 0
    lake_mb = float(re.search(r"lake \(catalog and Parquet files\): (\d+\.\d+) MB", out).group(1))  # type: ignore[union-attr]
    assert 0 < lake_mb < 50
