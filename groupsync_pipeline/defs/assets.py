"""Assets: remote group catalogs and imported group memberships in DuckDB."""

import dagster as dg
from pydantic import Field

from groupsync_pipeline.config import ConfigError, check_email_address
from groupsync_pipeline.connectors.base import ConnectorError
from groupsync_pipeline.defs.resources import ConnectionsResource, WarehouseResource
from groupsync_pipeline.imports import import_group_members, refresh_group_catalog

WAREHOUSE_POOL = "groupsync_warehouse"  # limit 1 in dagster.yaml: one writer at a time


class CatalogConfig(dg.Config):
    connections: list[str] = Field(
        default=[], description="Connections to refresh; empty: all configured."
    )


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="groups",
    kinds={"duckdb"},
    description="The groups that exist in each connected app now (table group_catalog).",
)
def group_catalog(
    context: dg.AssetExecutionContext,
    config: CatalogConfig,
    connections: ConnectionsResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    chosen = [connections.get(name) for name in config.connections] or connections.all()
    metadata: dict[str, dg.RawMetadataValue] = {}
    failures: list[str] = []
    for connection in chosen:
        try:
            outcome = refresh_group_catalog(connection, warehouse.get(), log=context.log.info)
        except ConnectorError as exc:
            failures.append(f"{connection.name}: {exc}")
            context.log.error(f"{connection.name}: catalog refresh failed: {exc}")
            continue
        metadata[f"{connection.name} groups"] = outcome.groups
        metadata[f"{connection.name} groups without a member count"] = (
            outcome.groups - outcome.with_counts
        )
        metadata[f"{connection.name} seconds"] = round(outcome.duration_seconds, 2)
    if failures:
        raise dg.Failure(description="; ".join(failures), metadata=metadata)
    return dg.MaterializeResult(metadata=metadata)


class ImportGroupConfig(dg.Config):
    connection: str = Field(description="Name of the connection (see the connections file).")
    group: str = Field(description="The group's id in the app, or its exact display name.")
    notify_email: str | None = Field(
        default=None,
        description="Optional address to notify when the import is done (validated and "
        "recorded now; sending arrives with import requests).",
    )


@dg.asset(
    pool=WAREHOUSE_POOL,
    group_name="groups",
    kinds={"duckdb"},
    deps=[group_catalog],
    description="Members of imported groups with their history "
    "(tables user_groups, accounts, group_memberships; view group_members).",
)
def imported_group_members(
    context: dg.AssetExecutionContext,
    config: ImportGroupConfig,
    connections: ConnectionsResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    connection = connections.get(config.connection)
    if config.notify_email is not None:
        try:
            check_email_address(config.notify_email)
        except ConfigError as exc:
            raise dg.Failure(description=f"notify_email: {exc}") from None
    try:
        outcome = import_group_members(
            connection,
            config.group,
            warehouse.get(),
            run_id=context.run.run_id,
            log=context.log.info,
        )
    except ConnectorError as exc:
        raise dg.Failure(
            description=f"import of '{config.group}' from '{connection.name}' failed: {exc}"
        ) from None
    result = outcome.result
    return dg.MaterializeResult(
        metadata={
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
