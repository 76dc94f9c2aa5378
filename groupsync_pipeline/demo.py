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
import shlex
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
# The second read looks back this far, not 2 hours: the demo's first read went back only 30
# minutes, and the sandbox's audit delay is minutes (a real tenant's can be hours).
DEMO_OVERLAP_MINUTES = "10"
DEMO_BLOB_SECONDS = 5  # file-event blobs every 5 s, not 5-15 minutes: the demo cannot wait
EXECUTIVE_BURST = 35  # downloads in the executive scene (the example policy's threshold is 30)
BURST_SPACING = 0.02  # seconds between the executive's downloads
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
        "SELECT g.name AS group_name, a.email, m.valid_from AS joined_at, m.valid_to AS left_at "
        "FROM group_memberships m "
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
        "SELECT request_id, group_name, status, notify_email, members, pages, "
        "round(duration_seconds, 1) AS seconds FROM import_requests ORDER BY request_id",
    ),
)

OPEN_INTERVAL = {"left_at": "(member now)"}  # how the demo shows a NULL end: still a member
NEXT_SQL = "SELECT name, member_count, last_synced_at FROM user_groups ORDER BY name"

Echo = Callable[[str], None]


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """``1 page``, ``2 pages``, ``1 activity``, ``3 activities``."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


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
    started = time.monotonic()  # the whole demo, Dagster's import included
    import dagster as dg

    from groupsync_pipeline.dagster_home import open_dagster_instance
    from groupsync_pipeline.definitions import defs
    from groupsync_pipeline.defs.resources import LakeResource
    from groupsync_pipeline.import_requests import RequestRefusedError, request_imports
    from groupsync_pipeline.import_runs import REQUEST_ID_TAG
    from groupsync_pipeline.sandbox.graph import GraphSandbox
    from groupsync_pipeline.smtp_sink import SmtpSink
    from groupsync_pipeline.storage.control import ControlStore
    from groupsync_pipeline.storage.lake import Lake

    data_dir.mkdir(parents=True, exist_ok=True)
    lake = Lake(data_dir)
    control = ControlStore(data_dir)
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
                    "GROUPSYNC_ACTIVITY_OVERLAP_MINUTES": DEMO_OVERLAP_MINUTES,
                    POLICIES_ENV: str(_demo_policies(data_dir)),
                }
            )
        )
        # The Dagster home `dg dev` opens (README): the emails' run links work in the UI.
        instance = stack.enter_context(open_dagster_instance(data_dir))
        result = defs.resolve_job_def("refresh_group_catalogs").execute_in_process(
            run_config=_QUIET, instance=instance, raise_on_error=False
        )
        _require_success(result, "catalog refresh")
        echo("Group catalog refreshed.")

        for group in DEMO_GROUPS:
            try:
                (request_id,) = request_imports("sandbox", [group], lake, notify_email=DEMO_NOTIFY)
            except RequestRefusedError as exc:
                echo(f"Not requested again: {exc}")
                continue
            echo(f"Requested import of {group!r}: request {request_id} (notify {DEMO_NOTIFY})")

        sensor = defs.resolve_sensor_def("import_request_sensor")
        import_job = defs.resolve_job_def("import_user_group")
        resources = {"lake": LakeResource(data_dir=str(data_dir))}

        def sensor_context() -> dg.SensorEvaluationContext:
            context = dg.build_sensor_context(instance=instance, resources=resources)
            context.log.setLevel(logging.WARNING)  # its lines would repeat what the demo prints
            return context

        # The sensor launches the requests not launched yet (those of an earlier demo that was
        # interrupted are settled or asked again by its later ticks, as under the daemon).
        tick = sensor.evaluate_tick(sensor_context())
        for run_request in tick.run_requests or []:
            result = import_job.execute_in_process(
                run_config={**run_request.run_config, **_QUIET},
                tags={**run_request.tags, "dagster/run_key": run_request.run_key or ""},
                instance=instance,
                raise_on_error=False,
            )
            _require_success(result, f"import run {run_request.run_key}")
            # What the request recorded is what its email and the tables say: one duration.
            request = control.get(int(run_request.tags[REQUEST_ID_TAG]))
            assert request is not None and request.members is not None
            echo(
                f"Imported {request.group_name!r}: {counted(request.members, 'member')} from "
                f"{counted(request.pages or 0, 'page')} in {request.duration_seconds or 0:.1f} s "
                f"(run {result.run_id[:8]}, request {request.request_id})"
            )
        sent_before = len(sink.received)
        sensor.evaluate_tick(sensor_context())
        emails = sink.received[sent_before:]
        echo(
            f"\nThe sensor's next tick sent {counted(len(emails), 'completion email')}."
            + (" The first:" if emails else "")
        )
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
                + f", {counted(graph_requests, 'Graph request')}: "
                f"{counted(outcome['groups_synced'], 'group')}, "
                f"+{outcome['joined']} joined / -{outcome['left']} left"
            )

        _activities_and_alerts(defs, instance, sandbox, sink, echo)

    echo(f"\nThe demo took {time.monotonic() - started:.0f} s.")
    _example_queries(data_dir, echo)
    _next_steps(data_dir, echo)


def _example_queries(data_dir: Path, echo: Echo) -> None:
    """The example queries with their results, as `groupsync sql` shows them."""
    from groupsync_pipeline.analyst_data import analyst_data_path, open_analyst_data
    from groupsync_pipeline.investigation import render
    from groupsync_pipeline.sql_shell import run_statements

    echo(f"The data (read-only with `groupsync sql`): {analyst_data_path(data_dir)}")
    with open_analyst_data(data_dir) as conn:
        for title, sql in EXAMPLE_QUERIES:
            (found,) = run_statements(conn, sql, limit=0)
            assert found is not None
            for column, words in OPEN_INTERVAL.items():
                if column in found.frame:
                    values = found.frame[column]
                    found.frame[column] = values.astype(object).where(values.notna(), words)
            echo(f"\n-- {title}\n{sql};")
            echo(render(found, "table"))


def _project_root() -> Path | None:
    """The checkout `dg dev` runs in (pyproject.toml with [tool.dg]), if installed from one."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.dg" in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def _next_steps(data_dir: Path, echo: Echo) -> None:
    """The exact commands to go on from here."""
    root = _project_root()
    ui = "export DAGSTER_HOME=$(groupsync dagster-home) && dg dev"
    if root is not None and root != Path.cwd().resolve():
        ui = f"cd {shlex.quote(str(root))} && {ui}"
    steps = (
        ("The commands below read this data directory", f"export {DATA_DIR_ENV}="
         f"{shlex.quote(str(data_dir))}"),
        ("The Dagster UI at http://localhost:3000, with the runs the emails link to", ui),
        ("HR's activities in the last hour, with their groups",
         "groupsync activities --group HR --since 1h"),
        ("The alerts the policies raised", "groupsync alerts"),
        ("Your own SQL, read-only (tables and views: README, Storage)",
         f'groupsync sql "{NEXT_SQL}"'),
        ("Or a prompt: end statements with ';', .tables lists them, .quit leaves",
         "groupsync sql"),
    )  # fmt: skip
    echo("\nNext steps:")
    for why, command in steps:
        echo(f"  # {why}:\n  {command}")


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
            f"{label}: {counted(metadata['new activities'], 'new activity', 'new activities')} "
            f"({metadata['events read']} read), {counted(metadata['group tags'], 'group tag')}, "
            f"{counted(metadata['alerts raised'], 'alert')}"
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
            now + i * BURST_SPACING,
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
    # Until the blobs holding them are published (the last one when its slot ends).
    time.sleep(EXECUTIVE_BURST * BURST_SPACING + DEMO_BLOB_SECONDS + 1.5)
    sent_before = len(sink.received)
    ingest("Next activity read")
    emails = sink.received[sent_before:]
    echo(
        f"Alert emails sent: {len(emails)}"
        + (f"; the first: {emails[0].message['Subject']}" if emails else "")
    )
