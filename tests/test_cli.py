"""The groupsync command: the demo end to end, and configuration errors."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main


def test_demo_imports_sandbox_groups_and_prints_queries(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    result = CliRunner().invoke(main, ["demo", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert "Imported 'HR': " in result.output
    assert "Imported 'All Company': 5200 members from 6 pages" in result.output
    assert f"DuckDB file to query: {data / 'groupsync.duckdb'}" in result.output
    assert result.output.count("SELECT ") == 3
    conn = duckdb.connect(str(data / "groupsync.duckdb"), read_only=True)
    try:
        names = conn.execute("SELECT name FROM user_groups ORDER BY name").fetchall()
    finally:
        conn.close()
    assert names == [("All Company",), ("Executives",), ("HR",), ("IT admins",)]
    assert "sandbox-not-a-secret" not in (data / "demo-connections.yaml").read_text()
    # The runs are real runs, kept in the demo's Dagster instance.
    assert (data / "dagster" / "history" / "runs.db").exists()


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
