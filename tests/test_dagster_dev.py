"""The Dagster UI as the README starts it (`dg dev`): launches, requested imports, email links."""

from __future__ import annotations

import os
import re
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
from groupsync_pipeline.dagster_home import open_dagster_instance
from groupsync_pipeline.definitions import defs
from groupsync_pipeline.smtp_sink import SmtpSink

from .pipeline_helpers import query

ROOT = Path(__file__).resolve().parents[1]
# Deprecations and supersessions. (Dagster also notes that the repository's top-level
# dagster.yaml is not the instance's: true, it is the template copied into DAGSTER_HOME.)
WARNING_WORDS = re.compile(r"supersession|superseded|deprecat", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def readme_ui_command() -> list[str]:
    """The README's UI commands: `export DAGSTER_HOME=$(groupsync dagster-home)`, `dg dev`."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The Dagster UI") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [line for line in lines if line] == [
        "export DAGSTER_HOME=$(groupsync dagster-home)",
        "dg dev",
    ]
    return ["dg", "dev"]


INSTIGATORS = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    location { name }
    schedules { name scheduleState { status } }
    sensors { name sensorState { status } }
} } } }
"""


def instigators(port: int) -> dict[str, tuple[str, str]]:
    """Every schedule and sensor the UI serves: name -> (code location, status)."""
    answer = httpx.post(
        f"http://127.0.0.1:{port}/graphql", json={"query": INSTIGATORS}, timeout=10
    ).json()
    found: dict[str, tuple[str, str]] = {}
    for repository in answer["data"]["repositoriesOrError"]["nodes"]:
        location = repository["location"]["name"]
        for schedule in repository["schedules"]:
            found[schedule["name"]] = (location, schedule["scheduleState"]["status"])
        for sensor in repository["sensors"]:
            found[sensor["name"]] = (location, sensor["sensorState"]["status"])
    return found


def test_launchpad_run_and_requested_import_through_the_webserver_and_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    port = free_port()
    sink = SmtpSink().start()
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(data))
    # The README's first line, as a shell runs it.
    groupsync = Path(sys.executable).with_name("groupsync")
    home = subprocess.run(
        [str(groupsync), "dagster-home"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(home) == data / "dagster"
    env = {k: v for k, v in os.environ.items() if k != "GROUPSYNC_CONNECTIONS"}
    env.update(
        DAGSTER_HOME=home,
        GROUPSYNC_DATA_DIR=str(data),
        GROUPSYNC_SMTP_HOST=sink.host,
        GROUPSYNC_SMTP_PORT=str(sink.port),
        GROUPSYNC_SMTP_SECURITY="none",
        GROUPSYNC_SMTP_FROM="groupsync@example.test",
    )
    # A run made the way the demo makes its runs: the UI must find it afterwards.
    with open_dagster_instance(data) as instance:
        earlier = defs.resolve_job_def("refresh_group_catalogs").execute_in_process(
            instance=instance
        )
    # A person asks for a group before Dagster runs: the daemon's sensor must pick it up.
    asked = CliRunner().invoke(
        main, ["import-group", "--connection", "sandbox", "--group", "HR", "--notify", "hr@x.io"]
    )
    assert asked.exit_code == 0, asked.output
    command = readme_ui_command()
    output = tmp_path / "dg-dev.log"
    with open(output, "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name(command[0])), *command[1:]]
            + ["-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "dg dev did not start"
            time.sleep(0.5)
        # Our definitions, in the location named groupsync, with the daemon's work on.
        assert instigators(port) == {
            "import_request_sensor": ("groupsync", "RUNNING"),
            "membership_sync_schedule": ("groupsync", "RUNNING"),
            "activities_schedule": ("groupsync", "RUNNING"),
            "lake_maintenance_schedule": ("groupsync", "RUNNING"),
        }
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        assert client.get_run_status(earlier.run_id).value == "SUCCESS"
        run_id = client.submit_job_execution(
            "import_user_group",
            repository_location_name="groupsync",
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
        # Its link opens a run this UI knows.
        body = mail.message.get_body(("plain",)).get_content()
        linked = re.search(r"http://localhost:3000/runs/([0-9a-f-]{36})", body)
        assert linked is not None, body
        assert client.get_run_status(linked.group(1)).value == "SUCCESS"
    finally:
        sink.stop()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    printed = output.read_text()
    assert not WARNING_WORDS.search(printed), printed
    rows = query(data, "SELECT name, member_count FROM user_groups ORDER BY name")
    assert [row[0] for row in rows] == ["Executives", "HR"] and all(row[1] > 0 for row in rows)
    requests = query(
        data,
        "SELECT request_id, group_name, source, status FROM import_requests ORDER BY request_id",
    )
    assert sorted(r[1:] for r in requests) == [
        ("Executives", "launchpad", "done"),
        ("HR", "cli", "done"),
    ]
    # Dagster's state folders would be ignored by git even with DAGSTER_HOME at the repo root.
    if shutil.which("git") and (ROOT / ".git").exists():
        for entry in Path(home).iterdir():
            if entry.name != "dagster.yaml":
                name = entry.name + ("/" if entry.is_dir() else "")
                ignored = subprocess.run(
                    ["git", "check-ignore", "--no-index", "-q", name], cwd=ROOT
                )
                assert ignored.returncode == 0, f"{entry.name} is not in .gitignore"
