"""The request-latency benchmark stays runnable: one request under the real Dagster daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "request_latency.py"


def test_request_latency_benchmark_smoke_run() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--requests", "1", "--no-goals"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figure = re.search(r"request to queryable: p50 ([\d.]+) s", result.stdout)
    assert figure is not None and 0 < float(figure.group(1)) < 300, result.stdout
