"""The scale benchmark stays runnable: a CI-sized run prints every figure of its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def test_scale_benchmark_smoke_run_prints_sane_figures() -> None:
    # --no-goals: at this size fixed costs dominate; the figures must still be there and sane.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--no-goals"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "stored" in out and "today/lake" in out
    # The last table: one row per step (20,000 and 50,000 stored).
    table = out.rsplit("today B/act", 1)[1].split("goals", 1)[0]
    rows = [line.split() for line in table.splitlines() if re.match(r"\s*[\d,]+\s", line)]
    assert [row[0] for row in rows] == ["20,000", "50,000"], out
    for row in rows:
        batch_s, rss_mb, bytes_per, files = float(row[1]), float(row[3]), float(row[4]), int(row[5])
        assert 0 < batch_s < 60
        assert 50 < rss_mb < 4000  # the batch process's own peak, duckdb and pandas loaded
        # raw JSON of about 1.2 KB an event, zstd-compressed: far less than the text, not 0
        assert 50 < bytes_per < 1500
        assert files > 0
        hr, point = re.findall(r"(\d+\.\d+)/\s*(\d+\.\d+)", " ".join(row[6:10]))[:2]
        assert all(0 < float(x) < 30 for x in (*hr, *point))
        runs, failed, _p50, _max = row[10].split("/")
        assert int(runs) > 0 and int(failed) == 0, out
        today_s, ratio = float(row[11]), float(row[12].rstrip("x"))
        assert today_s > 0 and ratio > 0
        assert 50 < float(row[13]) < 5000  # today's file: bytes per activity
        assert float(row[14]) >= 0  # the machine's load average, to read the times by
    assert "[met] reader: 0 failed" in out
    # The operating limits: files a day of batches adds, and one maintenance run over them.
    files = re.search(r"files: (\d+\.\d) Parquet files per batch", out)
    assert files and float(files.group(1)) > 0, out
    maintenance = re.search(
        r"maintenance at ([\d,]+) stored: (\d+\.\d) s .*; Parquet files ([\d,]+) before, "
        r"([\d,]+) after",
        out,
    )
    assert maintenance, out
    before, after = (int(maintenance.group(n).replace(",", "")) for n in (3, 4))
    assert 0 < after < before  # small files merged, replaced ones removed
