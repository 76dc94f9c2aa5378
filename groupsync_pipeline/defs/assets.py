"""Assets: remote group catalogs and imported group memberships in DuckDB."""

from dataclasses import asdict

import dagster as dg
from pydantic import Field

from groupsync_pipeline.config import ConfigError, check_email_address
from groupsync_pipeline.connectors.base import ConnectorError
from groupsync_pipeline.defs.isolation import ConnectionFailures
from groupsync_pipeline.defs.resources import ConnectionsResource, WarehouseResource
from groupsync_pipeline.imports import ImportOutcome, import_group_members, refresh_group_catalog
from groupsync_pipeline.membership_sync import (
    ConnectionSyncOutcome,
    sync_connection,
    sync_settings_from_env,
)
from groupsync_pipeline.storage.control import NewRequest

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
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    chosen = [connections.get(name) for name in config.connections] or connections.all()
    metadata: dict[str, dg.RawMetadataValue] = {}
    failures = ConnectionFailures("catalog refresh")
    for connection in chosen:
        try:  # each connection commits or fails alone
            outcome = refresh_group_catalog(connection, warehouse.get(), log=context.log.info)
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


REQUEST_TAG = "groupsync/request_id"  # set on runs launched for a recorded import request


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
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    if config.group:
        return _import_one_group(context, config, connections, warehouse)
    if config.notify_email is not None:
        raise dg.Failure(description="notify_email needs a group: it is sent when an import ends")
    return _sync_imported_groups(context, config, connections, warehouse)


def _import_one_group(
    context: dg.AssetExecutionContext,
    config: ImportGroupConfig,
    connections: ConnectionsResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    control = warehouse.control()
    tagged = context.run.tags.get(REQUEST_TAG)
    if tagged is not None:
        request_id = int(tagged)
        control.mark_running(request_id, context.run.run_id)
    else:
        # Launched from the launchpad (or a script): recorded too, so one history shows all.
        (request_id,) = control.add_requests(
            [
                NewRequest(
                    connection=config.connection,
                    group_reference=config.group,
                    remote_group_id=None,
                    group_name=None,
                    notify_email=config.notify_email,
                    source="launchpad",
                    run_id=context.run.run_id,
                )
            ]
        )
    context.log.info(f"import request {request_id}")
    try:
        if not config.connection:
            raise dg.Failure(description="connection is required with a group")
        connection = connections.get(config.connection)
        if config.notify_email is not None:
            try:
                check_email_address(config.notify_email)
            except ConfigError as exc:
                raise dg.Failure(description=f"notify_email: {exc}") from None

        def record_done(outcome: ImportOutcome) -> None:
            control.mark_done(
                request_id,
                remote_group_id=outcome.group.remote_id,
                group_name=outcome.group.name,
                members=outcome.result.members,
                joined=outcome.result.joined,
                left=outcome.result.left,
                nested_groups=outcome.other_members.get("group", 0),
                pages=outcome.pages,
                duration_seconds=outcome.duration_seconds,
            )

        try:
            outcome = import_group_members(
                connection,
                config.group,
                warehouse.get(),
                run_id=context.run.run_id,
                log=context.log.info,
                on_merged=record_done,
            )
        except ConnectorError as exc:
            raise dg.Failure(
                description=f"import of '{config.group}' from '{connection.name}' failed: {exc}"
            ) from None
    except BaseException as exc:
        message = exc.description if isinstance(exc, dg.Failure) else f"{type(exc).__name__}: {exc}"
        control.mark_failed(request_id, message or type(exc).__name__)
        raise
    result = outcome.result
    return dg.MaterializeResult(
        metadata={
            "request_id": request_id,
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
    warehouse: WarehouseResource,
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
                    warehouse.get(),
                    warehouse.control(),
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
