"""Asking for group imports: validate against the catalog, then record in the control store.

Every way of asking (the command line, a retry, a launchpad run, a re-executed run) goes
through ``record_checked``: the group must not be imported already nor held by an active
request, and imported plus requested groups must stay within the product's limit, all checked
in the control store's recording transaction. A refused request records nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

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
    ImportedGroups,
    ImportRequest,
    NewRequest,
    RequestLimitError,
    RequestRefusal,
    committed_import,
)
from groupsync_pipeline.storage.lake import Lake

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
    """The catalog group with this id (whatever its shape), else with exactly this name."""
    for entry in catalog:
        if entry.remote_id == reference.strip():
            return entry
    for entry in catalog:  # Graph's GUIDs are case-insensitive; other apps' ids may not be
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


def imported_groups(lake: Lake) -> ImportedGroups:
    """Every imported group that exists now, per the lake, and when that was read."""
    read_at = datetime.now(UTC)
    with lake.read() as conn:
        rows = conn.execute(
            "SELECT connection, remote_group_id, group_id, imported_at FROM user_groups "
            "WHERE type = 'imported' AND deleted_at IS NULL"
        ).fetchall()
    return ImportedGroups(
        live={
            (connection, remote_id): f"as {group_id} (since {imported_at:%Y-%m-%d %H:%M} UTC)"
            for connection, remote_id, group_id, imported_at in rows
        },
        read_at=read_at,
    )


def record_checked(
    requests: list[NewRequest],
    lake: Lake,
    environ: Mapping[str, str] = os.environ,
    *,
    reimport: bool = False,
) -> list[int]:
    """Record the requests, or refuse them all (RequestRefusedError): the one path every
    request takes, so the limit and the duplicate checks hold whoever asks. ``reimport``
    lets an imported group be read again in full (the launchpad's way to re-import one)."""
    try:
        limit = max_imported_groups(environ)
    except ConfigError as exc:
        raise RequestRefusedError(str(exc)) from None
    known = imported_groups(lake)
    try:
        return ControlStore(lake.data_dir).add_requests(
            requests, limit=limit, imported=known, reimport=reimport
        )
    except RequestLimitError as exc:
        raise RequestRefusedError(
            f"at most {limit} groups can be imported ({MAX_IMPORTED_GROUPS_ENV}): "
            f"{exc.imported} are imported and {exc.active} requested already"
        ) from None
    except RequestRefusal as exc:
        raise RequestRefusedError(str(exc)) from None


def request_imports(
    connection_name: str,
    group_references: list[str],
    lake: Lake,
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
    except ConfigError as exc:
        raise RequestRefusedError(str(exc)) from None
    with lake.read() as conn:
        catalog = [
            CatalogEntry(row[0], row[1])
            for row in conn.execute(
                "SELECT remote_group_id, name FROM group_catalog WHERE connection = ? "
                "ORDER BY name",
                [connection.name],
            ).fetchall()
        ]
    entries: list[CatalogEntry] = []
    for reference in group_references:
        entry = (
            _resolve(reference, catalog, connection.name)
            if catalog
            else _live_entry(connection, reference)
        )
        if any(e.remote_id == entry.remote_id for e in entries):
            raise RequestRefusedError(f"'{entry.name}' is named twice in this request")
        entries.append(entry)
    return record_checked(
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
        lake,
        environ,
    )


def retry_request(request_id: int, lake: Lake, environ: Mapping[str, str] = os.environ) -> int:
    """A new pending request repeating a failed or canceled one; returns its id."""
    control = ControlStore(lake.data_dir)
    original = control.get(request_id)
    if original is None:
        raise RequestRefusedError(f"no request {request_id}")
    if original.status not in ("failed", "canceled"):
        raise RequestRefusedError(
            f"request {request_id} is {original.status}: only failed or canceled requests "
            "can be retried"
        )
    (new_id,) = record_checked(
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
        ],
        lake,
        environ,
    )
    return new_id


# --- following requests until their members are queryable ----------------------------------


@dataclass
class FollowResult:
    done: list[int]
    failed: list[int]
    unfinished: list[int]  # still pending or running when the time was up


def _queryable(lake: Lake, request: ImportRequest) -> bool:
    """Whether the analysts' data holds the import of the request's run."""
    from groupsync_pipeline.investigation import InvestigationError, open_snapshot

    try:
        with open_snapshot(lake.data_dir, "group_syncs") as conn:
            return committed_import(conn, request) is not None
    except InvestigationError:
        return False


def describe_state(request: ImportRequest) -> str:
    """One line about where a request stands, for people following it."""
    name = request.group_name or request.group_reference
    if request.status == "pending":
        stage = "launched, waiting for its run" if request.launched_at else "not launched yet"
        return f"request {request.request_id} ({name}): pending ({stage})"
    if request.status == "running":
        read = (
            f": {request.progress_pages} pages, {request.progress_members} members read so far"
            if request.progress_pages
            else ""
        )
        return f"request {request.request_id} ({name}): running in run {request.run_id}{read}"
    if request.status == "done":
        return (
            f"request {request.request_id} ({name}): done, {request.members} members "
            f"in {request.duration_seconds or 0:.1f} s"
        )
    return f"request {request.request_id} ({name}): {request.status}: {request.error}"


def follow_requests(
    request_ids: list[int],
    lake: Lake,
    *,
    timeout: float,
    echo: Callable[[str], None],
    poll_seconds: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> FollowResult:
    """Wait until each request failed, or is done with its members queryable, printing every
    change of state; give up after ``timeout`` seconds."""
    control = ControlStore(lake.data_dir)
    deadline = clock() + timeout
    shown: dict[int, str] = {}
    result = FollowResult([], [], [])
    waiting = list(request_ids)
    while waiting:
        for request_id in list(waiting):
            request = control.get(request_id)
            if request is None:
                raise RequestRefusedError(f"no request {request_id}")
            line = describe_state(request)
            settled = request.status in ("failed", "canceled")
            if request.status == "done":
                settled = _queryable(lake, request)
                if not settled:
                    line += " (committed; waiting for the analysts' copy)"
            if shown.get(request_id) != line:
                echo(line)
                shown[request_id] = line
            if settled:
                waiting.remove(request_id)
                (result.done if request.status == "done" else result.failed).append(request_id)
        if waiting and clock() >= deadline:
            result.unfinished = waiting
            break
        if waiting:
            time.sleep(poll_seconds)
    return result
