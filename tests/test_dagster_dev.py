"""`dagster dev` as the README starts it: launches and requested imports, no credentials needed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from dagster_graphql import DagsterGraphQLClient

from groupsync_pipeline.cli import main
from groupsync_pipeline.smtp_sink import SmtpSink

from .pipeline_helpers import query

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_launchpad_run_and_requested_import_through_the_webserver_and_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster-home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    sink = SmtpSink().start()
    env = {k: v for k, v in os.environ.items() if k != "GROUPSYNC_CONNECTIONS"}
    env.update(
        DAGSTER_HOME=str(home),
        GROUPSYNC_DATA_DIR=str(tmp_path / "data"),
        GROUPSYNC_SMTP_HOST=sink.host,
        GROUPSYNC_SMTP_PORT=str(sink.port),
        GROUPSYNC_SMTP_SECURITY="none",
        GROUPSYNC_SMTP_FROM="groupsync@example.test",
    )
    # A person asks for a group before Dagster runs: the daemon's sensor must pick it up.
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", env["GROUPSYNC_DATA_DIR"])
    asked = CliRunner().invoke(
        main, ["import-group", "--connection", "sandbox", "--group", "HR", "--notify", "hr@x.io"]
    )
    assert asked.exit_code == 0, asked.output
    dagster = Path(sys.executable).with_name("dagster")
    server = subprocess.Popen(
        [
            str(dagster),
            "dev",
            "-w",
            str(ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "dagster dev did not start"
            time.sleep(0.5)
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        run_id = client.submit_job_execution(
            "import_user_group",
            run_config={
                "ops": {
                    "imported_group_members": {
                        "config": {"connection": "sandbox", "group": "Executives"}
                    }
                }
            },
        )
        status = None
        while time.monotonic() < deadline + 120:
            status = client.get_run_status(run_id).value
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(1)
        assert status == "SUCCESS"
        # The sensor launched the requested import and, on a later tick, emailed its outcome.
        (mail,) = sink.wait_for(1, timeout=150)
        assert mail.rcpt_tos == ("hr@x.io",)
        assert "'HR' imported from sandbox" in mail.message["Subject"]
    finally:
        sink.stop()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    rows = query(tmp_path / "data", "SELECT name, member_count FROM user_groups ORDER BY name")
    assert [row[0] for row in rows] == ["Executives", "HR"] and all(row[1] > 0 for row in rows)
    requests = query(
        tmp_path / "data",
        "SELECT request_id, group_name, source, status FROM import_requests ORDER BY request_id",
    )
    assert sorted(r[1:] for r in requests) == [
        ("Executives", "launchpad", "done"),
        ("HR", "cli", "done"),
    ]
