"""The lake itself: settings, the writer lock, conflicting commits, readers during writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main
from groupsync_pipeline.storage.lake import Lake, LakeConfigError, LakeSettings

WRITER = """
import sys
from groupsync_pipeline.storage.lake import Lake
lake, name = Lake(sys.argv[1]), sys.argv[2]
for batch in range(20):
    for attempt in lake.retrying():
        with attempt, lake.write() as conn:
            conn.execute(
                "INSERT INTO connected_apps (connection, app, first_seen_at)"
                " SELECT ? || '-' || ? || '-' || range, 'office365', now() FROM range(50)",
                [name, batch],
            )
            # Read-modify-write of one shared row: lost updates would show in its count.
            conn.execute("UPDATE _tagging_state SET tagged_through = tagged_through + 1")
"""


def test_two_writer_processes_at_once_lose_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "data")
    with lake.write() as conn:
        conn.execute("INSERT INTO _tagging_state VALUES (0)")
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(lake.data_dir), name])
        for name in ("a", "b")
    ]
    assert [writer.wait(timeout=300) for writer in writers] == [0, 0]
    with lake.read() as conn:
        assert conn.execute("SELECT count(*) FROM connected_apps").fetchall() == [(2000,)]
        assert conn.execute("SELECT tagged_through FROM _tagging_state").fetchall() == [(40,)]


def test_a_commit_refused_by_a_conflicting_writer_runs_again(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "data")
    with lake.write() as conn:
        conn.execute("INSERT INTO _tagging_state VALUES (0)")
    attempts = 0
    for attempt in lake.retrying():
        with attempt, lake.write() as conn:
            attempts += 1
            conn.execute("UPDATE _tagging_state SET tagged_through = tagged_through + 1")
            if attempts == 1:  # a writer outside the lock (another machine) commits first
                other = lake.connect()
                other.execute("UPDATE _tagging_state SET tagged_through = tagged_through + 10")
                other.close()
    assert attempts == 2
    with lake.read() as conn:
        assert conn.execute("SELECT tagged_through FROM _tagging_state").fetchall() == [(11,)]


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "data")
    with pytest.raises(duckdb.Error), lake.write() as conn:
        conn.execute("INSERT INTO connected_apps VALUES ('c', 'office365', NULL, now(), NULL)")
        conn.execute("SELECT no_such_column FROM connected_apps")
    with lake.read() as conn:
        assert conn.execute("SELECT count(*) FROM connected_apps").fetchall() == [(0,)]


def test_settings_come_from_the_environment_and_refuse_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = LakeSettings.from_env(tmp_path)
    assert (default.catalog_kind, default.catalog) == (
        "sqlite",
        str(tmp_path / "lake" / "catalog.sqlite"),
    )
    assert default.data_path == f"{tmp_path}/lake/data/" and default.s3 is None
    monkeypatch.setenv("GROUPSYNC_LAKE_CATALOG", "postgres:dbname=lake host=db user=gs")
    monkeypatch.setenv("GROUPSYNC_LAKE_DATA_PATH", "s3://bucket/lake")
    monkeypatch.setenv("GROUPSYNC_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("GROUPSYNC_S3_USE_SSL", "false")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    scaled = LakeSettings.from_env(tmp_path)
    assert scaled.catalog_kind == "postgres" and scaled.data_path == "s3://bucket/lake/"
    assert scaled.s3 is not None and not scaled.s3.use_ssl
    assert "s3cr3t-value" not in scaled.describe()
    assert "s3cr3t-value" not in scaled.attach_statement("lake", read_only=True)
    for bad, message in (
        ("postgres:dbname=lake password=hunter2", "must not hold a password"),
        ("mysql:lake", "must be 'sqlite:<file>' or 'postgres:"),
        ("sqlite:", "must be 'sqlite:<file>' or 'postgres:"),
    ):
        monkeypatch.setenv("GROUPSYNC_LAKE_CATALOG", bad)
        with pytest.raises(LakeConfigError, match=message) as error:
            LakeSettings.from_env(tmp_path)
        assert "hunter2" not in str(error.value)


def test_the_lake_command_prints_statements_that_attach_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Lake(data).write() as conn:
        conn.execute("INSERT INTO connected_apps VALUES ('c', 'office365', NULL, now(), NULL)")
    result = CliRunner().invoke(main, ["lake", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    statements = [
        line for line in result.output.splitlines() if line.startswith(("LOAD", "ATTACH", "USE"))
    ]
    conn = duckdb.connect(
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    for statement in statements:  # what a person pastes into a DuckDB 1.5.5 shell
        conn.execute(statement)
    assert conn.execute("SELECT connection FROM connected_apps").fetchall() == [("c",)]
    with pytest.raises(duckdb.Error, match="read-only|read only"):
        conn.execute("DELETE FROM connected_apps")
