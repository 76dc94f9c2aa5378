"""The activities and alerts assets as real Dagster runs against a sandbox tenant over HTTPS:
ingest from the four audit logs, tagging, automatic groups, policies, retries and faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.storage.lake import Lake
from tests.conftest import SECRET_ENV, write_connections
from tests.pipeline_helpers import (
    check_results,
    failure_message,
    import_group,
    query,
    run_job,
)

SOURCES = {"signIns", "directoryAudits", "Audit.SharePoint", "Audit.General"}


@pytest.fixture(scope="module")
def quiet_tenant() -> Iterator[GraphSandbox]:
    """A tenant with no synthetic stream: only the events a test injects."""
    # Blobs every 2 s: file events are listed seconds after they happen, not 5-15 minutes.
    with GraphSandbox(activity_rate=0, management_slot_seconds=2) as tenant:
        yield tenant


@pytest.fixture
def env(tmp_path: Path, quiet_tenant: GraphSandbox, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(SECRET_ENV, quiet_tenant.client_secret)
    monkeypatch.delenv("GROUPSYNC_POLICIES", raising=False)
    monkeypatch.delenv("GROUPSYNC_SMTP_HOST", raising=False)
    quiet_tenant.activity.clear_injected()
    connections = write_connections(tmp_path / "connections.yaml", quiet_tenant)
    data_dir = tmp_path / "data"
    with dg.instance_for_test() as instance:
        yield instance, connections, data_dir
    quiet_tenant.activity.clear_injected()


def ingest(env) -> dg.ExecuteInProcessResult:
    instance, connections, data_dir = env
    return run_job(instance, "ingest_activities", {}, connections, data_dir)


def tags_by_event(data_dir: Path) -> dict[str, list[str]]:
    return dict(query(data_dir, "SELECT event_id, groups FROM activities_tagged"))


def test_ingest_tags_by_group_and_raises_the_example_alerts(
    env, quiet_tenant: GraphSandbox
) -> None:
    instance, connections, data_dir = env
    stream = quiet_tenant.activity
    org = quiet_tenant.org
    hr_member = next(u for u in org.transitive_user_ids(org.group_by_name("HR").id))
    hr_upn = org.users[hr_member].user_principal_name
    before_import = stream.add_file_event(hr_upn, time.time() - 60, "FileAccessed", "Old.docx")
    assert import_group(instance, "HR", connections, data_dir).success

    first = ingest(env)
    assert first.success, failure_message(first)
    # The automatic groups exist from this first ingest on.
    automatic = dict(query(data_dir, "SELECT name, type FROM user_groups WHERE type='automatic'"))
    assert automatic == {"External": "automatic", "Office 365 administrators": "automatic"}

    # File events carry whole seconds (CreationTime has no fraction): start the scenes a
    # second after the automatic groups were created, or they could predate them.
    time.sleep(1.1)
    admin = sorted(org.direct_admin_user_ids())[0]
    guest = next(u.id for u in org.users.values() if u.user_type == "Guest")
    now = time.time()
    hr_read = stream.add_file_event(hr_upn, now, "FileAccessed", "Salary bands 2026.xlsx")
    hr_sign_in = stream.add_sign_in(hr_member, now, country="US", ip="203.0.113.10")
    admin_abroad = stream.add_sign_in(admin, now, country="NG", city="Lagos", ip="198.51.100.7")
    admin_change = stream.add_directory_audit(admin, now, "Reset user password", ip="198.51.100.7")
    guest_read = stream.add_file_event(
        org.users[guest].user_principal_name, now, "FileDownloaded", "Price list.xlsx"
    )
    outsider = stream.add_file_event("someone@partner.example", now, "FileAccessed", "Deck.pptx")

    time.sleep(3.5)  # the blob slot holding the file events has ended (2 s), with a margin
    second = ingest(env)
    assert second.success, failure_message(second)
    sources = dict(query(data_dir, "SELECT source, count(*) FROM activities GROUP BY source"))
    assert set(sources) == {"signIns", "directoryAudits", "Audit.SharePoint"}
    tags = {
        event_id: groups
        for event_id, groups in query(data_dir, "SELECT event_id, groups FROM activities_tagged")
    }

    def tagged(event_id: str) -> list[str]:
        (match,) = [groups for key, groups in tags.items() if event_id in key]
        return match

    assert tagged(before_import) == []  # HR was imported after it happened
    assert tagged(hr_read) == ["HR"]
    assert tagged(hr_sign_in) == ["HR"]
    assert "Office 365 administrators" in tagged(admin_abroad)
    assert "Office 365 administrators" in tagged(admin_change)
    assert tagged(guest_read) == ["External"]
    assert tagged(outsider) == ["External"]
    # The directory audit carries only an address: it takes the place of the sign-in from it.
    located = query(
        data_dir, "SELECT country, city FROM activities WHERE source = 'directoryAudits'"
    )
    assert located == [("NG", "Lagos")]

    alerts = query(
        data_dir, "SELECT policy, actor_account_id, activity_count FROM alerts ORDER BY policy"
    )
    assert alerts == [
        ("Administrator outside the US", admin, 2),
        ("HR documents opened", hr_member, 1),
    ]

    # Nothing new: nothing stored twice, no alert twice.
    third = ingest(env)
    assert third.success, failure_message(third)
    assert query(data_dir, "SELECT count(*), count(DISTINCT event_id) FROM activities") == [
        (sum(sources.values()) + 0, sum(sources.values()))
    ]
    assert query(data_dir, "SELECT count(*) FROM alerts") == [(2,)]


def test_a_failing_log_keeps_its_place_and_the_others_commit(
    env, quiet_tenant: GraphSandbox
) -> None:
    instance, connections, data_dir = env
    assert ingest(env).success
    first_state = dict(query(data_dir, "SELECT source, read_until FROM activity_sources_state"))
    assert set(first_state) == SOURCES | {"administrators", "domains", "users"}

    user = next(iter(quiet_tenant.org.users))
    signed_in = quiet_tenant.activity.add_sign_in(user, time.time(), country="US")
    audited = quiet_tenant.activity.add_directory_audit(user, time.time(), "Update user")
    # A 403 (e.g. a tenant without an Entra ID P1 licence) fails the log at once.
    quiet_tenant.faults.add("error", path="/auditLogs/signIns", status=403, count=5)
    partial = ingest(env)
    quiet_tenant.faults.clear()
    # The other logs commit and the policies still run; the check names the failing log.
    assert partial.success, failure_message(partial)
    assert check_results(partial) == {"audit_logs_read": False, "every_connection_read": True}
    assert {step.step_key for step in partial.get_step_success_events()} >= {"activities", "alerts"}
    errors = query(
        data_dir,
        "SELECT source, last_error FROM activity_sources_state WHERE last_error IS NOT NULL",
    )
    assert [source for source, _ in errors] == ["signIns"]
    assert "AuditLog.Read.All" in errors[0][1]
    state = dict(query(data_dir, "SELECT source, read_until FROM activity_sources_state"))
    assert state["signIns"] == first_state["signIns"]  # not moved: the next run reads again
    assert state["directoryAudits"] > first_state["directoryAudits"]
    stored = [row[0] for row in query(data_dir, "SELECT event_id FROM activities")]
    assert any(audited in e for e in stored)
    assert not any(signed_in in e for e in stored)

    recovered = ingest(env)
    assert recovered.success, failure_message(recovered)
    assert check_results(recovered) == {"audit_logs_read": True, "every_connection_read": True}
    stored = [row[0] for row in query(data_dir, "SELECT event_id FROM activities")]
    assert sum(signed_in in e for e in stored) == 1
    assert sum(audited in e for e in stored) == 1


def test_an_event_published_late_is_read_by_the_overlap(env, quiet_tenant: GraphSandbox) -> None:
    user = next(iter(quiet_tenant.org.users))
    happened = time.time() - 120
    # The log publishes it only after the first read is done.
    visible = time.time() + 8  # a margin for the first read on a loaded machine
    late = quiet_tenant.activity.add_sign_in(user, happened, country="US", visible_at=visible)
    assert ingest(env).success
    _, _, data_dir = env
    assert query(data_dir, "SELECT count(*) FROM activities") == [(0,)]
    time.sleep(max(0.0, visible - time.time()) + 0.5)
    assert ingest(env).success
    rows = query(data_dir, "SELECT event_id FROM activities")
    assert len(rows) == 1 and late in rows[0][0]


def test_concurrent_ingests_store_each_event_once(env, quiet_tenant: GraphSandbox) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from groupsync_pipeline.activity_ingest import ingest_connection
    from groupsync_pipeline.config import load_connections

    _, connections, data_dir = env
    (connection,) = load_connections(connections)
    users = list(quiet_tenant.org.users)[:20]
    now = time.time()
    injected = [
        quiet_tenant.activity.add_sign_in(user, now - 30 + i, country="US")
        for i, user in enumerate(users)
    ]
    lake = Lake(data_dir)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda _: ingest_connection(connection, lake), range(2)))
    # Both read the same events; the writer lock serializes the merges and the second one
    # finds them stored.
    assert sorted(o.merge.new for o in outcomes) == [0, len(injected)]
    rows = query(data_dir, "SELECT event_id FROM activities WHERE source = 'signIns'")
    assert sorted(r[0] for r in rows) == sorted(injected)
    ids = query(data_dir, "SELECT count(DISTINCT activity_id), count(*) FROM activities")
    assert ids[0][0] == ids[0][1]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GROUPSYNC_ACTIVITY_OVERLAP_MINUTES", "two hours"),
        ("GROUPSYNC_ACTIVITY_OVERLAP_MINUTES", "-5"),
        ("GROUPSYNC_ACTIVITY_BACKFILL_HOURS", "9999"),
    ],
)
def test_bad_ingest_settings_fail_clearly_and_read_nothing(
    env, quiet_tenant: GraphSandbox, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    _, _, data_dir = env
    quiet_tenant.reset_log()
    monkeypatch.setenv(variable, value)
    result = ingest(env)
    assert not result.success
    assert f"{variable} must be a number from" in failure_message(result)
    assert not any(r.path.startswith("/v1.0/auditLogs") for r in quiet_tenant.requests)
    assert not Lake(data_dir).exists()


def test_an_unknown_connection_in_run_config_fails_clearly(env) -> None:
    instance, connections, data_dir = env
    result = run_job(
        instance, "ingest_activities", {"connections": ["nope"]}, connections, data_dir
    )
    assert not result.success
    message = failure_message(result)
    assert "nope" in message and "contoso" in message  # names the configured connections
    assert not Lake(data_dir).exists()


def actors_by_event(data_dir: Path) -> dict[str, tuple[str | None, str | None]]:
    rows = query(data_dir, "SELECT event_id, actor_account_id, actor_type FROM activities")
    return {event_id: (account, kind) for event_id, account, kind in rows}


def external_members(data_dir: Path) -> list[str]:
    rows = query(
        data_dir,
        "SELECT account_id FROM group_memberships "
        "WHERE group_id = 'contoso:auto:external' ORDER BY 1",
    )
    return [row[0] for row in rows]


def test_actors_are_directory_accounts_and_services_are_not_people(
    env, quiet_tenant: GraphSandbox
) -> None:
    instance, connections, data_dir = env
    org, stream = quiet_tenant.org, quiet_tenant.activity
    pools = stream.pools()
    silent_guest = org.users[pools["quiet_guests"][0]]  # never signs in
    admins = set(org.admin_user_ids())
    # A guest who signs in, but only after a file event.
    guest = next(org.users[g] for g in pools["guests"] if g not in admins)
    quiet_member = org.users[pools["quiet_members"][0]]  # no sign-in, no imported group
    assert import_group(instance, "HR", connections, data_dir).success
    assert ingest(env).success  # the automatic groups exist from here on
    time.sleep(1.1)

    now = time.time()
    # SharePoint names people by their UPN in lower case: "#ext#" for guests.
    guest_file = stream.add_file_event(guest.user_principal_name, now, "FileAccessed", "a.docx")
    silent_file = stream.add_file_event(silent_guest.user_principal_name, now, "FilePreviewed")
    member_file = stream.add_file_event(quiet_member.user_principal_name, now, "FileAccessed")
    crawler = stream.add_file_event("app@sharepoint", now, "FileAccessed", "b.docx")
    system_file = stream.add_file_event("SHAREPOINT\\system", now, "FileModified", "c.docx")
    system_audit = stream.add_directory_audit(None, now, "Update user", system=True)
    outsider = stream.add_file_event("someone@partner.example", now, "FileAccessed", "d.pptx")
    time.sleep(3.5)  # the blob slot holding the file events has ended (2 s), with a margin
    quiet_tenant.reset_log()
    second = ingest(env)
    assert second.success, failure_message(second)
    # The unknown names were looked up in the directory, 20 to a $batch: one here.
    assert quiet_tenant.request_count("/v1.0/$batch") == 1

    later = time.time()
    guest_sign_in = stream.add_sign_in(guest.id, later, country="GB")
    guest_again = stream.add_file_event(guest.user_principal_name, later, "FileAccessed", "e.docx")
    time.sleep(3.5)
    quiet_tenant.reset_log()
    third = ingest(env)
    assert third.success, failure_message(third)
    assert quiet_tenant.request_count("/v1.0/$batch") == 0  # all known by now

    actors = {
        key: value
        for key, value in actors_by_event(data_dir).items()
        if any(injected in key for injected in (system_audit,))
    }
    assert list(actors.values()) == [(None, "system")]
    actors = actors_by_event(data_dir)
    assert actors[guest_file] == (guest.id, "user")
    assert actors[guest_again] == (guest.id, "user")
    assert actors[guest_sign_in] == (guest.id, "user")
    assert actors[silent_file] == (silent_guest.id, "user")
    assert actors[member_file] == (quiet_member.id, "user")
    assert actors[crawler] == (None, "application")
    assert actors[system_file] == (None, "system")
    assert actors[outsider] == ("someone@partner.example", "user")
    # Each outside person once, by their directory account; services and the system never.
    assert external_members(data_dir) == sorted(
        [guest.id, silent_guest.id, "someone@partner.example"]
    )
    made_up = query(data_dir, "SELECT account_id FROM accounts WHERE account_id LIKE '%@%'")
    assert made_up == [("someone@partner.example",)]
    tags = tags_by_event(data_dir)
    assert tags[silent_file] == ["External"] and tags[guest_file] == ["External"]
    assert tags[member_file] == tags[crawler] == tags[system_file] == []


def test_when_the_directory_cannot_be_asked_no_one_is_made_up(
    env, quiet_tenant: GraphSandbox
) -> None:
    _, _, data_dir = env
    org, stream = quiet_tenant.org, quiet_tenant.activity
    silent_guest = org.users[stream.pools()["quiet_guests"][0]]
    assert ingest(env).success
    time.sleep(1.1)
    now = time.time()
    silent_file = stream.add_file_event(silent_guest.user_principal_name, now, "FilePreviewed")
    outsider = stream.add_file_event("someone@partner.example", now, "FileAccessed", "d.pptx")
    time.sleep(3.5)  # a 2 s blob slot has ended, with a margin for a loaded machine
    # Every lookup refused (as without User.Read.All): the ingest goes on and says so.
    quiet_tenant.faults.add("error", path="/users?$filter", status=403, count=100)
    try:
        result = ingest(env)
    finally:
        quiet_tenant.faults.clear()
    assert result.success, failure_message(result)
    assert check_results(result) == {"audit_logs_read": False, "every_connection_read": True}
    errors = query(
        data_dir, "SELECT source, last_error FROM activity_sources_state WHERE last_error NOTNULL"
    )
    assert [source for source, _ in errors] == ["users"] and "User.Read.All" in errors[0][1]
    actors = actors_by_event(data_dir)
    # Who they were is unknown: stored without an account rather than as made-up people.
    assert actors[silent_file] == (None, "user") and actors[outsider] == (None, "user")
    assert external_members(data_dir) == []
    assert query(data_dir, "SELECT count(*) FROM accounts WHERE account_id LIKE '%@%'") == [(0,)]

    # The next ingest asks again for the names it meets, and the check recovers.
    later = time.time()
    again = stream.add_file_event(silent_guest.user_principal_name, later, "FileAccessed")
    time.sleep(3.5)  # a 2 s blob slot has ended, with a margin for a loaded machine
    recovered = ingest(env)
    assert recovered.success, failure_message(recovered)
    assert check_results(recovered) == {"audit_logs_read": True, "every_connection_read": True}
    assert actors_by_event(data_dir)[again] == (silent_guest.id, "user")
    assert external_members(data_dir) == [silent_guest.id]
