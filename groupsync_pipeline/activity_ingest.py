"""Read each connection's audit logs since the last read and store the new activities, tagged.

Per audit log (source) the lake keeps ``read_until``: the end of the last window read.
The next read starts an overlap window earlier, because apps publish events late (sign-ins
minutes to hours after they happen, file-event blobs listed late): events inside the overlap
are read again and dropped as repeats by their event id. A source the app keeps only for a
while (7 days for file events) is read from no earlier than the app allows; the lost stretch
is recorded as ``gap_before``.

Everything read is staged on disk; the lake changes in one transaction per connection,
so a read that fails midway stores nothing and moves no watermark. A source that fails does
not stop the others: its watermark stays where it was and the error is reported.

Actors that events name only by sign-in name, and that the lake cannot tie to an account,
are looked up in the app's directory after the reads and before the merge transaction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from groupsync_pipeline.config import Connection, env_number
from groupsync_pipeline.connected_apps import open_connector
from groupsync_pipeline.connectors.base import Account, Connector, ConnectorError
from groupsync_pipeline.storage.activity_writes import (
    ActivityMergeResult,
    ActivityStaging,
    ActorLookup,
    SourceRead,
    merge_activities,
    unknown_actor_names,
)
from groupsync_pipeline.storage.lake import Lake

Log = Callable[[str], None]
OVERLAP_ENV = "GROUPSYNC_ACTIVITY_OVERLAP_MINUTES"
BACKFILL_ENV = "GROUPSYNC_ACTIVITY_BACKFILL_HOURS"
DEFAULT_OVERLAP = timedelta(hours=2)
DEFAULT_BACKFILL = timedelta(hours=24)
# Stay clear of the app's retention edge: a window starting exactly there can be refused.
RETENTION_MARGIN = timedelta(minutes=10)


@dataclass(frozen=True)
class IngestSettings:
    overlap: timedelta = DEFAULT_OVERLAP
    backfill: timedelta = DEFAULT_BACKFILL  # how far back the first read of a source goes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> IngestSettings:
        overlap = env_number(environ, OVERLAP_ENV, DEFAULT_OVERLAP.total_seconds() / 60, 0, 24 * 60)
        backfill = env_number(
            environ, BACKFILL_ENV, DEFAULT_BACKFILL.total_seconds() / 3600, 0, 24 * 30
        )
        return cls(overlap=timedelta(minutes=overlap), backfill=timedelta(hours=backfill))


@dataclass
class IngestOutcome:
    connection: str
    pages: int = 0
    merge: ActivityMergeResult = field(default_factory=ActivityMergeResult)
    windows: dict[str, tuple[str, str]] = field(default_factory=dict)  # source -> (start, end)
    gaps: dict[str, str] = field(default_factory=dict)  # source -> events lost before
    errors: dict[str, str] = field(default_factory=dict)  # source (or "administrators") -> error
    skipped: int = 0  # events the app sent without an id or a readable time
    # Sign-in names looked up in the directory: asked, found, absent (no directory account),
    # failed (could not be looked up this time: their events keep no account).
    actor_lookup: dict[str, int] = field(default_factory=dict)
    duration_seconds: float = 0.0


def _window(
    read_until: datetime | None,
    retention: timedelta,
    now: datetime,
    settings: IngestSettings,
) -> tuple[datetime, datetime, datetime | None]:
    """(start, end, gap_before) of the next read of a source."""
    earliest = now - retention + RETENTION_MARGIN
    wanted = now - settings.backfill if read_until is None else read_until - settings.overlap
    if wanted >= earliest:
        return wanted, now, None
    # The app no longer keeps events back to where we stopped: note the hole, read what is left.
    gap = earliest if read_until is not None and read_until < earliest else None
    return earliest, now, gap


def _look_up_actors(
    connector: Connector,
    connection: Connection,
    lake: Lake,
    staging: ActivityStaging,
    outcome: IngestOutcome,
    log: Log,
    at: datetime,
) -> ActorLookup | None:
    """Ask the directory who the staged events' unknown sign-in names are (None: it could
    not be asked; those events then keep no account and nobody is made up for them)."""
    names = staging.actor_names()
    if names:
        with lake.read() as conn:
            names = unknown_actor_names(conn, connection.name, names, at)
    if not names:
        return ActorLookup()
    try:
        # Office 365 only today; a connector without a directory lookup would raise here.
        found = connector.users_by_sign_in_name(names)
    except ConnectorError as exc:
        outcome.errors["users"] = str(exc)
        log(
            f"{connection.name}: {len(names)} sign-in names not looked up in the directory, "
            f"their events keep no account: {exc}"
        )
        return None
    outcome.actor_lookup = {
        "asked": len(names),
        "found": len(found.found),
        "absent": len(found.absent),
        "failed": len(found.failed),
    }
    log(
        f"{connection.name}: looked up {len(names)} sign-in names in the directory: "
        f"{len(found.found)} found, {len(found.absent)} with no directory account"
        + (
            f", {len(found.failed)} not answered (their events keep no account)"
            if found.failed
            else ""
        )
    )
    for name, why in sorted(found.failed.items())[:5]:
        log(f"{connection.name}: sign-in name {name[:200]!r} not looked up: {why}")
    return ActorLookup(
        accounts=tuple(found.found.values()), absent=frozenset(found.absent), asked=len(names)
    )


def ingest_connection(
    connection: Connection,
    lake: Lake,
    *,
    settings: IngestSettings | None = None,
    log: Log = lambda message: None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    progress_every: int = 10,
) -> IngestOutcome:
    """Read the connection's audit logs and store the new activities, tagged."""
    started = time.monotonic()
    settings = settings or IngestSettings()
    outcome = IngestOutcome(connection.name)
    with lake.read() as conn:
        state = dict(
            conn.execute(
                "SELECT source, read_until FROM activity_sources_state WHERE connection = ?",
                [connection.name],
            ).fetchall()
        )
    staging = ActivityStaging(lake.staging_path())
    reads: list[SourceRead] = []
    admins: list[Account] | None = None
    domains: list[str] | None = None
    try:
        with open_connector(connection, log=log) as connector:
            try:
                admins = list(connector.administrators())
                if not admins:
                    # Every tenant has a Global Administrator: an empty list is a bad answer,
                    # and applying it would close every admin's membership.
                    raise ConnectorError("the app listed no administrator at all")
            except ConnectorError as exc:
                admins = None
                outcome.errors["administrators"] = str(exc)
                log(f"{connection.name}: administrators not read, group unchanged: {exc}")
            try:
                domains = connector.verified_domains()
            except ConnectorError as exc:
                outcome.errors["domains"] = str(exc)
                log(f"{connection.name}: verified domains not read: {exc}")
            for source in connector.activity_sources():
                end_now = now()
                start, end, gap = _window(
                    state.get(source.name), source.retention, end_now, settings
                )
                outcome.windows[source.name] = (start.isoformat(), end.isoformat())
                if gap is not None:
                    outcome.gaps[source.name] = gap.isoformat()
                    log(
                        f"{connection.name}/{source.name}: the app no longer keeps events "
                        f"before {gap:%Y-%m-%d %H:%M} UTC; events since the last read up to "
                        "then are lost"
                    )
                rows_before, pages_before = staging.rows, staging.pages
                try:
                    for page in connector.activities(source.name, start, end):
                        staging.add(page)
                        if (staging.pages - pages_before) % progress_every == 0:
                            log(
                                f"{connection.name}/{source.name}: {staging.pages - pages_before}"
                                f" pages, {staging.rows - rows_before} events so far"
                            )
                except ConnectorError as exc:
                    # Keep what other sources read; this one's events are dropped with it.
                    outcome.errors[source.name] = str(exc)
                    log(f"{connection.name}/{source.name}: not read, will retry: {exc}")
                    staging.discard(source.name)
                    continue
                reads.append(SourceRead(source.name, end, staging.rows - rows_before, gap))
                log(
                    f"{connection.name}/{source.name}: {staging.rows - rows_before} events "
                    f"from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
                )
            outcome.skipped = connector.skipped_activities
            actor_lookup = _look_up_actors(
                connector, connection, lake, staging, outcome, log, now()
            )
        if outcome.skipped:
            log(f"{connection.name}: {outcome.skipped} events without an id or time were skipped")
        outcome.pages = staging.pages
        staging.close()  # its last rows written before the writer lock is taken
        for attempt in lake.retrying():  # a commit the catalog refused runs again
            with attempt, lake.write() as conn:
                outcome.merge = merge_activities(
                    conn,
                    connection=connection,
                    staging=staging,
                    reads=reads,
                    verified_domains=domains,
                    admins=admins,
                    now=now(),
                    errors=outcome.errors,
                    actor_lookup=actor_lookup,
                )
    finally:
        staging.remove()
    outcome.duration_seconds = time.monotonic() - started
    merge = outcome.merge
    log(
        f"{connection.name}: {merge.new} new activities of {merge.received} read "
        f"({merge.received - merge.new} already stored); {merge.tagging.tags} group tags; "
        f"+{merge.external_joined} external, +{merge.admins_joined}/-{merge.admins_left} admins"
    )
    return outcome
