"""A data directory or output that cannot be written gives one line naming the path and the
cause, and a non-zero exit; never a traceback. The real command in a real process, on real
failures: a file where a directory is expected (ENOTDIR, even as root), /dev/full (ENOSPC)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GROUPSYNC = str(Path(sys.executable).with_name("groupsync"))  # the installed command
FULL = Path("/dev/full")


def groupsync(*args: str, stdout: object = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GROUPSYNC, *args],
        stdout=stdout,  # type: ignore[arg-type]
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},  # no GROUPSYNC_* from the caller
    )


@pytest.mark.parametrize(
    "command",
    [
        ("requests",),
        ("import-group", "--connection", "sandbox", "--group", "HR"),
        ("confirm-shrink", "HR"),
    ],
)
def test_data_dir_under_a_file_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data directory's parent should be")
    data_dir = blocker / "groupsync-data"
    done = groupsync(*command, "--data-dir", str(data_dir))
    assert done.returncode == 1
    assert done.stderr == f"error: {data_dir}: Not a directory\n"


def test_output_to_a_full_disk_is_one_line(tmp_path: Path) -> None:
    for args in (("connections",), ("requests", "--format", "csv", "--data-dir", str(tmp_path))):
        with FULL.open("w") as full:
            done = groupsync(*args, stdout=full)
        assert done.returncode == 1, args
        assert done.stderr == "error: standard output: No space left on device\n", args


def test_full_disk_under_the_control_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "control.sqlite3").symlink_to(FULL)
    done = groupsync("requests", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr == f"error: {tmp_path / 'control.sqlite3'}: database or disk is full\n"


def test_full_disk_under_the_lake_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "catalog.sqlite").symlink_to(FULL)
    done = groupsync("confirm-shrink", "HR", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr == "error: the lake: database or disk is full\n"
