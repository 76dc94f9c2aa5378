"""Nothing a killed publisher leaves behind may stay: its half-written snapshot copy goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from groupsync_pipeline.storage.warehouse import PUBLISHED_FILE, Warehouse
from tests.pipeline_helpers import query

_SLOW_PUBLISHER = """
import shutil, sys, time
from groupsync_pipeline.storage import warehouse

copy = shutil.copyfile
def slow_copy(source, target):
    copy(source, target)
    time.sleep(600)  # killed here: a full copy sits beside the snapshot
warehouse.shutil.copyfile = slow_copy
with warehouse.Warehouse(sys.argv[1]).write() as conn:
    conn.execute("INSERT INTO connected_apps VALUES ('c', 'office365', NULL, now(), NULL)")
"""


def test_a_copy_left_by_a_publisher_killed_mid_publish_is_removed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Warehouse(data).ensure_published()
    publisher = subprocess.Popen([sys.executable, "-c", _SLOW_PUBLISHER, str(data)])
    try:
        deadline = time.monotonic() + 60
        while not list(data.glob(f".{PUBLISHED_FILE}.*.tmp")):
            assert publisher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(publisher.pid, signal.SIGKILL)
        publisher.wait()
    assert list(data.glob("*.tmp"))  # the leftover, a full copy of the warehouse
    with Warehouse(data).write():
        pass
    assert list(data.glob("*.tmp")) == []
    # The killed commit is kept and published by the next write.
    assert query(data, "SELECT connection FROM connected_apps") == [("c",)]
