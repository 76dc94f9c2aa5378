"""The groupsync command: the demo end to end, and configuration errors."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main
from groupsync_pipeline.config import load_connections
from groupsync_pipeline.connected_apps import open_connector
from groupsync_pipeline.storage.lake import Lake


def test_demo_imports_sandbox_groups_and_prints_queries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    data = tmp_path / "demo-data"
    result = CliRunner().invoke(main, ["demo", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert "Imported 'HR': " in result.output
    assert "Imported 'All Company': 5200 members from 6 pages" in result.output
    assert "The sensor's next tick sent 4 completion emails" in result.output
    assert "Subject: groupsync: 'HR' imported from sandbox (273 members)" in result.output
    assert "First hourly sync: full sync (first sync)" in result.output
    assert "After 3 hours of tenant changes: delta sync, 1 Graph request:" in result.output
    assert result.output.count("SELECT ") >= 8
    assert "Alert emails sent: 3" in result.output
    conn = Lake(data).connect(read_only=True)
    try:
        names = conn.execute("SELECT name FROM user_groups ORDER BY name").fetchall()
        # The sandbox's own stream may raise more alerts in the same seconds: count per policy.
        alerts = conn.execute(
            "SELECT policy, max(activity_count) >= 1, bool_and(notified_at IS NOT NULL) "
            "FROM alerts GROUP BY policy ORDER BY policy"
        ).fetchall()
        burst = conn.execute(
            "SELECT count(*) FROM alerts WHERE policy = 'Executive file activity volume' "
            "AND activity_count >= 35"
        ).fetchall()
        hr_reads = conn.execute(
            "SELECT count(*) FROM group_activities WHERE group_name = 'HR' "
            "AND object_name = 'Salary bands 2026.xlsx'"
        ).fetchall()
        durations = dict(
            conn.execute("SELECT group_name, duration_seconds FROM import_requests").fetchall()
        )
        open_joins = conn.execute(
            "SELECT count(*) FROM group_memberships m JOIN user_groups g USING (group_id) "
            "WHERE m.valid_from > g.imported_at AND m.valid_to IS NULL"
        ).fetchall()[0][0]
    finally:
        conn.close()
    assert names == [
        ("All Company",),
        ("Executives",),
        ("External",),
        ("HR",),
        ("IT admins",),
        ("Office 365 administrators",),
    ]
    # The three scenes the demo plays raise the three example policies, each emailed.
    assert alerts == [
        ("Administrator outside the US", True, True),
        ("Executive file activity volume", True, True),
        ("HR documents opened", True, True),
    ]
    assert burst == [(1,)]
    assert hr_reads[0][0] >= 1
    assert "sandbox-not-a-secret" not in (data / "demo-connections.yaml").read_text()

    # One duration per import: the request's, in the demo's line, its email and its table.
    printed = dict(re.findall(r"Imported '([^']+)': .* in (\d+\.\d) s", result.output))
    assert printed == {group: f"{seconds:.1f}" for group, seconds in durations.items()}
    assert f"Duration:               {printed['HR']} s" in result.output
    # Plurals agree with their numbers; an open interval is said in words, not NaT.
    assert not re.search(
        r"\b1 (pages|members|requests|emails|groups|activities|tags|alerts|rows)\b",
        result.output,
    )
    assert "NaT" not in result.output and "nan" not in result.output.split()
    assert open_joins and "(member now)" in result.output

    # The analysts' data is read with `groupsync sql`, which pip installs (no duckdb CLI).
    assert "duckdb -readonly" not in result.output
    # Next steps: exact commands that work on what the demo stored.
    steps = result.output[result.output.index("Next steps") :]
    assert f"export GROUPSYNC_DATA_DIR={data}" in steps
    assert "export DAGSTER_HOME=$(groupsync dagster-home) && dg dev" in steps
    commands = [
        shlex.split(line.strip())
        for line in steps.splitlines()
        if line.strip().startswith("groupsync ")
    ]
    assert [c[:2] for c in commands] == [
        ["groupsync", "activities"],
        ["groupsync", "alerts"],
        ["groupsync", "sql"],
        ["groupsync", "sql"],
    ]
    assert commands[0] == ["groupsync", "activities", "--group", "HR", "--since", "1h"]
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(data))
    outputs = []
    for command in commands:
        ran = CliRunner().invoke(main, command[1:], input="")
        assert ran.exit_code == 0, (command, ran.output)
        outputs.append(ran.stdout)
    assert "Salary bands 2026.xlsx" in outputs[0]
    assert "Executive file activity volume" in outputs[1]

    # The emails' run links point into the Dagster home the UI command opens.
    home = CliRunner().invoke(main, ["dagster-home"]).stdout.strip()
    assert Path(home) == data / "dagster"
    run_id = re.search(r"/runs/([0-9a-f-]{36})", result.output).group(1)  # type: ignore[union-attr]
    with dg.DagsterInstance.from_config(home) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.job_name == "import_user_group"
        # The instance uses groupsync's settings (the writer pool) like `dg dev` would.
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_connections_command_lists_and_validates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)
    listed = CliRunner().invoke(main, ["connections"])
    assert listed.exit_code == 0 and "sandbox\toffice365\tembedded sandbox" in listed.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("connections:\n  - name: x\n    app: office365\n    colour: blue\n")
    monkeypatch.setenv("GROUPSYNC_CONNECTIONS", str(bad))
    refused = CliRunner().invoke(main, ["connections"])
    assert refused.exit_code == 1
    assert f"{bad}: connection 'x': field 'colour': unknown field" in refused.output


def test_standalone_sandbox_prints_a_working_connections_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groupsync = Path(sys.executable).with_name("groupsync")
    server = subprocess.Popen(
        [str(groupsync), "sandbox"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert server.stdout is not None
        lines = []
        while not (line := server.stdout.readline()).startswith("# export"):
            assert line, "sandbox exited early"
            lines.append(line)
        secret = line.split("=", 1)[1].split()[0]
        config = tmp_path / "connections.yaml"
        config.write_text("".join(lines))
        monkeypatch.setenv("SANDBOX_CLIENT_SECRET", secret)
        (connection,) = load_connections(config)
        with open_connector(connection) as connector:
            assert connector.find_group("HR").member_count
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=10)
