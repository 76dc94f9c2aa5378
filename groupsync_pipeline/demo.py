"""``groupsync demo``: the whole lifecycle against the sandbox tenant, with real parts.

A person asks for groups (import requests), the import request sensor launches one real Dagster
run per request, completion emails arrive at an SMTP sink on loopback, the tenant changes, and
the hourly sync (the delta query) records who joined and left. Then the audit logs are read,
each activity tagged with its actor's groups, and the example policies raise alerts (emailed to
the sink). Runs execute in this process on a Dagster instance kept under the data directory, so
they can be browsed afterwards.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from groupsync_pipeline.config import CONNECTIONS_ENV, DATA_DIR_ENV
from groupsync_pipeline.policies import EXAMPLE_POLICIES, POLICIES_ENV

DEMO_GROUPS = ("HR", "Executives", "IT admins", "All Company")
DEMO_SECRET_ENV = "GROUPSYNC_DEMO_CLIENT_SECRET"
DEMO_NOTIFY = "security-team@example.com"
DEMO_EVOLVE_STEPS = 3  # hours of change in the sandbox tenant between the two syncs
DEMO_BACKFILL_HOURS = "0.5"  # audit history read by the first ingest (tags start at imports)
DEMO_BLOB_SECONDS = 5  # file-event blobs every 5 s, not 5-15 minutes: the demo cannot wait
EXECUTIVE_BURST = 35  # downloads in the executive scene (the example policy's threshold is 30)
EXAMPLE_QUERIES = (
    (
        "Imported groups, their size and freshness",
        "SELECT name, member_count, imported_at, last_synced_at FROM user_groups ORDER BY name",
    ),
    (
        "Who is in HR now",
        "SELECT email, display_name, member_since FROM group_members "
        "WHERE group_name = 'HR' ORDER BY email LIMIT 5",
    ),
    (
        "External accounts (guests) per group",
        "SELECT group_name, count(*) AS externals FROM group_members WHERE is_external "
        "GROUP BY group_name ORDER BY externals DESC",
    ),
    (
        "Who joined or left since the import (membership history)",
        "SELECT g.name AS group_name, a.email, m.valid_from, m.valid_to FROM group_memberships m "
        "JOIN user_groups g USING (group_id) "
        "LEFT JOIN accounts a ON a.connection = m.connection AND a.account_id = m.account_id "
        "WHERE m.valid_to IS NOT NULL OR m.valid_from > g.imported_at "
        "ORDER BY coalesce(m.valid_to, m.valid_from) DESC LIMIT 8",
    ),
    (
        "Activities of the HR group (view group_activities)",
        "SELECT occurred_at, actor_email, action, object_name FROM group_activities "
        "WHERE group_name = 'HR' ORDER BY occurred_at DESC LIMIT 5",
    ),
    (
        "Activity per group and source since the groups were imported",
        "SELECT group_name, source, count(*) AS activities FROM group_activities "
        "GROUP BY ALL ORDER BY group_name, source",
    ),
    (
        "Alerts the policies raised",
        "SELECT policy, severity, actor_email, activity_count, summary FROM alerts "
        "ORDER BY raised_at, policy",
    ),
    (
        "Import requests",
        "SELECT request_id, group_name, status, notify_email, members, duration_seconds "
        "FROM import_requests ORDER BY request_id",
    ),
)

Echo = Callable[[str], None]


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def sandbox_connections_yaml(tenant: Any, secret_env: str) -> str:
    """A connections file for a running sandbox tenant, as a real tenant would be configured."""
    entry = {
        "name": "sandbox",
        "app": "office365",
        "tenant_id": tenant.tenant_id,
        "client_id": tenant.client_id,
        "client_secret_env": secret_env,
        "authority_host": tenant.authority_host,
        "graph_url": tenant.graph_url,
        "management_url": tenant.management_url,
        "ca_bundle": tenant.ca_bundle,
    }
    return yaml.safe_dump({"connections": [entry]}, sort_keys=False)


def _require_success(result: Any, what: str) -> None:
    if result.success:
        return
    messages = [event.message for event in result.all_events if event.is_failure and event.message]
    raise DemoError(f"{what} failed: {messages[-1] if messages else 'see the run log'}")


def _metadata(result: Any) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        return {key: value.value for key, value in materialization.metadata.items()}
    return {}


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the demo's duration, then put the old values back."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_demo(data_dir: Path, echo: Echo) -> None:
    import dagster as dg
    import duckdb

    from groupsync_pipeline.definitions import defs
    from groupsync_pipeline.defs.resources import WarehouseResource
    from groupsync_pipeline.import_requests import RequestRefusedError, request_imports
    from groupsync_pipeline.sandbox.graph import GraphSandbox
    from groupsync_pipeline.smtp_sink import SmtpSink
    from groupsync_pipeline.storage.warehouse import Warehouse

    data_dir.mkdir(parents=True, exist_ok=True)
    warehouse = Warehouse(data_dir)
    started = time.monotonic()
    with ExitStack() as stack:
        sandbox = stack.enter_context(GraphSandbox(management_slot_seconds=DEMO_BLOB_SECONDS))
        sink = stack.enter_context(SmtpSink())
        echo(f"Sandbox Microsoft 365 tenant listening on {sandbox.base_url}")
        echo(f"SMTP sink (receives the completion emails) on {sink.host}:{sink.port}")
        connections_file = data_dir / "demo-connections.yaml"
        connections_file.write_text(sandbox_connections_yaml(sandbox, DEMO_SECRET_ENV))
        # The demo configures itself as a deployment would: through the environment.
        stack.enter_context(
            _environment(
                {
                    DEMO_SECRET_ENV: sandbox.client_secret,  # the sandbox's published fake secret
                    CONNECTIONS_ENV: str(connections_file),
                    DATA_DIR_ENV: str(data_dir),
                    "GROUPSYNC_SMTP_HOST": sink.host,
                    "GROUPSYNC_SMTP_PORT": str(sink.port),
                    "GROUPSYNC_SMTP_SECURITY": "none",  # loopback only
                    "GROUPSYNC_SMTP_FROM": "groupsync@example.com",
                    "GROUPSYNC_ACTIVITY_BACKFILL_HOURS": DEMO_BACKFILL_HOURS,
                    POLICIES_ENV: str(_demo_policies(data_dir)),
                }
            )
        )
        (data_dir / "dagster").mkdir(exist_ok=True)
        instance = dg.DagsterInstance.local_temp(
            str(data_dir / "dagster"), overrides={"telemetry": {"enabled": False}}
        )
        result = defs.resolve_job_def("refresh_group_catalogs").execute_in_process(
            run_config=_QUIET, instance=instance, raise_on_error=False
        )
        _require_success(result, "catalog refresh")
        echo("Group catalog refreshed.")

        for group in DEMO_GROUPS:
            try:
                (request_id,) = request_imports(
                    "sandbox", [group], warehouse, notify_email=DEMO_NOTIFY
                )
            except RequestRefusedError as exc:
                echo(f"Not requested again: {exc}")
                continue
            echo(f"Requested import of {group!r}: request {request_id} (notify {DEMO_NOTIFY})")

        # The sensor's own log lines would repeat what the demo prints.
        stack.callback(logging.getLogger("dagster").setLevel, logging.getLogger("dagster").level)
        logging.getLogger("dagster").setLevel(logging.WARNING)
        sensor = defs.resolve_sensor_def("import_request_sensor")
        import_job = defs.resolve_job_def("import_user_group")
        # Requests from an earlier demo are done, not pending: no cursor is needed to skip them.
        resources = {"warehouse": WarehouseResource(data_dir=str(data_dir))}
        tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=resources))
        for run_request in tick.run_requests or []:
            step_started = time.monotonic()
            result = import_job.execute_in_process(
                run_config={**run_request.run_config, **_QUIET},
                tags={**run_request.tags, "dagster/run_key": run_request.run_key or ""},
                instance=instance,
                raise_on_error=False,
            )
            _require_success(result, f"import run {run_request.run_key}")
            metadata = _metadata(result)
            echo(
                f"Imported {metadata.get('group')!r}: {metadata.get('members')} members from "
                f"{metadata.get('pages_fetched')} pages in {time.monotonic() - step_started:.1f} s "
                f"(run {result.run_id[:8]}, request {metadata.get('request_id')})"
            )
        sent_before = len(sink.received)
        sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources=resources)
        )
        emails = sink.received[sent_before:]
        echo(f"\nThe sensor's next tick sent {len(emails)} completion emails. The first:")
        if emails:
            message = emails[0].message
            echo(f"  To: {message['To']}\n  Subject: {message['Subject']}")
            body = message.get_body(("plain",))
            for line in (body.get_content() if body else "").strip().splitlines():
                echo(f"  | {line}")

        sync_job = defs.resolve_job_def("sync_group_memberships")
        for label in ("First hourly sync", f"After {DEMO_EVOLVE_STEPS} hours of tenant changes"):
            if label.startswith("After"):
                sandbox.org.evolve(DEMO_EVOLVE_STEPS)
            sandbox.reset_log()
            result = sync_job.execute_in_process(
                run_config=_QUIET, instance=instance, raise_on_error=False
            )
            _require_success(result, "membership sync")
            metadata = _metadata(result)
            (outcome,) = metadata["connections"]
            graph_requests = sum(1 for r in sandbox.requests if r.path.startswith("/v1.0"))
            echo(
                f"{label}: {outcome['mode']} sync"
                + (f" ({outcome['full_reason']})" if outcome["full_reason"] else "")
                + f", {graph_requests} Graph request{'s' if graph_requests != 1 else ''}: "
                f"{outcome['groups_synced']} groups, "
                f"+{outcome['joined']} joined / -{outcome['left']} left"
            )

        _activities_and_alerts(defs, instance, sandbox, sink, echo)

    echo(f"\nDone in {time.monotonic() - started:.1f} s.")
    echo(f"DuckDB file to query: {warehouse.published_path}")
    echo(f"  duckdb -readonly {warehouse.published_path}")
    conn = duckdb.connect(str(warehouse.published_path), read_only=True)
    try:
        for title, sql in EXAMPLE_QUERIES:
            echo(f"\n-- {title}\n{sql};")
            echo(conn.execute(sql).df().to_string(index=False))
    finally:
        conn.close()


def _demo_policies(data_dir: Path) -> Path:
    """The bundled example policies, each emailing the demo's security team."""
    from importlib import resources

    document = yaml.safe_load(
        resources.files("groupsync_pipeline").joinpath(EXAMPLE_POLICIES).read_text()
    )
    for policy in document["policies"]:
        policy["notify"] = [DEMO_NOTIFY]
    path = data_dir / "demo-policies.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _activities_and_alerts(defs: Any, instance: Any, sandbox: Any, sink: Any, echo: Echo) -> None:
    """Read the audit logs, play three scenes in the tenant, read again: tags and alerts."""
    job = defs.resolve_job_def("ingest_activities")

    def ingest(label: str) -> None:
        result = job.execute_in_process(run_config=_QUIET, instance=instance, raise_on_error=False)
        _require_success(result, "activity ingest")
        metadata: dict[str, Any] = {}
        for event in result.get_asset_materialization_events():
            materialization = event.event_specific_data.materialization
            metadata.update({k: v.value for k, v in materialization.metadata.items()})
        echo(
            f"{label}: {metadata.get('new activities')} new activities "
            f"({metadata.get('events read')} read), {metadata.get('group tags')} group tags, "
            f"{metadata.get('alerts raised')} alerts"
        )

    echo("")
    ingest(f"First activity read (the last {DEMO_BACKFILL_HOURS} h of audit logs)")
    echo(
        "  Activities before a group's import are never tagged with it; the automatic groups "
        "External and Office 365 administrators start now."
    )
    org, stream = sandbox.org, sandbox.activity
    hr = org.transitive_user_ids(org.group_by_name("HR").id)[0]
    executive = org.transitive_user_ids(org.group_by_name("Executives").id)[0]
    admin = sorted(org.direct_admin_user_ids())[0]
    upn = {uid: org.users[uid].user_principal_name for uid in (hr, executive, admin)}
    now = time.time()
    stream.add_file_event(upn[hr], now, "FileAccessed", "Salary bands 2026.xlsx", "/sites/HR")
    for i in range(EXECUTIVE_BURST):
        stream.add_file_event(
            upn[executive],
            now + i / 10,
            "FileDownloaded",
            f"Board pack {i + 1:02d}.pdf",
            "/sites/Executives",
            ip="203.0.113.77",
        )
    stream.add_sign_in(admin, now, country="NG", city="Lagos", ip="198.51.100.23")
    stream.add_directory_audit(admin, now + 1, "Reset user password", ip="198.51.100.23")
    echo(
        "The sandbox plays three scenes now: "
        f"{upn[hr]} (HR) opens 'Salary bands 2026.xlsx'; "
        f"{upn[executive]} (Executives) downloads {EXECUTIVE_BURST} board documents; "
        f"{upn[admin]} (an administrator) signs in from Lagos and resets a password."
    )
    time.sleep(EXECUTIVE_BURST / 10 + DEMO_BLOB_SECONDS + 1.5)  # until their blobs are out
    sent_before = len(sink.received)
    ingest("Next activity read")
    emails = sink.received[sent_before:]
    echo(
        f"Alert emails sent: {len(emails)}"
        + (f"; the first: {emails[0].message['Subject']}" if emails else "")
    )
