"""``groupsync demo``: the whole lifecycle against the sandbox tenant, with real parts.

A person asks for groups (import requests), the import request sensor launches one real Dagster
run per request, completion emails arrive at an SMTP sink on loopback, the tenant changes, and
the hourly sync (the delta query) records who joined and left. Runs execute in this process on
a Dagster instance kept under the data directory, so they can be browsed afterwards.
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

DEMO_GROUPS = ("HR", "Executives", "IT admins", "All Company")
DEMO_SECRET_ENV = "GROUPSYNC_DEMO_CLIENT_SECRET"
DEMO_NOTIFY = "security-team@example.com"
DEMO_EVOLVE_STEPS = 3  # hours of change in the sandbox tenant between the two syncs
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
        sandbox = stack.enter_context(GraphSandbox())
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
