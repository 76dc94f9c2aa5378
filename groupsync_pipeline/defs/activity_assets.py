"""Assets: audit activities tagged with their actors' groups, and the alerts policies raise."""

import time
from datetime import UTC, datetime

import dagster as dg

from groupsync_pipeline.activity_ingest import IngestSettings, ingest_connection
from groupsync_pipeline.alert_emails import AlertEmailRound, send_pending_alert_emails
from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.defs.assets import (
    WAREHOUSE_POOL,
    ConnectionsConfig,
    imported_group_members,
)
from groupsync_pipeline.defs.isolation import ConnectionFailures
from groupsync_pipeline.defs.resources import ConnectionsResource, LakeResource
from groupsync_pipeline.notifications import SmtpSettings
from groupsync_pipeline.policies import evaluate_policies, load_policies

ALERT_EMAIL_ROUND_SECONDS = 60.0  # SMTP while holding the lake: at most this per run


EVERY_CONNECTION_READ = "every_connection_read"


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="activities",
    kinds={"duckdb"},
    deps=[imported_group_members],
    # A connection that fails is reported here, not by failing the step: a failed step would
    # skip `alerts`, and one broken connection would silence the policies of all the others.
    check_specs=[
        dg.AssetCheckSpec(
            EVERY_CONNECTION_READ,
            asset="activities",
            description="Every connection's audit logs were read and committed by the run.",
        )
    ],
    description="Audit events of every connection, each tagged with the groups its actor "
    "belonged to when it happened (tables activities, activity_groups, "
    "activity_sources_state; views activities_tagged, group_activities; automatic groups "
    "External and administrators).",
)
def activities(
    context: dg.AssetExecutionContext,
    config: ConnectionsConfig,
    connections: ConnectionsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    try:
        settings = IngestSettings.from_env()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc)) from None
    chosen = [connections.get(name) for name in config.connections] or connections.all()
    metadata: dict[str, dg.RawMetadataValue] = {}
    failures = ConnectionFailures("activity read")
    totals = {"new": 0, "read": 0, "tags": 0}
    for connection in chosen:
        name = connection.name
        try:  # each connection commits or fails alone
            outcome = ingest_connection(
                connection, lake.get(), settings=settings, log=context.log.info
            )
        except Exception as exc:  # one connection alone: see defs/isolation.py
            failures.record(context, name, exc)
            continue
        merge = outcome.merge
        totals["new"] += merge.new
        totals["read"] += merge.received
        totals["tags"] += merge.tagging.tags
        metadata[f"{name} new activities"] = merge.new
        metadata[f"{name} events read"] = merge.received
        metadata[f"{name} pages"] = outcome.pages
        metadata[f"{name} new by source"] = dg.MetadataValue.json(merge.new_by_source)
        metadata[f"{name} late events caught by the overlap"] = dg.MetadataValue.json(
            merge.late_by_source
        )
        metadata[f"{name} windows"] = dg.MetadataValue.json(outcome.windows)
        metadata[f"{name} group tags"] = merge.tagging.tags
        metadata[f"{name} external joined"] = merge.external_joined
        metadata[f"{name} admins joined/left"] = f"+{merge.admins_joined}/-{merge.admins_left}"
        metadata[f"{name} seconds"] = round(outcome.duration_seconds, 2)
        metadata[f"{name} events skipped (no id or time)"] = outcome.skipped
        metadata[f"{name} actors looked up in the directory"] = dg.MetadataValue.json(
            outcome.actor_lookup
        )
        metadata[f"{name} new activities by an unknown person"] = merge.unresolved_actors
        if outcome.gaps:
            metadata[f"{name} gaps"] = dg.MetadataValue.json(outcome.gaps)
        if outcome.errors:
            # The other logs were read and committed; the check audit_logs_read fails until
            # this one reads again (its watermark did not move), and alerts still run.
            metadata[f"{name} errors"] = dg.MetadataValue.json(outcome.errors)
        for source, error in outcome.errors.items():
            context.log.warning(f"{name}/{source}: not read: {error}")
    metadata["new activities"] = totals["new"]
    metadata["events read"] = totals["read"]
    metadata["group tags"] = totals["tags"]
    if len(failures.reasons) == len(chosen):
        failures.raise_if_any(len(chosen), metadata)  # nothing committed: nothing for alerts
    metadata["failed_connections"] = dg.MetadataValue.json(failures.reasons)
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(
                check_name=EVERY_CONNECTION_READ,
                passed=not failures.reasons,
                severity=dg.AssetCheckSeverity.ERROR,
                description=failures.summary(len(chosen)) if failures.reasons else None,
                metadata={"failed_connections": dg.MetadataValue.json(failures.reasons)},
            )
        ],
    )


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="activities",
    kinds={"duckdb"},
    deps=[activities],
    description="Alerts the policies (GROUPSYNC_POLICIES, else the bundled examples) raise on "
    "new tagged activities (table alerts); emails each policy's recipients.",
)
def alerts(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    try:
        policies = load_policies()
        smtp = SmtpSettings.from_env()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc)) from None
    store = lake.get()
    for attempt in store.retrying():  # a commit the catalog refused runs again
        with attempt, store.write() as conn:
            result = evaluate_policies(conn, policies, datetime.now(UTC))
    for warning in result.warnings:
        context.log.warning(warning)
    for outcome in result.outcomes:
        context.log.info(
            f"policy {outcome.policy!r}: {outcome.status}, {outcome.activities_considered} "
            f"activities, {outcome.matches} matches, {outcome.alerts_raised} alerts"
        )
    # Emails go out after the alerts are committed, in their own short transaction: an email
    # never describes alerts that a rollback took back. None is opened when no policy has an
    # alert waiting for its email (each write is a catalog snapshot).
    notifying = [policy.name for policy in policies if policy.notify]
    with store.read() as conn:
        waiting = conn.execute(
            "SELECT count(*) FROM alerts "
            "WHERE notified_at IS NULL AND list_contains($names::VARCHAR[], policy)",
            {"names": notifying},
        ).fetchall()[0][0]
    emails = AlertEmailRound()
    if waiting:
        with store.write() as conn:
            # The round holds the lake: it is bounded as a whole, and what is not sent
            # by then waits for the next run.
            emails = send_pending_alert_emails(
                conn,
                policies,
                smtp,
                datetime.now(UTC),
                deadline=time.monotonic() + ALERT_EMAIL_ROUND_SECONDS,
            )
    for outcome in emails.outcomes:
        if outcome.status != "sent":
            context.log.warning(
                f"alert email for {outcome.policy!r} {outcome.status}: {outcome.reason}"
            )
    preview = result.alerts[["policy", "severity", "actor_email", "activity_count", "summary"]]
    return dg.MaterializeResult(
        metadata={
            "alerts raised": result.alerts_raised,
            "by policy": dg.MetadataValue.json(
                {o.policy: o.alerts_raised for o in result.outcomes}
            ),
            "emails sent": emails.sent,
            "emails failed": emails.failed,
            "emails skipped": emails.skipped,
            "preview": dg.MetadataValue.md(preview.head(10).to_markdown(index=False))
            if len(preview)
            else dg.MetadataValue.text("no new alerts"),
        }
    )
