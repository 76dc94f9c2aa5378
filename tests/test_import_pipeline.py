"""Importing groups through real Dagster runs into a real DuckDB file, checked with SQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from groupsync_pipeline.defs.assets import imported_group_members
from groupsync_pipeline.defs.checks import member_count_matches_remote, no_duplicate_members
from groupsync_pipeline.defs.resources import ConnectionsResource, LakeResource
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.storage.lake import Lake

from .pipeline_helpers import (
    check_results,
    failure_message,
    import_group,
    materialization,
    memberships,
    query,
    run_job,
)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as temporary:
        yield temporary


def test_import_stores_members_history_and_passes_checks(
    sandbox: GraphSandbox, instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    result = import_group(instance, "All Company", connections_file, data)
    assert result.success, failure_message(result)
    group = sandbox.org.group_by_name("All Company")
    expected = set(sandbox.org.transitive_user_ids(group.id))
    meta = materialization(result)
    assert meta["members"] == len(expected) and meta["pages_fetched"] >= 6
    assert check_results(result) == {
        "member_count_matches_remote": True,
        "no_duplicate_members": True,
        "no_held_shrinks": True,
    }
    rows = query(data, "SELECT account_id FROM group_members WHERE group_name = 'All Company'")
    assert {r[0] for r in rows} == expected
    (group_row,) = query(
        data,
        "SELECT group_id, type, connection, remote_group_id, member_count, imported_at,"
        " last_synced_at FROM user_groups",
    )
    assert group_row[:5] == (f"contoso:{group.id}", "imported", "contoso", group.id, len(expected))
    assert group_row[5] == group_row[6]
    guests = query(data, "SELECT count(*) FROM accounts WHERE is_external")[0][0]
    assert guests == sum(
        sandbox.org.users[u].user_type == "Guest"
        or "#EXT#" in sandbox.org.users[u].user_principal_name
        for u in expected
    )
    (sync,) = query(data, 'SELECT members, joined, "left", remote_member_count FROM group_syncs')
    assert sync == (len(expected), len(expected), 0, len(expected))


def test_reimport_is_idempotent_and_tracks_joins_and_leaves(
    sandbox: GraphSandbox, instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    assert import_group(instance, "Finance", connections_file, data).success
    before = memberships(data)
    again = import_group(instance, "Finance", connections_file, data)
    assert materialization(again)["joined"] == 0 and materialization(again)["left"] == 0
    assert memberships(data) == before

    finance = sandbox.org.group_by_name("Finance")
    leaver = next(m for m in finance.members if m in sandbox.org.users)
    joiner = next(
        u for u in sandbox.org.users if u not in sandbox.org.transitive_user_ids(finance.id)
    )
    original = list(finance.members)
    try:
        finance.members.remove(leaver)
        finance.members.append(joiner)
        sandbox.org.invalidate_cache()
        changed = import_group(instance, finance.id, connections_file, data)
    finally:
        finance.members[:] = original
        sandbox.org.invalidate_cache()
    assert (materialization(changed)["joined"], materialization(changed)["left"]) == (1, 1)
    closed = query(
        data, "SELECT valid_to IS NOT NULL FROM group_memberships WHERE account_id = ?", [leaver]
    )
    assert closed == [(True,)]
    assert query(data, "SELECT count(*) FROM group_members WHERE account_id = ?", [joiner]) == [
        (1,)
    ]


def test_unknown_group_fails_with_close_matches_and_writes_nothing(
    instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    result = import_group(instance, "Enginering", connections_file, data)
    assert not result.success
    assert "close matches: Engineering" in failure_message(result)
    assert not Lake(data).exists() or query(data, "SELECT count(*) FROM user_groups") == [(0,)]


def test_unknown_connection_fails_listing_configured(
    instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    result = import_group(instance, "HR", connections_file, tmp_path / "d", connection="nope")
    assert not result.success
    assert "unknown connection 'nope' (configured: contoso)" in failure_message(result)


def test_crash_mid_import_changes_nothing(
    sandbox: GraphSandbox, instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    assert import_group(instance, "HR", connections_file, data).success
    before = memberships(data)
    # Page 3 of All Company never comes back: the import fails after two pages were staged.
    sandbox.faults.add("error", path="skiptoken", count=1, status=400)
    result = import_group(instance, "All Company", connections_file, data)
    sandbox.faults.clear()
    assert not result.success
    assert "HTTP 400" in failure_message(result)
    assert memberships(data) == before
    assert query(data, "SELECT count(*) FROM user_groups") == [(1,)]
    assert list((data / "staging").glob("*")) == []


def test_catalog_asset_stores_every_group(
    sandbox: GraphSandbox, instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    result = run_job(instance, "refresh_group_catalogs", {}, connections_file, data)
    assert result.success, failure_message(result)
    rows = dict(query(data, "SELECT name, remote_member_count FROM group_catalog"))
    assert len(rows) == 40
    hr = sandbox.org.group_by_name("HR")
    assert rows["HR"] == len(sandbox.org.transitive_user_ids(hr.id))
    assert query(data, "SELECT connection, app FROM connected_apps") == [("contoso", "office365")]


def test_bundled_sandbox_connection_works_with_no_configuration(
    instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(tmp_path / "data"))
    from groupsync_pipeline.definitions import defs

    result = defs.resolve_job_def("import_user_group").execute_in_process(
        run_config={
            "ops": {
                "imported_group_members": {
                    "config": {"connection": "sandbox", "group": "IT admins"}
                }
            }
        },
        instance=instance,
    )
    assert result.success
    assert query(tmp_path / "data", "SELECT name FROM user_groups") == [("IT admins",)]
    # Each run starts its own embedded tenant on a new port: the delta chain still resumes.
    sync = defs.resolve_job_def("sync_group_memberships")
    first, second = (sync.execute_in_process(instance=instance) for _ in range(2))
    assert materialization(first)["full_resyncs"] == {"sandbox": "first sync"}
    assert materialization(second)["full_resyncs"] == {}
    assert query(tmp_path / "data", "SELECT api_root FROM connection_sync_state") == [
        ("embedded sandbox tenant",)
    ]


def test_each_retry_wait_is_in_the_run_log(
    sandbox: GraphSandbox, instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("throttle", path=r"transitiveMembers\?", count=2, retry_after="0.2")
    result = import_group(instance, "HR", connections_file, tmp_path / "data")
    assert result.success, failure_message(result)
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    waits = [m for m in logs if m.startswith("Graph 429 on ")]
    assert waits == [
        f"Graph 429 on /groups/{hr.id}/transitiveMembers: waiting 0.2 s (attempt {n} of 8)"
        for n in (2, 3)
    ]


def test_checks_fail_on_count_mismatch_and_duplicate_members(
    instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    assert import_group(instance, "Legal", connections_file, data).success
    with Lake(data).write() as conn:
        # The app said one more person than we hold, and one member got a second open interval.
        conn.execute("UPDATE group_syncs SET remote_member_count = remote_member_count + 1")
        conn.execute("INSERT INTO group_memberships SELECT * FROM group_memberships LIMIT 1")
    result = dg.materialize(
        [imported_group_members, member_count_matches_remote, no_duplicate_members],
        selection=dg.AssetSelection.checks_for_assets(imported_group_members),
        resources={
            "lake": LakeResource(data_dir=str(data)),
            "connections": ConnectionsResource(connections_file=str(connections_file)),
        },
        instance=instance,
        raise_on_error=False,
    )
    assert check_results(result) == {
        "member_count_matches_remote": False,
        "no_duplicate_members": False,
    }


def test_invalid_notify_email_fails_before_anything_is_written(
    instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    result = run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "HR", "notify_email": "hr@contoso.com\nBcc: x@evil.com"},
        connections_file,
        data,
    )
    assert not result.success
    assert "notify_email: not a valid email address" in failure_message(result)
    assert not Lake(data).exists()


def test_an_empty_answer_for_a_populated_group_changes_nothing(
    sandbox: GraphSandbox, instance: dg.DagsterInstance, connections_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    assert import_group(instance, "HR", connections_file, data).success
    before = memberships(data)
    sandbox.faults.add("respond", path=r"transitiveMembers\?", body='{"value": []}')
    result = import_group(instance, "HR", connections_file, data)
    assert not result.success
    assert "listed no members for 'HR' although it counts" in failure_message(result)
    assert memberships(data) == before
