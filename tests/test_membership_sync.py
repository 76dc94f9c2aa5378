"""The hourly sync: delta query against a changing tenant, history, safety, and cost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main
from groupsync_pipeline.definitions import defs
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.sandbox.seed import build_organisation
from tests.conftest import SECRET_ENV, make_connector, write_connections
from tests.pipeline_helpers import (
    check_results,
    failure_message,
    import_group,
    materialization,
    memberships,
    query,
    run_job,
)

IMPORTED = ("HR", "Region EMEA", "Project Orion", "Executives")


@pytest.fixture
def tenant(monkeypatch: pytest.MonkeyPatch) -> Iterator[GraphSandbox]:
    """A tenant of its own: these tests change it."""
    with GraphSandbox(build_organisation()) as sandbox:
        monkeypatch.setenv(SECRET_ENV, sandbox.client_secret)
        yield sandbox


@pytest.fixture
def setup(
    tenant: GraphSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dg.DagsterInstance, Path, Path]]:
    connections_file = write_connections(tmp_path / "connections.yaml", tenant)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(data_dir))
    with dg.DagsterInstance.ephemeral() as instance:
        for group in IMPORTED:
            assert import_group(instance, group, connections_file, data_dir).success
        yield instance, connections_file, data_dir


def sync(
    setup: tuple[dg.DagsterInstance, Path, Path], **config: object
) -> dg.ExecuteInProcessResult:
    instance, connections_file, data_dir = setup
    return run_job(instance, "sync_group_memberships", dict(config), connections_file, data_dir)


def group_id(data_dir: Path, name: str) -> str:
    return query(data_dir, "SELECT group_id FROM user_groups WHERE name = ?", [name])[0][0]


def current(data_dir: Path, name: str) -> set[str]:
    rows = query(data_dir, "SELECT account_id FROM group_members WHERE group_name = ?", [name])
    return {row[0] for row in rows}


def expected(tenant: GraphSandbox, name: str) -> set[str]:
    return set(tenant.org.transitive_user_ids(tenant.org.group_by_name(name).id))


def graph_requests(tenant: GraphSandbox) -> list[str]:
    return [r.path for r in tenant.requests if r.path.startswith("/v1.0")]


def test_first_sync_reads_everything_once_and_changes_nothing(setup, tenant) -> None:
    _, _, data_dir = setup
    before = memberships(data_dir)
    result = sync(setup)
    assert result.success, failure_message(result)
    meta = materialization(result)
    assert meta["full_resyncs"] == {"contoso": "first sync"}
    assert (meta["groups_synced"], meta["joined"], meta["left"]) == (4, 0, 0)
    assert memberships(data_dir) == before
    assert query(data_dir, "SELECT count(*) FROM group_syncs WHERE mode = 'full'") == [(4,)]
    assert all(check_results(result).values())


def test_delta_sync_records_joins_and_leaves_at_the_sync_time(setup, tenant) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    org = tenant.org
    hr = org.group_by_name("HR")
    leaver = sorted(expected(tenant, "HR"))[0]
    outsider = next(u for u in sorted(org.users) if u not in expected(tenant, "HR"))
    london = org.group_by_name("London Office")
    nested_joiner = next(u for u in sorted(org.users) if u not in expected(tenant, "Region EMEA"))
    org.remove_member(hr.id, leaver)
    org.add_member(hr.id, outsider)
    org.add_member(london.id, nested_joiner)  # two levels below the imported group
    tenant.reset_log()

    result = sync(setup)
    assert result.success, failure_message(result)
    meta = materialization(result)
    assert meta["full_resyncs"] == {}
    assert (meta["joined"], meta["left"]) == (2, 1)
    assert current(data_dir, "HR") == expected(tenant, "HR")
    assert current(data_dir, "Region EMEA") == expected(tenant, "Region EMEA")
    # One delta request, plus at most one $batch for a newcomer's details: not a full re-read.
    assert graph_requests(tenant).count("/v1.0/groups/delta") == 1
    assert len(graph_requests(tenant)) <= 2
    synced_at = query(
        data_dir,
        "SELECT max(synced_at) FROM group_syncs WHERE group_id = ?",
        [group_id(data_dir, "HR")],
    )[0][0]
    history = query(
        data_dir,
        "SELECT account_id, valid_from, valid_to FROM group_memberships "
        "WHERE group_id = ? AND account_id IN (?, ?) ORDER BY valid_from",
        [group_id(data_dir, "HR"), leaver, outsider],
    )
    assert (leaver, history[0][1], synced_at) in history  # the leave closes at the sync
    assert (outsider, synced_at, None) in history  # the join opens at the sync
    joiner_email = query(data_dir, "SELECT email FROM accounts WHERE account_id = ?", [outsider])[
        0
    ][0]
    assert joiner_email  # details of a newcomer were fetched

    tenant.reset_log()
    before = memberships(data_dir)
    quiet = sync(setup)
    assert quiet.success
    assert graph_requests(tenant) == ["/v1.0/groups/delta"]  # no change: one request
    assert memberships(data_dir) == before


def test_deleted_and_renamed_groups(setup, tenant) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    orion = tenant.org.group_by_name("Project Orion")
    tenant.org.delete_group(orion.id)
    tenant.org.rename_group(tenant.org.group_by_name("Executives").id, "Executive Team")
    result = sync(setup)
    assert result.success, failure_message(result)
    gid = f"contoso:{orion.id}"
    assert materialization(result)["deleted_in_app"] == [gid]
    deleted_at, count = query(
        data_dir, "SELECT deleted_at, member_count FROM user_groups WHERE group_id = ?", [gid]
    )[0]
    assert deleted_at is not None and count == 0
    assert query(
        data_dir,
        "SELECT count(*) FROM group_memberships WHERE group_id = ? AND valid_to IS NULL",
        [gid],
    ) == [(0,)]
    assert (
        query(data_dir, "SELECT count(*) FROM group_memberships WHERE group_id = ?", [gid])[0][0]
        > 0
    )  # history is kept
    assert query(
        data_dir, "SELECT count(*) FROM group_catalog WHERE remote_group_id = ?", [orion.id]
    ) == [(0,)]
    assert query(data_dir, "SELECT count(*) FROM user_groups WHERE name = 'Executive Team'") == [
        (1,)
    ]
    assert query(data_dir, "SELECT count(*) FROM group_catalog WHERE name = 'Executive Team'") == [
        (1,)
    ]
    # Graph restores a soft-deleted group within 30 days: the group comes back, synced again.
    with tenant.org.lock:
        tenant.org.groups[orion.id] = tenant.org.deleted_groups.pop(orion.id)
        tenant.org.invalidate_cache()
    restored = sync(setup, full_resync=True)
    assert restored.success, failure_message(restored)
    assert query(data_dir, "SELECT deleted_at FROM user_groups WHERE group_id = ?", [gid]) == [
        (None,)
    ]
    assert current(data_dir, "Project Orion") == expected(tenant, "Project Orion")


@pytest.mark.parametrize("mode", ["gone", "syncStateNotFound", "resyncRequired"])
def test_expired_delta_state_means_one_full_resync(setup, tenant, mode: str) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    tenant.delta_expiry_mode = mode
    tenant.expire_delta_tokens()
    hr = tenant.org.group_by_name("HR")
    tenant.org.remove_member(hr.id, sorted(expected(tenant, "HR"))[0])
    result = sync(setup)
    assert result.success, failure_message(result)
    reason = materialization(result)["full_resyncs"]["contoso"]
    assert reason.startswith("delta state expired")
    assert current(data_dir, "HR") == expected(tenant, "HR")
    assert query(data_dir, "SELECT last_full_sync_reason FROM connection_sync_state") == [(reason,)]
    tenant.reset_log()
    assert sync(setup).success  # the new chain works
    assert graph_requests(tenant) == ["/v1.0/groups/delta"]


def test_sync_failing_midway_changes_nothing(setup, tenant) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    state = query(data_dir, "SELECT * FROM connection_sync_state")
    hr = tenant.org.group_by_name("HR")
    tenant.org.remove_member(hr.id, sorted(expected(tenant, "HR"))[0])
    before = memberships(data_dir)
    tenant.faults.add("error", path="/groups/delta", status=400, count=1)
    result = sync(setup)
    assert not result.success
    assert "HTTP 400" in failure_message(result)
    assert memberships(data_dir) == before
    assert query(data_dir, "SELECT * FROM connection_sync_state") == state
    assert sync(setup).success  # the saved state is still good
    assert current(data_dir, "HR") == expected(tenant, "HR")


def test_a_person_graph_will_not_read_is_a_member_without_details_until_readable(
    setup, tenant
) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    known = {row[0] for row in query(data_dir, "SELECT account_id FROM accounts")}
    strangers = [u for u in sorted(tenant.org.users) if u not in known][:2]
    hr = tenant.org.group_by_name("HR")
    for person in strangers:
        tenant.org.add_member(hr.id, person)
    refused = strangers[0]
    tenant.faults.add(
        "respond",
        path=f"/users/{refused}",
        status=400,
        body='{"error": {"code": "Request_BadRequest", "message": "Invalid request."}}',
    )
    result = sync(setup)
    assert result.success, failure_message(result)  # one person does not fail the connection
    meta = materialization(result)
    assert meta["unreadable_people"] == {"contoso": {refused: "HTTP 400 Request_BadRequest"}}
    assert meta["joined"] == 2
    # The membership is history from this sync on; only the details are missing.
    assert current(data_dir, "HR") == expected(tenant, "HR")
    rows = query(
        data_dir,
        "SELECT account_id, email, member_since FROM group_members WHERE group_name = 'HR' "
        "AND account_id IN (?, ?) ORDER BY account_id = ?",
        [*strangers, refused],
    )
    (readable, readable_email, _), (_, refused_email, since) = rows
    assert readable == strangers[1] and readable_email
    assert refused_email is None
    assert query(data_dir, "SELECT count(*) FROM accounts WHERE account_id = ?", [refused]) == [
        (0,)
    ]
    # Readable again: the next sync fills the details in; the membership is untouched.
    later = sync(setup)
    assert later.success and materialization(later)["unreadable_people"] == {}
    assert query(
        data_dir,
        "SELECT email IS NOT NULL, member_since FROM group_members "
        "WHERE group_name = 'HR' AND account_id = ?",
        [refused],
    ) == [(True, since)]


def test_a_changed_api_address_means_a_full_read(setup, tenant, tmp_path: Path) -> None:
    _, connections_file, data_dir = setup
    assert sync(setup).success
    assert materialization(sync(setup))["full_resyncs"] == {}  # the chain resumes
    # The same tenant served at another address (another host name, another port): Graph
    # there would not know this chain's link, so it must not be sent there.
    with GraphSandbox(build_organisation(), host="localhost") as moved:
        moved_file = write_connections(tmp_path / "moved.yaml", moved)
        instance, _, _ = setup
        moved_sync = run_job(instance, "sync_group_memberships", {}, moved_file, data_dir)
        assert moved_sync.success, failure_message(moved_sync)
        reason = materialization(moved_sync)["full_resyncs"]["contoso"]
        assert reason.startswith("the connection's API address changed (was https://127.0.0.1:")
        assert query(data_dir, "SELECT api_root FROM connection_sync_state") == [
            (f"https://localhost:{moved.port}/v1.0 tenant {moved.tenant_id}",)
        ]
        again = run_job(instance, "sync_group_memberships", {}, moved_file, data_dir)
        assert materialization(again)["full_resyncs"] == {}
    assert connections_file.exists()


def test_a_cleared_description_leaves_the_catalog_and_an_absent_one_stays(setup, tenant) -> None:
    _, _, data_dir = setup
    assert sync(setup).success  # the full read fills the catalog
    cleared, renamed = [g for g in tenant.org.groups.values() if g.description and g.mail][:2]

    def catalog(group_id: str) -> tuple:
        return query(
            data_dir,
            "SELECT name, description, mail FROM group_catalog WHERE remote_group_id = ?",
            [group_id],
        )[0]

    cleared_before, renamed_before = catalog(cleared.id), catalog(renamed.id)
    assert cleared_before[1] and cleared_before[2] and renamed_before[1]
    with make_connector(tenant) as graph:
        link = graph.latest_delta_link()
    # What Graph sends when one group's description and mail were cleared and another was
    # renamed: properties set to null are present with null, unchanged ones may be absent.
    page = {
        "@odata.deltaLink": link,
        "value": [
            {"id": cleared.id, "description": None, "mail": None},
            {"id": renamed.id, "displayName": "Renamed & Co"},
        ],
    }
    tenant.faults.add("respond", path="/groups/delta", body=json.dumps(page))
    result = sync(setup)
    assert result.success, failure_message(result)
    assert catalog(cleared.id) == (cleared.display_name, None, None)
    assert catalog(renamed.id) == ("Renamed & Co", renamed_before[1], renamed_before[2])


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_big_shrink_is_held_until_confirmed(setup, tenant) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    hr = tenant.org.group_by_name("HR")
    people = sorted(expected(tenant, "HR"))
    for person in people[: int(len(people) * 0.6)]:
        tenant.org.remove_member(hr.id, person)
    before = current(data_dir, "HR")
    held = sync(setup)
    assert held.success
    assert materialization(held)["held_back"] == [group_id(data_dir, "HR")]
    assert check_results(held)["no_held_shrinks"] is False
    assert current(data_dir, "HR") == before  # nothing removed
    code, out = cli("confirm-shrink", "HR")
    assert code == 0, out
    assert "confirmed" in out
    released = sync(setup)
    assert released.success
    assert current(data_dir, "HR") == expected(tenant, "HR")
    assert check_results(released)["no_held_shrinks"] is True
    assert query(data_dir, "SELECT status FROM membership_holds") == [("confirmed",)]


def test_held_shrink_is_applied_when_a_full_sync_agrees_or_dropped_when_it_does_not(
    setup, tenant
) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    hr = tenant.org.group_by_name("HR")
    fin_people = sorted(expected(tenant, "HR"))
    removed = fin_people[: int(len(fin_people) * 0.7)]
    for person in removed:
        tenant.org.remove_member(hr.id, person)
    assert materialization(sync(setup))["held_back"] == [group_id(data_dir, "HR")]
    agreed = sync(setup)  # a held shrink makes the next sync a full read
    assert materialization(agreed)["full_resyncs"] == {"contoso": "verify held shrink"}
    assert current(data_dir, "HR") == expected(tenant, "HR")
    assert query(data_dir, "SELECT status FROM membership_holds") == [("agreed",)]
    # A transient loss that is back by the next full read removes nobody.
    execs = tenant.org.group_by_name("Executives")
    people = sorted(expected(tenant, "Executives"))
    for person in people[:12]:
        tenant.org.remove_member(execs.id, person)
    assert materialization(sync(setup))["held_back"] == [group_id(data_dir, "Executives")]
    for person in people[:12]:
        tenant.org.add_member(execs.id, person)
    before = memberships(data_dir)
    assert sync(setup).success
    assert memberships(data_dir) == before
    assert query(data_dir, "SELECT status FROM membership_holds ORDER BY detected_at") == [
        ("agreed",),
        ("withdrawn",),
    ]


def test_periodic_full_sync_catches_what_deltas_miss(setup, tenant) -> None:
    _, _, data_dir = setup
    assert sync(setup).success
    tenant.omit_deleted_user_removals = True
    victim = sorted(expected(tenant, "Executives"))[0]
    tenant.org.delete_user(victim)
    assert sync(setup).success
    assert victim in current(data_dir, "Executives")  # Graph may not report it
    result = sync(setup, full_resync=True)
    assert materialization(result)["full_resyncs"] == {"contoso": "requested"}
    assert victim not in current(data_dir, "Executives")


def test_hourly_schedule_targets_the_membership_sync() -> None:
    schedule = defs.resolve_schedule_def("membership_sync_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    assert schedule.job_name == "sync_group_memberships"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    job = defs.resolve_job_def("sync_group_memberships")
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("imported_group_members")}
