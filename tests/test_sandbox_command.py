"""`groupsync sandbox` stopped the way a service manager stops it leaves nothing behind: its
temporary folder holds the TLS private key. The real command in a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GROUPSYNC = str(Path(sys.executable).with_name("groupsync"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_sandbox_removes_its_key_when_stopped(tmp_path: Path, signum: signal.Signals) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [GROUPSYNC, "sandbox"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    try:
        assert process.stdout is not None
        printed = []
        for line in process.stdout:
            printed.append(line)
            if line.startswith("# Ctrl-C"):
                break
        connections = yaml.safe_load("".join(printed))["connections"]
        certificate = Path(connections[0]["ca_bundle"])
        folder = certificate.parent
        assert folder.parent == scratch and certificate.is_file()
        keys = list(folder.glob("*key*"))
        assert keys and all(key.stat().st_mode & 0o077 == 0 for key in keys)

        process.send_signal(signum)
        assert process.wait(timeout=30) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not folder.exists()
    assert list(scratch.iterdir()) == []
