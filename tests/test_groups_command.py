"""`groupsync groups`: the app's groups to pick from, from the stored catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from groupsync_pipeline.cli import main
from groupsync_pipeline.config import Connection
from groupsync_pipeline.imports import import_group_members
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.storage.lake import Lake

from .pipeline_helpers import query


def groups(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["groups", "--data-dir", str(data_dir), *args])


@pytest.fixture
def env(connections_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GROUPSYNC_CONNECTIONS", str(connections_file))
    return connections_file


def test_refresh_then_list_search_and_filter(
    tmp_path: Path, env: Path, connection: Connection, sandbox: GraphSandbox
) -> None:
    data = tmp_path / "data"
    none_yet = groups(data)
    assert none_yet.exit_code == 1
    assert "groupsync groups --refresh" in none_yet.output  # says how to get a catalog

    refreshed = groups(data, "--refresh", "--format", "json")
    assert refreshed.exit_code == 0, refreshed.output
    assert "contoso: catalog of 40 groups stored" in refreshed.stderr
    rows = json.loads(refreshed.stdout)
    assert len(rows) == len(sandbox.org.groups) == 40
    hr = next(row for row in rows if row["name"] == "HR")
    assert hr == {
        "connection": "contoso",
        "name": "HR",
        "id": sandbox.org.group_by_name("HR").id,
        "kind": hr["kind"],
        "people": len(sandbox.org.transitive_user_ids(sandbox.org.group_by_name("HR").id)),
        "imported": False,
        "last_synced_at": None,
    }
    assert hr["kind"] in ("microsoft365", "security", "mail-enabled security", "distribution")
    assert [row["name"].casefold() for row in rows] == sorted(r["name"].casefold() for r in rows)
    # The same code as the group_catalog asset stored it: the catalog table says so.
    assert query(data, "SELECT count(*) FROM group_catalog WHERE connection = 'contoso'") == [(40,)]

    import_group_members(connection, "HR", Lake(data))
    imported = json.loads(groups(data, "--imported", "--format", "json").stdout)
    assert [(r["name"], r["imported"]) for r in imported] == [("HR", True)]
    assert imported[0]["last_synced_at"].endswith("Z")
    not_imported = json.loads(groups(data, "--not-imported", "--format", "json").stdout)
    assert len(not_imported) == 39 and "HR" not in {r["name"] for r in not_imported}

    # Search: case-insensitive, on names (and ids); % and _ are plain characters.
    found = json.loads(groups(data, "--search", "hR", "--format", "json").stdout)
    assert "HR" in {r["name"] for r in found}
    assert all("hr" in (r["name"] + r["id"]).casefold() for r in found)
    assert json.loads(groups(data, "--search", "%", "--format", "json").stdout) == []

    table = groups(data, "--search", "HR")
    assert table.exit_code == 0
    header = table.stdout.splitlines()[0].split()
    assert header == ["connection", "name", "id", "kind", "people", "imported", "last_synced_at"]
    hr_line = next(line for line in table.stdout.splitlines() if line.split()[1] == "HR")
    assert " yes " in hr_line
    csv = groups(data, "--format", "csv", "--imported")
    assert csv.stdout.splitlines()[0] == "connection,name,id,kind,people,imported,last_synced_at"


def test_bad_connection_and_one_failing_refresh(
    tmp_path: Path, env: Path, sandbox: GraphSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    unknown = groups(data, "--connection", "nope")
    assert unknown.exit_code == 1
    assert "unknown connection 'nope' (configured: contoso)" in unknown.output

    # A second connection whose secret is wrong: its refresh fails, the other one's does not.
    document = yaml.safe_load(env.read_text())
    broken = dict(document["connections"][0], name="broken", client_secret_env="BROKEN_SECRET")
    document["connections"].append(broken)
    env.write_text(yaml.safe_dump(document))
    monkeypatch.setenv("BROKEN_SECRET", "not-the-secret")
    result = groups(data, "--refresh", "--format", "json")
    assert result.exit_code == 1
    assert "broken: catalog refresh failed" in result.stderr
    assert "not-the-secret" not in result.output
    assert {row["connection"] for row in json.loads(result.stdout)} == {"contoso"}
