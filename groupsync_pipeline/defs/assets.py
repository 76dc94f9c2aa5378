"""Assets: remote group catalogs and imported group memberships in DuckDB."""

from dataclasses import asdict

import dagster as dg
from pydantic import Field

from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.connectors.base import ConnectorError
from groupsync_pipeline.defs.isolation import ConnectionFailures
from groupsync_pipeline.defs.resources import ConnectionsResource, LakeResource
from groupsync_pipeline.import_runs import (
    RunIdentity,
    RunRefusedError,
    carry_out,
    claim_request,
    request_tags,
)
from groupsync_pipeline.imports import refresh_group_catalog
from groupsync_pipeline.membership_sync import (
    ConnectionSyncOutcome,
    sync_connection,
    sync_settings_from_env,
)

WAREHOUSE_POOL = "groupsync_warehouse"  # limit 1 in dagster.yaml: one writer at a time


class ConnectionsConfig(dg.Config):
    connections: list[str] = Field(
        default=[], description="Connections to work on; empty: every configured one."
    )


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="groups",
    kinds={"duckdb"},
    description="The groups that exist in each connected app now (table group_catalog).",
)
def group_catalog(
    context: dg.AssetExecutionContext,
    config: ConnectionsConfig,
    connections: ConnectionsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    chosen = [connections.get(name) for name in config.connections] or connections.all()
    metadata: dict[str, dg.RawMetadataValue] = {}
    failures = ConnectionFailures("catalog refresh")
    for connection in chosen:
        try:  # each connection commits or fails alone
            outcome = refresh_group_catalog(connection, lake.get(), log=context.log.info)
        except Exception as exc:  # one connection alone: see defs/isolation.py
            failures.record(context, connection.name, exc)
            continue
        metadata[f"{connection.name} groups"] = outcome.groups
        metadata[f"{connection.name} groups without a member count"] = (
            outcome.groups - outcome.with_counts
        )
        metadata[f"{connection.name} seconds"] = round(outcome.duration_seconds, 2)
    failures.raise_if_any(len(chosen), metadata)
    return dg.MaterializeResult(metadata=metadata)


class ImportGroupConfig(dg.Config):
    connection: str = Field(
        default="",
        description="Connection to import from (see the connections file). With no group: "
        "the connection whose imported groups to re-sync (empty: every connection).",
    )
    group: str = Field(
        default="",
        description="The group's id in the app, or its exact display name. Empty: re-sync "
        "every imported group instead of importing one (what the hourly schedule does).",
    )
    notify_email: str | None = Field(
        default=None,
        description="Address to email when the import ends (success or failure).",
    )
    full_resync: bool = Field(
        default=False,
        description="Re-sync only: read every group in full and start a new delta chain.",
    )


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="groups",
    kinds={"duckdb"},
    deps=[group_catalog],
    description="Members of imported groups with their history (tables user_groups, "
    "accounts, group_memberships, group_syncs; view group_members). Materialized by an "
    "import (config: connection + group) or by the hourly re-sync of every imported group.",
)
def imported_group_members(
    context: dg.AssetExecutionContext,
    config: ImportGroupConfig,
    connections: ConnectionsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    if config.group:
        return _import_one_group(context, config, connections, lake)
    if config.notify_email is not None:
        raise dg.Failure(description="notify_email needs a group: it is sent when an import ends")
    return _sync_imported_groups(context, config, connections, lake)


def _import_one_group(
    context: dg.AssetExecutionContext,
    config: ImportGroupConfig,
    connections: ConnectionsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    run = context.run
    connection, connection_error = None, None
    try:
        connection = connections.get(config.connection) if config.connection else None
    except dg.Failure as exc:
        connection_error = exc.description
    try:
        request = claim_request(
            RunIdentity(run.run_id, dict(run.tags), run.parent_run_id),
            connection=connection,
            connection_error=connection_error,
            group=config.group,
            notify_email=config.notify_email,
            lake=lake.get(),
        )
    except RunRefusedError as exc:
        if exc.request is not None:  # what the run was asked to do, in the run list too
            context.instance.add_run_tags(run.run_id, request_tags(exc.request))
        raise dg.Failure(description=str(exc)) from None
    context.instance.add_run_tags(run.run_id, request_tags(request))
    context.log.info(f"import request {request.request_id}")
    assert connection is not None  # a request is only claimed or recorded with a connection
    try:
        outcome = carry_out(request, connection, run.run_id, lake.get(), log=context.log.info)
    except ConnectorError as exc:
        raise dg.Failure(
            description=f"import of '{request.group_name or config.group}' from "
            f"'{connection.name}' failed: {exc}"
        ) from None
    result = outcome.result
    return dg.MaterializeResult(
        metadata={
            "request_id": request.request_id,
            "connection": outcome.connection,
            "group": outcome.group.name,
            "group_id": result.group_id,
            "members": result.members,
            "joined": result.joined,
            "left": result.left,
            "remote_member_count": outcome.group.member_count,
            "pages_fetched": outcome.pages,
            "non_person_members": dg.MetadataValue.json(outcome.other_members),
            "duration_seconds": round(outcome.duration_seconds, 2),
            "notify_email": config.notify_email,
            "preview": dg.MetadataValue.md(outcome.preview.to_markdown(index=False)),
        }
    )


def _sync_imported_groups(
    context: dg.AssetExecutionContext,
    config: ImportGroupConfig,
    connections: ConnectionsResource,
    lake: LakeResource,
) -> dg.MaterializeResult:
    chosen = [connections.get(config.connection)] if config.connection else connections.all()
    try:
        policy, full_sync_every = sync_settings_from_env()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc)) from None
    failures = ConnectionFailures("sync")
    outcomes: list[ConnectionSyncOutcome] = []
    for connection in chosen:
        try:  # each connection commits or fails alone; a failed one changed nothing
            outcomes.append(
                sync_connection(
                    connection,
                    lake.get(),
                    lake.control(),
                    run_id=context.run.run_id,
                    log=context.log.info,
                    force_full=config.full_resync,
                    full_sync_every=full_sync_every,
                    policy=policy,
                )
            )
        except Exception as exc:  # one connection alone: see defs/isolation.py
            failures.record(context, connection.name, exc)
    metadata: dict[str, dg.RawMetadataValue] = {
        "groups_synced": sum(o.groups_synced for o in outcomes),
        "joined": sum(o.joined for o in outcomes),
        "left": sum(o.left for o in outcomes),
        "pages_fetched": sum(o.pages for o in outcomes),
        "held_back": dg.MetadataValue.json([g for o in outcomes for g in o.held]),
        "deleted_in_app": dg.MetadataValue.json([g for o in outcomes for g in o.deleted]),
        "full_resyncs": dg.MetadataValue.json(
            {o.connection: o.full_reason for o in outcomes if o.mode == "full"}
        ),
        # People the app would not give details of, per connection: id -> status and code.
        "unreadable_people": dg.MetadataValue.json(
            {o.connection: _first(o.unreadable, UNREADABLE_SHOWN) for o in outcomes if o.unreadable}
        ),
        "connections": dg.MetadataValue.json(
            [{**asdict(o), "unreadable": len(o.unreadable)} for o in outcomes]
        ),
    }
    failures.raise_if_any(len(chosen), metadata)
    return dg.MaterializeResult(metadata=metadata)


UNREADABLE_SHOWN = 100  # per connection in the run's metadata; the log line gives the count


def _first(entries: dict[str, str], limit: int) -> dict[str, str]:
    shown = dict(list(entries.items())[:limit])
    if len(entries) > limit:
        shown["..."] = f"{len(entries) - limit} more"
    return shown
