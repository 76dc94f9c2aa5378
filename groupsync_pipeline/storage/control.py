"""The control store: import requests, the email outbox and shrink confirmations.

It is a small SQLite file beside the lake, not a table in it, because the CLI and the
sensor must record and read requests at any moment: DuckDB would make them wait for (or block)
a running import. SQLite in WAL mode lets short writers from many processes take turns
(``busy_timeout``) and readers never wait.

The lake, not this file, decides whether a group was imported: an import commits its
members and its ``group_syncs`` row (with the run id) in one DuckDB transaction, and only then
is its request marked done here. A run that dies in between is reconciled from that row. Every
status change is guarded on the status it expects and on the run that owns the request, so a
late, repeated or re-executed run can never flip a finished request.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

CONTROL_FILE = "control.sqlite3"
ACTIVE = ("pending", "running")
FINISHED = ("done", "failed", "canceled")
STATUSES = (*ACTIVE, *FINISHED)
# Outbox retry waits: 1, 2, 4 ... minutes, at most an hour; given up after a day.
OUTBOX_FIRST_WAIT = timedelta(minutes=1)
OUTBOX_MAX_WAIT = timedelta(hours=1)
OUTBOX_GIVE_UP = timedelta(days=1)
# A claim older than this is a sender that died mid-send: the email may be sent again.
OUTBOX_CLAIM_TIMEOUT = timedelta(minutes=10)
SCHEMA_VERSION = 2
LEGACY_KEY_PREFIX = "v1-"  # requests recorded before request keys: their runs carry the id

_REQUESTS_TABLE = """
CREATE TABLE IF NOT EXISTS import_requests (
    request_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Unique forever (a UUID): run keys and run tags use it, so a request can never be matched
    -- to the run of another request, even after this file is deleted and ids start again.
    request_key     TEXT NOT NULL UNIQUE,
    connection      TEXT NOT NULL,
    group_reference TEXT NOT NULL,
    remote_group_id TEXT,
    group_name      TEXT,
    notify_email    TEXT,
    source          TEXT NOT NULL,
    retry_of        INTEGER REFERENCES import_requests (request_id),
    status          TEXT NOT NULL
                    CHECK (status IN ('pending', 'running', 'done', 'failed', 'canceled')),
    requested_at    TEXT NOT NULL,
    launched_at     TEXT,
    started_at      TEXT,
    finished_at     TEXT,
    run_id          TEXT,
    error           TEXT,
    members         INTEGER,
    joined          INTEGER,
    "left"          INTEGER,
    nested_groups   INTEGER,
    pages           INTEGER,
    duration_seconds REAL,
    progress_pages  INTEGER,
    progress_members INTEGER
)
"""

_SCHEMA = f"""
{_REQUESTS_TABLE};
CREATE INDEX IF NOT EXISTS import_requests_status ON import_requests (status);
CREATE TABLE IF NOT EXISTS email_outbox (
    request_id      INTEGER PRIMARY KEY REFERENCES import_requests (request_id),
    recipient       TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sending', 'sent', 'skipped',
                                                    'failed')),
    queued_at       TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    claimed_at      TEXT,
    sent_at         TEXT,
    last_error      TEXT
);
CREATE TABLE IF NOT EXISTS shrink_confirmations (
    group_id        TEXT NOT NULL,
    confirmed_at    TEXT NOT NULL,
    confirmed_by    TEXT,
    members_before  INTEGER,
    members_after   INTEGER
);
"""


def _now() -> datetime:
    return datetime.now(UTC)


def _text(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def new_request_key() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ImportRequest:
    request_id: int
    request_key: str
    connection: str
    group_reference: str
    remote_group_id: str | None
    group_name: str | None
    notify_email: str | None
    source: str  # cli | launchpad | retry
    retry_of: int | None
    status: str  # pending | running | done | failed | canceled
    requested_at: datetime
    launched_at: datetime | None  # when the sensor first asked Dagster for its run
    started_at: datetime | None
    finished_at: datetime | None
    run_id: str | None
    error: str | None
    members: int | None
    joined: int | None
    left: int | None
    nested_groups: int | None
    pages: int | None
    duration_seconds: float | None
    progress_pages: int | None  # while running: pages read so far
    progress_members: int | None  # while running: people read so far

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ImportRequest:
        values = dict(row)
        for name in ("requested_at", "launched_at", "started_at", "finished_at"):
            values[name] = _time(values[name])
        return cls(**values)

    @property
    def remote_key(self) -> tuple[str, str] | None:
        return None if self.remote_group_id is None else (self.connection, self.remote_group_id)


@dataclass(frozen=True)
class NewRequest:
    """A validated request about to be recorded."""

    connection: str
    group_reference: str
    remote_group_id: str | None
    group_name: str | None
    notify_email: str | None
    source: str = "cli"
    retry_of: int | None = None
    # Set for a run already under way (a launchpad launch): recorded as running, never pending,
    # so the sensor cannot launch it a second time.
    run_id: str | None = None


@dataclass(frozen=True)
class CommittedImport:
    """What a committed import did, as its ``group_syncs`` row records it."""

    members: int
    joined: int
    left: int
    nested_groups: int
    pages: int
    duration_seconds: float
    finished_at: datetime | None = None


@dataclass(frozen=True)
class ImportedGroups:
    """What the lake said about imported groups, read just before recording requests.

    ``read_at`` is when that read began: a request marked done after it may not be in the read
    (its commit came later), so the recording transaction counts it as imported too.
    """

    live: dict[tuple[str, str], str] = field(default_factory=dict)  # -> "as <group_id> (since)"
    read_at: datetime = field(default_factory=_now)


@dataclass(frozen=True)
class OutboxEmail:
    request_id: int
    recipient: str
    attempts: int


class RequestRefusal(ValueError):
    """A request that cannot be recorded; nothing was written. The message says why."""


class RequestConflictError(RequestRefusal):
    """The group is already held by an active request; the message names it."""


class AlreadyImportedError(RequestRefusal):
    """The group is imported already (it re-syncs every hour)."""


class RequestLimitError(RequestRefusal):
    """Recording would pass the limit on imported plus requested groups."""

    def __init__(self, limit: int, imported: int, active: int) -> None:
        super().__init__(
            f"at most {limit} groups can be imported: {imported} are imported and {active} "
            "requested already"
        )
        self.limit, self.imported, self.active = limit, imported, active


class ControlStore:
    """The SQLite control file under a data directory. Opens a connection per call."""

    def __init__(self, data_dir: str | Path, busy_timeout: float = 30.0) -> None:
        self.path = Path(data_dir) / CONTROL_FILE
        self.busy_timeout = busy_timeout

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                _upgrade(conn)
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: checks and writes see no other writer in between."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            conn.execute("COMMIT")

    # -- recording requests ------------------------------------------------------------------
    def add_requests(
        self,
        requests: list[NewRequest],
        *,
        limit: int | None = None,
        imported: ImportedGroups | None = None,
        reimport: bool = False,
    ) -> list[int]:
        """Record all of them or none, checking in one transaction that no group is imported
        already (per ``imported`` and requests done since it was read; skipped with
        ``reimport``, a launchpad run reading an imported group again) or held by an active
        request, and that imported plus requested groups stay within ``limit``."""
        now = _text(_now())
        known = imported or ImportedGroups()
        with self._transaction() as conn:
            done_since = {
                (row[0], row[1]): row[2]
                for row in conn.execute(
                    "SELECT connection, remote_group_id, request_id FROM import_requests "
                    "WHERE status = 'done' AND remote_group_id IS NOT NULL AND finished_at >= ?",
                    [_text(known.read_at)],
                )
            }
            imported_keys = set(known.live) | set(done_since)
            active = conn.execute(
                "SELECT request_id, status, connection, remote_group_id FROM import_requests "
                "WHERE status IN ('pending', 'running')"
            ).fetchall()
            holders = {
                (row["connection"], row["remote_group_id"]): row
                for row in active
                if row["remote_group_id"] is not None
            }
            for request in requests:
                key = (request.connection, request.remote_group_id or "")
                name = request.group_name or request.group_reference
                if not reimport and request.remote_group_id is not None and key in imported_keys:
                    detail = known.live.get(key) or f"by request {done_since[key]} just now"
                    raise AlreadyImportedError(
                        f"'{name}' is already imported {detail}; it re-syncs every hour"
                    )
                holder = holders.get(key)
                if holder is not None:
                    raise RequestConflictError(
                        f"'{name}' in '{request.connection}' is already requested: request "
                        f"{holder['request_id']} is {holder['status']}"
                    )
            if limit is not None:
                held = imported_keys | set(holders)
                unresolved = sum(row["remote_group_id"] is None for row in active)
                wanted = {(r.connection, r.remote_group_id or "") for r in requests}
                if len(held | wanted) + unresolved > limit:
                    raise RequestLimitError(limit, len(imported_keys), len(active))
            return [self._insert(conn, request, now) for request in requests]

    def add_failed_request(self, request: NewRequest, error: str) -> int:
        """Record a request that was refused when its run started (a launchpad launch), so
        its history and email tell what happened. It holds no group and counts toward no
        limit."""
        now = _text(_now())
        with self._transaction() as conn:
            request_id = self._insert(conn, request, now)
            conn.execute(
                "UPDATE import_requests SET status = 'failed', finished_at = ?, error = ? "
                "WHERE request_id = ?",
                [now, error[:4000], request_id],
            )
            return request_id

    @staticmethod
    def _insert(conn: sqlite3.Connection, request: NewRequest, now: str | None) -> int:
        cursor = conn.execute(
            "INSERT INTO import_requests (request_key, connection, group_reference,"
            " remote_group_id, group_name, notify_email, source, retry_of, status, requested_at,"
            " started_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                new_request_key(),
                request.connection,
                request.group_reference,
                request.remote_group_id,
                request.group_name,
                request.notify_email,
                request.source,
                request.retry_of,
                "pending" if request.run_id is None else "running",
                now,
                None if request.run_id is None else now,
                request.run_id,
            ],
        )
        return int(cursor.lastrowid or 0)

    # -- reading requests --------------------------------------------------------------------
    def get(self, request_id: int) -> ImportRequest | None:
        return self._one("request_id = ?", request_id)

    def by_key(self, request_key: str) -> ImportRequest | None:
        return self._one("request_key = ?", request_key)

    def _one(self, condition: str, value: object) -> ImportRequest | None:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT * FROM import_requests WHERE {condition}", [value]
            ).fetchone()
        return None if row is None else ImportRequest.from_row(row)

    def recent(
        self, statuses: tuple[str, ...] | None = None, limit: int = 1000
    ) -> list[ImportRequest]:
        where = ""
        params: list[Any] = []
        if statuses:
            where = f"WHERE status IN ({', '.join('?' * len(statuses))})"
            params.extend(statuses)
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT * FROM import_requests {where} ORDER BY request_id DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [ImportRequest.from_row(row) for row in rows]

    def unlaunched(self, limit: int) -> list[ImportRequest]:
        """Pending requests not handed to Dagster yet, oldest first: the sensor's next batch."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM import_requests WHERE status = 'pending' AND launched_at IS NULL "
                "ORDER BY request_id LIMIT ?",
                [limit],
            ).fetchall()
        return [ImportRequest.from_row(row) for row in rows]

    def launched_unfinished(self, limit: int) -> list[ImportRequest]:
        """Requests handed to Dagster (or recorded by their own run) with no outcome yet,
        oldest first: to reconcile with their runs."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM import_requests WHERE status IN ('pending', 'running') "
                "AND (launched_at IS NOT NULL OR run_id IS NOT NULL) "
                "ORDER BY coalesce(launched_at, started_at), request_id LIMIT ?",
                [limit],
            ).fetchall()
        return [ImportRequest.from_row(row) for row in rows]

    def active_count(self) -> int:
        with self._connect() as conn:
            return int(
                conn.execute(
                    "SELECT count(*) FROM import_requests WHERE status IN ('pending', 'running')"
                ).fetchone()[0]
            )

    # -- status changes, each guarded on the status it expects and on the owning run --------
    def mark_launched(self, request_ids: Iterable[int]) -> None:
        """The sensor asked Dagster for these requests' runs (first time only)."""
        ids = list(request_ids)
        if not ids:
            return
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE import_requests SET launched_at = ? "
                "WHERE request_id = ? AND launched_at IS NULL",
                [(_text(_now()), request_id) for request_id in ids],
            )

    def claim(self, request_key: str, run_id: str) -> ImportRequest | None:
        """Make ``run_id`` the request's run: only a pending request, or one this very run
        holds already, can be claimed. None: the request is not this run's to carry out."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE import_requests SET status = 'running', run_id = ?, "
                "started_at = coalesce(started_at, ?) WHERE request_key = ? "
                "AND (status = 'pending' OR (status = 'running' AND run_id = ?))",
                [run_id, _text(_now()), request_key, run_id],
            )
            if cursor.rowcount != 1:
                return None
            row = conn.execute(
                "SELECT * FROM import_requests WHERE request_key = ?", [request_key]
            ).fetchone()
        return ImportRequest.from_row(row)

    def record_progress(self, request_id: int, run_id: str, pages: int, members: int) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE import_requests SET progress_pages = ?, progress_members = ? "
                "WHERE request_id = ? AND status = 'running' AND run_id = ?",
                [pages, members, request_id, run_id],
            )

    def mark_done(
        self,
        request_id: int,
        run_id: str,
        outcome: CommittedImport,
        *,
        remote_group_id: str | None = None,
        group_name: str | None = None,
    ) -> bool:
        """The import committed (the lake says so). A request of this run that was marked
        failed meanwhile (its run was reported ended while the worker still ran, e.g. a forced
        termination) becomes done too: the lake decides. False: the request belongs to
        another run, or was canceled before this run claimed it; nothing changed."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE import_requests SET status = 'done', finished_at = ?, error = NULL, "
                "remote_group_id = coalesce(?, remote_group_id), "
                'group_name = coalesce(?, group_name), members = ?, joined = ?, "left" = ?, '
                "nested_groups = ?, pages = ?, duration_seconds = ? "
                "WHERE request_id = ? AND status IN ('pending', 'running', 'failed') "
                "AND run_id = ?",
                [
                    _text(outcome.finished_at or _now()),
                    remote_group_id,
                    group_name,
                    outcome.members,
                    outcome.joined,
                    outcome.left,
                    outcome.nested_groups,
                    outcome.pages,
                    outcome.duration_seconds,
                    request_id,
                    run_id,
                ],
            )
            return cursor.rowcount == 1

    def mark_failed(self, request_id: int, error: str, *, run_id: str | None = None) -> bool:
        """Record the failure of an active request owned by ``run_id`` (None: a request whose
        run never existed). False: it had finished, or belongs to another run; unchanged."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE import_requests SET status = 'failed', finished_at = ?, error = ? "
                "WHERE request_id = ? AND status IN ('pending', 'running') AND run_id IS ?",
                [_text(_now()), error[:4000], request_id, run_id],
            )
            return cursor.rowcount == 1

    def cancel(self, request_id: int, by: str) -> ImportRequest:
        """Cancel a pending request (a run that starts for it later does nothing).

        Raises RequestRefusal when it is not pending: a running import is stopped by canceling
        its run in Dagster, which then marks the request failed.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT * FROM import_requests WHERE request_id = ?", [request_id]
            ).fetchone()
            if row is None:
                raise RequestRefusal(f"no request {request_id}")
            if row["status"] != "pending":
                hint = (
                    f": cancel its run {row['run_id']} in the Dagster UI instead"
                    if row["status"] == "running"
                    else ""
                )
                raise RequestRefusal(f"request {request_id} is {row['status']}{hint}")
            conn.execute(
                "UPDATE import_requests SET status = 'canceled', finished_at = ?, error = ? "
                "WHERE request_id = ? AND status = 'pending'",
                [_text(_now()), f"canceled by {by}", request_id],
            )
            row = conn.execute(
                "SELECT * FROM import_requests WHERE request_id = ?", [request_id]
            ).fetchone()
        return ImportRequest.from_row(row)

    # -- email outbox ------------------------------------------------------------------------
    def queue_completion_emails(self, limit: int = 100) -> int:
        """Queue one email per finished request that asked for one (never twice)."""
        now = _text(_now())
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO email_outbox (request_id, recipient, status, queued_at,"
                " next_attempt_at)"
                " SELECT request_id, notify_email, 'pending', ?, ? FROM import_requests r"
                " WHERE status IN ('done', 'failed', 'canceled') AND notify_email IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM email_outbox o WHERE o.request_id = r.request_id)"
                " ORDER BY request_id LIMIT ?",
                [now, now, limit],
            )
            return cursor.rowcount

    def claim_due_emails(self, limit: int) -> list[OutboxEmail]:
        """Take due emails for sending; a claim is what stops a second sender."""
        now = _now()
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT request_id, recipient, attempts FROM email_outbox "
                "WHERE (status = 'pending' AND next_attempt_at <= ?) "
                "OR (status = 'sending' AND claimed_at <= ?) ORDER BY request_id LIMIT ?",
                [_text(now), _text(now - OUTBOX_CLAIM_TIMEOUT), limit],
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE email_outbox SET status = 'sending', claimed_at = ? "
                    "WHERE request_id = ?",
                    [_text(now), row["request_id"]],
                )
        return [OutboxEmail(r["request_id"], r["recipient"], r["attempts"]) for r in rows]

    def email_sent(self, request_id: int) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE email_outbox SET status = 'sent', sent_at = ?, "
                "attempts = attempts + 1, last_error = NULL WHERE request_id = ?",
                [_text(_now()), request_id],
            )

    def email_skipped(self, request_id: int, reason: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE email_outbox SET status = 'skipped', last_error = ? WHERE request_id = ?",
                [reason, request_id],
            )

    def email_failed(self, request_id: int, error: str) -> str:
        """Schedule another attempt with a growing wait; give up after a day. Returns status."""
        now = _now()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT attempts, queued_at FROM email_outbox WHERE request_id = ?", [request_id]
            ).fetchone()
            attempts = int(row["attempts"]) + 1
            wait = min(OUTBOX_FIRST_WAIT * 2 ** (attempts - 1), OUTBOX_MAX_WAIT)
            gave_up = now - datetime.fromisoformat(row["queued_at"]) >= OUTBOX_GIVE_UP
            status = "failed" if gave_up else "pending"
            conn.execute(
                "UPDATE email_outbox SET status = ?, attempts = ?, next_attempt_at = ?, "
                "claimed_at = NULL, last_error = ? WHERE request_id = ?",
                [status, attempts, _text(now + wait), error[:2000], request_id],
            )
        return status

    def outbox(self) -> list[dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM email_outbox ORDER BY request_id").fetchall()
        return [dict(row) for row in rows]

    # -- shrink confirmations ----------------------------------------------------------------
    def confirm_shrink(
        self,
        group_id: str,
        confirmed_by: str | None,
        members_before: int | None,
        members_after: int | None,
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO shrink_confirmations VALUES (?, ?, ?, ?, ?)",
                [group_id, _text(_now()), confirmed_by, members_before, members_after],
            )

    def shrink_confirmations(self) -> dict[str, datetime]:
        """The latest confirmation time per group."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT group_id, max(confirmed_at) AS at FROM shrink_confirmations "
                "GROUP BY group_id"
            ).fetchall()
        return {row["group_id"]: datetime.fromisoformat(row["at"]) for row in rows}

    # -- mirror ------------------------------------------------------------------------------
    def requests_frame(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame(columns=[f.name for f in fields(ImportRequest)])
        with self._connect() as conn:  # upgrades an old file first
            frame = pd.read_sql_query("SELECT * FROM import_requests ORDER BY request_id", conn)
        for column in ("requested_at", "launched_at", "started_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        return frame


def _upgrade(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring a file written by an earlier release up to date.

    Version 1 (no ``request_key``, no ``canceled``): SQLite cannot change a CHECK constraint,
    so the requests table is rebuilt as SQLite documents (new table, copy, drop, rename, with
    foreign keys off), every old request getting a key of its own.
    """
    conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set it first
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            conn.execute("COMMIT")  # another process upgraded it meanwhile
            return
        columns = {row[1] for row in conn.execute("PRAGMA table_info(import_requests)")}
        if columns and "request_key" not in columns:
            conn.execute(_REQUESTS_TABLE.replace("import_requests", "import_requests_v2"))
            kept = ", ".join(sorted(columns & {f.name for f in fields(ImportRequest)}))
            # The previous sensor tagged runs with the request id only, and may have launched
            # any pending request: such requests get a key marked "v1-" (their runs are found
            # by that id) and count as launched, so they are not launched a second time.
            conn.execute(
                f"INSERT INTO import_requests_v2 (request_key, launched_at, {kept}) "
                f"SELECT '{LEGACY_KEY_PREFIX}' || lower(hex(randomblob(16))), "
                f"CASE WHEN status = 'pending' THEN requested_at END, {kept} "
                "FROM import_requests"
            )
            conn.execute("DROP TABLE import_requests")
            conn.execute("ALTER TABLE import_requests_v2 RENAME TO import_requests")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: a COMMIT that failed (a full disk) has ended
    it already, and a second error must not hide the first."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def mirror_import_requests(conn: duckdb.DuckDBPyConnection, store: ControlStore) -> None:
    """Make the lake's ``import_requests`` a copy of the control store's, corrected by
    the lake itself: a request whose run committed its import (a ``group_syncs`` row of
    that run) is done, whatever the control store has caught up with yet."""
    frame = store.requests_frame()
    conn.execute("DELETE FROM import_requests")
    if frame.empty:
        return
    conn.register("control_requests", frame)
    try:
        conn.execute("INSERT INTO import_requests BY NAME SELECT * FROM control_requests")
    finally:
        conn.unregister("control_requests")
    conn.execute(
        """
        UPDATE import_requests AS r SET status = 'done', error = NULL,
            finished_at = s.synced_at, members = s.members, joined = s.joined,
            "left" = s."left", nested_groups = s.nested_groups, pages = s.pages,
            duration_seconds = s.duration_seconds
        FROM group_syncs AS s
        WHERE s.run_id = r.run_id AND s.mode = 'import'
          AND r.status IN ('pending', 'running', 'failed')
          AND s.group_id = r.connection || ':' || r.remote_group_id
        """
    )


def committed_import(
    conn: duckdb.DuckDBPyConnection, request: ImportRequest
) -> CommittedImport | None:
    """The lake's record of the request's run committing its import, if it did."""
    if request.run_id is None or request.remote_group_id is None:
        return None
    rows = conn.execute(
        """
        SELECT members, joined, "left", nested_groups, pages, duration_seconds, synced_at
        FROM group_syncs WHERE run_id = ? AND mode = 'import' AND group_id = ?
        """,
        [request.run_id, f"{request.connection}:{request.remote_group_id}"],
    ).fetchall()
    if not rows:
        return None
    members, joined, left, nested, pages, duration, synced_at = rows[0]
    return CommittedImport(members, joined, left, nested, pages, duration, synced_at)
