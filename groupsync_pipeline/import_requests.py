"""Asking for group imports: validate against the catalog, then record in the control store.

A request is refused as a whole (nothing recorded) when any group in it cannot be imported:
unknown connection, a group not in the connection's catalog, a group already imported or
already requested, a bad notification address, or the product's limit on imported groups.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from groupsync_pipeline.config import (
    ConfigError,
    Connection,
    check_email_address,
    find_connection,
    load_connections,
)
from groupsync_pipeline.connected_apps import open_connector
from groupsync_pipeline.connectors.base import GroupNotFoundError, close_matches
from groupsync_pipeline.storage.control import (
    ControlStore,
    NewRequest,
    RequestConflictError,
    RequestLimitError,
)
from groupsync_pipeline.storage.warehouse import Warehouse

MAX_IMPORTED_GROUPS_ENV = "GROUPSYNC_MAX_IMPORTED_GROUPS"
DEFAULT_MAX_IMPORTED_GROUPS = 500  # the limit documented by the product groupsync mirrors


class RequestRefusedError(ValueError):
    """The request cannot be accepted; nothing was recorded. The message says why."""


@dataclass(frozen=True)
class CatalogEntry:
    remote_id: str
    name: str


def max_imported_groups(environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(MAX_IMPORTED_GROUPS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMPORTED_GROUPS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{MAX_IMPORTED_GROUPS_ENV} must be a positive whole number: {raw!r}")
    return int(raw)


def _resolve(reference: str, catalog: list[CatalogEntry], connection: str) -> CatalogEntry:
    """The catalog group with this id, else with exactly this display name."""
    for entry in catalog:
        if entry.remote_id.lower() == reference.strip().lower():
            return entry
    named = [entry for entry in catalog if entry.name == reference]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(entry.remote_id for entry in named)
        raise RequestRefusedError(
            f"several groups in '{connection}' are named '{reference}' ({ids}): give the id"
        )
    suggestions = close_matches(
        reference, {f"{entry.name} ({entry.remote_id})": entry.name for entry in catalog}
    )
    hint = f"; did you mean: {', '.join(suggestions)}" if suggestions else ""
    raise RequestRefusedError(f"no group '{reference}' in the catalog of '{connection}'{hint}")


def _live_entry(connection: Connection, reference: str) -> CatalogEntry:
    """Without a stored catalog, ask the app for this one group (id or exact name)."""
    try:
        with open_connector(connection) as connector:
            group = connector.find_group(reference)
    except GroupNotFoundError as exc:
        raise RequestRefusedError(str(exc)) from None
    return CatalogEntry(group.remote_id, group.name)


def request_imports(
    connection_name: str,
    group_references: list[str],
    warehouse: Warehouse,
    *,
    notify_email: str | None = None,
    connections_file: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> list[int]:
    """Record one pending request per group, or refuse them all. Returns the request ids."""
    if not group_references:
        raise RequestRefusedError("name at least one group")
    try:
        connection = find_connection(load_connections(connections_file), connection_name)
        notify = None if notify_email is None else check_email_address(notify_email)
        limit = max_imported_groups(environ)
    except ConfigError as exc:
        raise RequestRefusedError(str(exc)) from None
    with warehouse.read() as conn:
        catalog = [
            CatalogEntry(row[0], row[1])
            for row in conn.execute(
                "SELECT remote_group_id, name FROM group_catalog WHERE connection = ? "
                "ORDER BY name",
                [connection.name],
            ).fetchall()
        ]
        imported = {
            row[0]: (row[1], row[2])
            for row in conn.execute(
                "SELECT remote_group_id, group_id, imported_at FROM user_groups "
                "WHERE type = 'imported' AND connection = ? AND deleted_at IS NULL",
                [connection.name],
            ).fetchall()
        }
        imported_total = conn.execute(
            "SELECT count(*) FROM user_groups WHERE type = 'imported' AND deleted_at IS NULL"
        ).fetchall()[0][0]
    entries: list[CatalogEntry] = []
    for reference in group_references:
        entry = (
            _resolve(reference, catalog, connection.name)
            if catalog
            else _live_entry(connection, reference)
        )
        if entry.remote_id in imported:
            group_id, imported_at = imported[entry.remote_id]
            raise RequestRefusedError(
                f"'{entry.name}' is already imported as {group_id} (since "
                f"{imported_at:%Y-%m-%d %H:%M} UTC); it re-syncs every hour"
            )
        if any(e.remote_id == entry.remote_id for e in entries):
            raise RequestRefusedError(f"'{entry.name}' is named twice in this request")
        entries.append(entry)
    control = ControlStore(warehouse.data_dir)
    try:
        return control.add_requests(
            [
                NewRequest(
                    connection=connection.name,
                    group_reference=reference,
                    remote_group_id=entry.remote_id,
                    group_name=entry.name,
                    notify_email=notify,
                )
                for reference, entry in zip(group_references, entries, strict=True)
            ],
            max_active=limit - imported_total,
        )
    except RequestConflictError as exc:
        raise RequestRefusedError(str(exc)) from None
    except RequestLimitError as exc:
        raise RequestRefusedError(
            f"at most {limit} groups can be imported ({MAX_IMPORTED_GROUPS_ENV}): "
            f"{imported_total} are imported and {exc.active} requested already"
        ) from None


def retry_request(request_id: int, warehouse: Warehouse) -> int:
    """A new pending request repeating a failed one; returns its id."""
    control = ControlStore(warehouse.data_dir)
    original = control.get(request_id)
    if original is None:
        raise RequestRefusedError(f"no request {request_id}")
    if original.status != "failed":
        raise RequestRefusedError(
            f"request {request_id} is {original.status}: only failed requests can be retried"
        )
    try:
        (new_id,) = control.add_requests(
            [
                NewRequest(
                    connection=original.connection,
                    group_reference=original.group_reference,
                    remote_group_id=original.remote_group_id,
                    group_name=original.group_name,
                    notify_email=original.notify_email,
                    source="retry",
                    retry_of=original.request_id,
                )
            ]
        )
    except RequestConflictError as exc:
        raise RequestRefusedError(str(exc)) from None
    return new_id
