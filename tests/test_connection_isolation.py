"""One connection that fails, even with an error nobody expected, never stops the others.

Three connections to one sandbox tenant; the middle one's ca_bundle stops being a
certificate after the run validated the connections file (a file replaced on disk), so its
connector fails with ssl.SSLError, which is no ConnectorError. The connections before and
after it must commit, and the run must fail naming it, with the traceback in the run log.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from groupsync_pipeline.config import ConfigError, Connection
from groupsync_pipeline.defs.activity_assets import activities
from groupsync_pipeline.defs.assets import group_catalog, imported_group_members
from groupsync_pipeline.defs.resources import ConnectionsResource, LakeResource
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.sandbox.seed import build_organisation
from groupsync_pipeline.storage.lake import Lake
from tests.conftest import SECRET_ENV, connection_entry
from tests.pipeline_helpers import check_results, failure_message, import_group, query, run_job

NAMES = ("first", "broken", "last")


class Tripwire:
    """Runs an action at the tenant's next request, once armed.

    The sandbox consults its clock before every Graph request (to evolve the tenant), so the
    first request of the run's first connection, after the run has read and validated the
    connections file, is where the broken connection's certificate file gets replaced.
    """

    def __init__(self) -> None:
        self.action: Callable[[], None] | None = None

    def clock(self) -> float:
        action, self.action = self.action, None
        if action is not None:
            action()
        return time.time()


@pytest.fixture
def setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dg.DagsterInstance, Path, Path, Path, Tripwire]]:
    tripwire = Tripwire()
    # Evolution steps 1e9 s apart: the tenant never changes, but its clock is asked per request.
    with GraphSandbox(build_organisation(), evolve_every=1e9, clock=tripwire.clock) as tenant:
        monkeypatch.setenv(SECRET_ENV, tenant.client_secret)
        monkeypatch.setenv("GROUPSYNC_ACTIVITY_BACKFILL_HOURS", "1")
        monkeypatch.delenv("GROUPSYNC_POLICIES", raising=False)
        monkeypatch.delenv("GROUPSYNC_SMTP_HOST", raising=False)
        ca_copy = tmp_path / "broken-ca.pem"
        shutil.copyfile(tenant.ca_bundle, ca_copy)
        entries = [
            connection_entry(tenant, name, ca_bundle=str(ca_copy))
            if name == "broken"
            else connection_entry(tenant, name)
            for name in NAMES
        ]
        connections = tmp_path / "connections.yaml"
        connections.write_text(yaml.safe_dump({"connections": entries}))
        with dg.DagsterInstance.ephemeral() as instance:
            yield instance, connections, tmp_path / "data", ca_copy, tripwire


def run_with_broken_certificate(setup, job: str) -> dg.ExecuteInProcessResult:
    instance, connections, data_dir, ca_copy, tripwire = setup
    tripwire.action = lambda: ca_copy.write_text("not a certificate any more\n")
    result = run_job(instance, job, {}, connections, data_dir)
    assert tripwire.action is None, "the tenant was never asked: the fault did not fire"
    return result


def assert_broken_alone_failed(setup, result: dg.ExecuteInProcessResult, what: str) -> None:
    instance = setup[0]
    assert not result.success
    message = failure_message(result)
    assert f"{what} failed for 1 of 3 connections" in message
    assert "broken: unexpected SSLError" in message
    assert "first:" not in message and "last:" not in message
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    tracebacks = [m for m in logs if m.startswith(f"broken: {what} failed with an unexpected")]
    assert len(tracebacks) == 1 and "Traceback (most recent call last)" in tracebacks[0]


def per_connection(data_dir: Path, sql: str) -> dict[str, int]:
    return dict(query(data_dir, sql))


def test_catalog_refresh_isolates_each_connection(setup) -> None:
    result = run_with_broken_certificate(setup, "refresh_group_catalogs")
    assert_broken_alone_failed(setup, result, "catalog refresh")
    counts = per_connection(
        setup[2], "SELECT connection, count(*) FROM group_catalog GROUP BY connection"
    )
    assert set(counts) == {"first", "last"} and counts["first"] == counts["last"] > 0


def test_sync_isolates_each_connection(setup) -> None:
    instance, connections, data_dir, _, _ = setup
    for name in NAMES:
        assert import_group(instance, "HR", connections, data_dir, connection=name).success
    result = run_with_broken_certificate(setup, "sync_group_memberships")
    assert_broken_alone_failed(setup, result, "sync")
    synced = per_connection(
        data_dir,
        "SELECT connection, count(*) FROM connection_sync_state "
        "WHERE last_full_sync_reason = 'first sync' GROUP BY connection",
    )
    assert synced == {"first": 1, "last": 1}


def test_activity_read_isolates_each_connection(setup) -> None:
    result = run_with_broken_certificate(setup, "ingest_activities")
    # The run goes on to the policies for the connections that committed: the failed one is
    # reported by the check every_connection_read (and in the run log), not by failing the
    # step, which would skip alerts for everyone.
    assert result.success
    checks = check_results(result)
    assert checks["every_connection_read"] is False
    (evaluation,) = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == "every_connection_read"
    ]
    assert "activity read failed for 1 of 3 connections" in (evaluation.description or "")
    assert "broken: unexpected SSLError" in (evaluation.description or "")
    assert any(
        e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key == dg.AssetKey("alerts")
        for e in result.all_events
    )
    logs = [entry.user_message for entry in setup[0].all_logs(result.run_id)]
    tracebacks = [m for m in logs if m.startswith("broken: activity read failed with an unexp")]
    assert len(tracebacks) == 1 and "Traceback (most recent call last)" in tracebacks[0]
    read = per_connection(
        setup[2],
        "SELECT connection, count(*) FROM activity_sources_state "
        "WHERE last_read_at IS NOT NULL GROUP BY connection",
    )
    assert set(read) == {"first", "last"} and read["first"] == read["last"] >= 4


# --- interrupts are not failures of one connection: they end the run ------------------------

REACHED: list[str] = []


@dataclasses.dataclass(frozen=True)
class InterruptedConnection(Connection):
    """A connection whose use is interrupted (Ctrl-C, a shutdown) as its secret is read."""

    interrupt: type[BaseException] = KeyboardInterrupt

    def read_secret(self) -> str:
        raise self.interrupt()


@dataclasses.dataclass(frozen=True)
class LaterConnection(Connection):
    def read_secret(self) -> str:
        REACHED.append(self.name)
        raise ConfigError("not reached when the run was interrupted")


class TwoConnections(ConnectionsResource):
    interrupt: str = "KeyboardInterrupt"

    def all(self) -> list[Connection]:
        fields = {"app": "office365", "tenant_id": "t", "client_id": "c", "client_secret_env": "X"}
        interrupt = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}
        return [
            InterruptedConnection(name="a", interrupt=interrupt[self.interrupt], **fields),
            LaterConnection(name="b", **fields),
        ]


@pytest.mark.parametrize("interrupt", ["KeyboardInterrupt", "SystemExit"])
@pytest.mark.parametrize("asset", [group_catalog, imported_group_members, activities])
def test_an_interrupt_ends_the_run_instead_of_skipping_to_the_next_connection(
    tmp_path: Path, interrupt: str, asset: dg.AssetsDefinition
) -> None:
    REACHED.clear()
    with Lake(tmp_path).write() as conn:  # an imported group each: the sync has work
        for name in ("a", "b"):
            conn.execute(
                "INSERT INTO user_groups (group_id, name, type, connection, remote_group_id, "
                "member_count, group_key) VALUES (?, 'G', 'imported', ?, 'g', 0, 1)",
                [f"{name}:g", name],
            )
    result = dg.materialize(
        [asset],
        resources={
            "connections": TwoConnections(interrupt=interrupt),
            "lake": LakeResource(data_dir=str(tmp_path)),
        },
        selection=[asset.key],
        raise_on_error=False,
    )
    assert not result.success
    assert REACHED == []
    assert "failed for 1 of 2 connections" not in failure_message(result)
