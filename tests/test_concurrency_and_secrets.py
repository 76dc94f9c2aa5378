"""Analysts never block the pipeline nor see half an import; writers queue; secrets stay out."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from groupsync_pipeline.config import load_connections
from groupsync_pipeline.imports import import_group_members
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.storage.lake import Lake

from .conftest import SECRET_ENV, write_connections
from .pipeline_helpers import failure_message, import_group, query

# Analysts in other processes, as people use the lake: one holds a transaction open for the whole
# run (its snapshot); the other opens fresh sessions as fast as it can and records every count it
# sees, and every error.
SQL = "SELECT count(*) FROM group_members WHERE group_name = 'All Company'"
HOLDER = f"""
import json, sys
from groupsync_pipeline.storage.lake import Lake
held = Lake(sys.argv[1]).connect(read_only=True)
held.execute("BEGIN TRANSACTION")
before = held.execute("{SQL}").fetchall()[0][0]
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps([before, held.execute("{SQL}").fetchall()[0][0]]), flush=True)
"""
POLLER = f"""
import json, select, sys
from groupsync_pipeline.storage.lake import Lake
seen, errors = set(), []
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        conn = Lake(sys.argv[1]).connect(read_only=True)
        seen.add(conn.execute("{SQL}").fetchall()[0][0])
        conn.close()
    except Exception as exc:
        errors.append(str(exc))
print(json.dumps([sorted(seen), errors]), flush=True)
"""


def start_analyst(code: str, path: Path) -> subprocess.Popen[str]:
    analyst = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert analyst.stdout is not None and analyst.stdout.readline().strip() == "ready"
    return analyst


def finish_analyst(analyst: subprocess.Popen[str]) -> Any:
    assert analyst.stdin is not None and analyst.stdout is not None
    analyst.stdin.write("stop\n")
    analyst.stdin.flush()
    report = json.loads(analyst.stdout.readline())
    analyst.wait(timeout=10)
    return report


def test_open_analyst_sessions_neither_block_nor_see_half_an_import(
    sandbox: GraphSandbox, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with dg.instance_for_test() as instance:
        assert import_group(instance, "HR", connections_file, data).success
        holder = start_analyst(HOLDER, data)
        poller = start_analyst(POLLER, data)
        try:
            result = import_group(instance, "All Company", connections_file, data)
            assert result.success, failure_message(result)
            held = finish_analyst(holder)
            seen, errors = finish_analyst(poller)
        finally:
            holder.kill()
            poller.kill()
    full = len(sandbox.org.transitive_user_ids(sandbox.org.group_by_name("All Company").id))
    assert held == [0, 0]  # the open session keeps a whole, stable snapshot
    assert full in seen and set(seen) <= {0, full}  # nobody ever sees part of an import
    assert errors == []  # and no reader was refused
    assert query(data, SQL) == [(full,)]


def test_concurrent_writers_queue_and_both_commit(connections_file: Path, tmp_path: Path) -> None:
    connection = load_connections(connections_file)[0]
    lake = Lake(tmp_path / "data")
    errors: list[BaseException] = []

    def run(group: str) -> None:
        try:
            import_group_members(connection, group, lake)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(g,)) for g in ("HR", "Finance", "Executives")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = query(tmp_path / "data", "SELECT name FROM user_groups ORDER BY name")
    assert names == [("Executives",), ("Finance",), ("HR",)]


def test_secret_never_reaches_logs_run_config_errors_or_database(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every library at DEBUG, as someone chasing a problem would run it.
    caplog.set_level(logging.DEBUG)
    canary = f"canary-secret-{uuid.uuid4().hex}"
    with GraphSandbox(client_secret=canary) as tenant:
        monkeypatch.setenv(SECRET_ENV, canary)
        connections_file = write_connections(tmp_path / "connections.yaml", tenant)
        data = tmp_path / "data"
        with dg.instance_for_test() as instance:
            ok = import_group(instance, "HR", connections_file, data)
            assert ok.success
            tenant.permissions.discard("GroupMember.Read.All")
            tenant.permissions.discard("Directory.Read.All")
            denied = import_group(instance, "Finance", connections_file, data)
            assert not denied.success and "GroupMember.Read.All" in failure_message(denied)
            for result in (ok, denied):
                run = instance.get_run_by_id(result.run_id)
                assert canary not in json.dumps(run.run_config)
                for record in instance.all_logs(result.run_id):
                    assert canary not in str(record)
    captured = capfd.readouterr()
    assert canary not in captured.out + captured.err
    assert caplog.records and canary not in caplog.text
    for path in data.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
