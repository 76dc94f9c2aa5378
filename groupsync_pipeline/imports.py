"""Import a group's members and refresh group catalogs: the work behind the Dagster assets.

Reads from a connected app stream to private staging files first; only then is the lake
opened, for one short all-or-nothing transaction. A crash before the merge changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from groupsync_pipeline.config import Connection
from groupsync_pipeline.connected_apps import open_connector
from groupsync_pipeline.connectors.base import RemoteGroup, VendorError
from groupsync_pipeline.storage.lake import Lake
from groupsync_pipeline.storage.writes import (
    MemberStaging,
    SyncResult,
    catalog_frame,
    merge_group_members,
    replace_catalog,
)

Log = Callable[[str], None]


@dataclass
class ImportOutcome:
    connection: str
    group: RemoteGroup
    result: SyncResult
    pages: int
    other_members: dict[str, int]
    duration_seconds: float
    preview: pd.DataFrame = field(repr=False)


def import_group_members(
    connection: Connection,
    group_reference: str,
    lake: Lake,
    *,
    run_id: str | None = None,
    log: Log = lambda message: None,
    progress_every: int = 10,
    on_progress: Callable[[int, int], None] | None = None,
) -> ImportOutcome:
    """Read every member of the group and make the lake match, in one transaction.

    ``on_progress(pages, members)`` is called after every page read.
    """
    started = time.monotonic()

    def on_page(pages: int, members: int) -> None:
        if on_progress is not None:
            on_progress(pages, members)
        if pages % progress_every == 0:
            log(f"{connection.name}: {pages} pages fetched, {members} members listed so far")

    staging = MemberStaging(lake.staging_path())
    try:
        with open_connector(connection, on_page=on_page, log=log) as connector:
            group = connector.find_group(group_reference)
            log(
                f"{connection.name}: importing '{group.name}' ({group.remote_id}), "
                f"{group.member_count} people per {connector.app}"
            )
            for page in connector.group_members(group.remote_id):
                staging.add(page)
            staging.read(connector.member_rows_sql)
        if staging.rows == 0 and group.member_count:
            # One empty answer must not end every membership of a group the app says is full.
            raise VendorError(
                f"{connector.app} listed no members for '{group.name}' although it counts "
                f"{group.member_count}; nothing was changed"
            )
        preview = staging.preview()
        for attempt in lake.retrying():  # a commit the catalog refused runs again
            with attempt, lake.write() as conn:
                # One duration for the run's metadata, the request, its email and group_syncs.
                duration = time.monotonic() - started
                result = merge_group_members(
                    conn,
                    connection=connection,
                    group=group,
                    staging=staging,
                    run_id=run_id,
                    duration_seconds=duration,
                    now=datetime.now(UTC),
                )
        outcome = ImportOutcome(
            connection=connection.name,
            group=group,
            result=result,
            pages=staging.pages,
            other_members=dict(staging.other_members),
            duration_seconds=duration,
            preview=preview,
        )
    finally:
        staging.remove()
    log(
        f"{connection.name}: '{group.name}' committed: {result.members} members "
        f"(+{result.joined} / -{result.left}) from {staging.pages} pages"
    )
    return outcome


@dataclass
class CatalogOutcome:
    connection: str
    groups: int
    with_counts: int
    duration_seconds: float


def refresh_group_catalog(
    connection: Connection, lake: Lake, *, log: Log = lambda message: None
) -> CatalogOutcome:
    """Replace the connection's catalog with the groups that exist in the app now."""
    started = time.monotonic()
    with open_connector(connection, log=log) as connector:
        groups = list(connector.group_catalog())
    now = datetime.now(UTC)
    frame = catalog_frame(connection, groups, now)
    for attempt in lake.retrying():  # a commit the catalog refused runs again
        with attempt, lake.write() as conn:
            replace_catalog(conn, connection, frame, now)
    outcome = CatalogOutcome(
        connection=connection.name,
        groups=len(groups),
        with_counts=sum(g.member_count is not None for g in groups),
        duration_seconds=time.monotonic() - started,
    )
    log(f"{connection.name}: catalog of {outcome.groups} groups stored")
    if outcome.with_counts < outcome.groups:
        log(
            f"{connection.name}: {outcome.groups - outcome.with_counts} groups have no member "
            "count (the app did not give one); remote_member_count is NULL for them"
        )
    return outcome
