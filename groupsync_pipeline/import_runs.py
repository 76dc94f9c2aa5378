"""One import run and its request: which request a run carries out, its tags, its progress, and
its outcome, recorded only once the lake holds it.

A run launched by the sensor carries its request's unique key and claims that request; a run
launched from the launchpad (or a script) records a request of its own through the same limit
and duplicate checks as the command line (an imported group may be read again in full: that is
the launchpad's re-import); a re-executed run (its tags copied from the parent) never touches
the parent's request: it is a new request that repeats it (``retry_of``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from groupsync_pipeline.config import ConfigError, Connection, check_email_address
from groupsync_pipeline.connected_apps import open_connector
from groupsync_pipeline.connectors.base import ConnectorError
from groupsync_pipeline.import_requests import RequestRefusedError, record_checked
from groupsync_pipeline.imports import ImportOutcome, import_group_members
from groupsync_pipeline.safe_text import for_terminal
from groupsync_pipeline.storage.control import (
    LEGACY_KEY_PREFIX,
    CommittedImport,
    ControlStore,
    ImportRequest,
    NewRequest,
    committed_import,
)
from groupsync_pipeline.storage.lake import Lake

REQUEST_ID_TAG = "groupsync/request_id"  # for people: the id `groupsync requests` shows
REQUEST_KEY_TAG = "groupsync/request_key"  # for the pipeline: unique forever
CONNECTION_TAG = "groupsync/connection"
GROUP_TAG = "groupsync/group"
PROGRESS_EVERY_SECONDS = 1.0  # how often a run writes its progress to the control store

Log = Callable[[str], None]


class RunRefusedError(RuntimeError):
    """This run must not import anything; the message says why. Nothing was imported;
    ``request`` is the failed request recorded for it, if one was."""

    def __init__(self, message: str, request: ImportRequest | None = None) -> None:
        super().__init__(message)
        self.request = request


def request_tags(request: ImportRequest) -> dict[str, str]:
    """Run tags that say what an import run does (shown in the Dagster UI's run list)."""
    name = for_terminal(request.group_name or request.group_reference)
    return {
        REQUEST_ID_TAG: str(request.request_id),
        REQUEST_KEY_TAG: request.request_key,
        CONNECTION_TAG: request.connection,
        GROUP_TAG: name[:200],
    }


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    tags: dict[str, str]
    parent_run_id: str | None  # set when the run re-executes another


def claim_request(
    run: RunIdentity,
    *,
    connection: Connection | None,
    connection_error: str | None,
    group: str,
    notify_email: str | None,
    lake: Lake,
) -> ImportRequest:
    """The request this run carries out: its own (launched by the sensor), or a new one
    recorded with the command line's checks. Raises RunRefusedError when there is none."""
    control = ControlStore(lake.data_dir)
    key = run.tags.get(REQUEST_KEY_TAG) or _legacy_key(control, run.tags)
    retry_of: int | None = None
    if key is not None:
        claimed = control.claim(key, run.run_id)
        if claimed is not None:
            return claimed
        original = control.by_key(key)
        if run.parent_run_id is None:
            state = "unknown" if original is None else original.status
            label = "a request" if original is None else f"request {original.request_id}"
            raise RunRefusedError(
                f"this run was launched for {label} that is {state} now, not pending: it "
                "imports nothing"
            )
        retry_of = None if original is None else original.request_id
    request = NewRequest(
        connection=connection.name if connection is not None else "(unknown)",
        group_reference=group,
        remote_group_id=None,
        group_name=None,
        notify_email=notify_email,
        source="launchpad",
        retry_of=retry_of,
        run_id=run.run_id,
    )
    try:
        if connection is None:
            raise RequestRefusedError(connection_error or "no connection given")
        if not group:
            raise RequestRefusedError("connection is required with a group")
        if notify_email is not None:
            check_email_address(notify_email)
        with open_connector(connection) as connector:
            found = connector.find_group(group)
        request = replace(request, remote_group_id=found.remote_id, group_name=found.name)
        (request_id,) = record_checked([request], lake, reimport=True)
    except (RequestRefusedError, ConfigError, ConnectorError) as exc:
        reason = f"notify_email: {exc}" if isinstance(exc, ConfigError) else str(exc)
        failed = control.get(control.add_failed_request(request, reason))
        raise RunRefusedError(reason, failed) from None
    recorded = control.get(request_id)
    assert recorded is not None
    return recorded


def _legacy_key(control: ControlStore, tags: dict[str, str]) -> str | None:
    """The key of a request recorded before request keys, for a run the previous release's
    sensor launched for it (tagged with the request id only)."""
    request_id = tags.get(REQUEST_ID_TAG, "")
    if not request_id.isdigit():
        return None
    request = control.get(int(request_id))
    if request is None or not request.request_key.startswith(LEGACY_KEY_PREFIX):
        return None
    return request.request_key


def carry_out(
    request: ImportRequest,
    connection: Connection,
    run_id: str,
    lake: Lake,
    *,
    log: Log,
) -> ImportOutcome:
    """Import the request's group; mark the request done once the lake holds it, or
    failed when it does not. The lake decides: an error after the commit is a success."""
    control = ControlStore(lake.data_dir)
    last_progress = 0.0

    def progress(pages: int, members: int) -> None:
        nonlocal last_progress
        if time.monotonic() - last_progress >= PROGRESS_EVERY_SECONDS:
            last_progress = time.monotonic()
            control.record_progress(request.request_id, run_id, pages, members)

    try:
        outcome = import_group_members(
            connection,
            request.remote_group_id or request.group_reference,
            lake,
            run_id=run_id,
            log=log,
            on_progress=progress,
        )
    except BaseException as exc:
        try:
            committed = _committed(lake, request, run_id)
        except Exception as unreadable:  # settled from the lake by the sensor later
            log(
                f"the lake could not be checked after the error ({unreadable}); the "
                "import request is settled from it once the run has ended"
            )
            raise exc from None
        if committed is None:
            message = str(exc) or type(exc).__name__
            if not isinstance(exc, ConnectorError):
                message = f"{type(exc).__name__}: {message}"
            control.mark_failed(request.request_id, message, run_id=run_id)
            raise
        log(f"the import committed before this error, so it counts as done: {exc!r}")
        control.mark_done(request.request_id, run_id, committed)
        raise
    result = outcome.result
    recorded = control.mark_done(
        request.request_id,
        run_id,
        CommittedImport(
            members=result.members,
            joined=result.joined,
            left=result.left,
            nested_groups=outcome.other_members.get("group", 0),
            pages=outcome.pages,
            duration_seconds=outcome.duration_seconds,
            finished_at=result.synced_at,
        ),
        remote_group_id=outcome.group.remote_id,
        group_name=outcome.group.name,
    )
    if not recorded:
        log(f"request {request.request_id} was no longer this run's to finish; left as it is")
    return outcome


def _committed(lake: Lake, request: ImportRequest, run_id: str) -> CommittedImport | None:
    """The lake's record of this run's import (raises if the lake cannot be read)."""
    with lake.read() as conn:
        return committed_import(conn, replace(request, run_id=run_id))
