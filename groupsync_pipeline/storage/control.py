"""The control store: import requests, the email outbox and shrink confirmations.

It is a small SQLite file beside the warehouse, not a table in it, because the CLI and the
sensor must record and read requests at any moment: DuckDB would make them wait for (or block)
a running import. SQLite in WAL mode lets short writers from many processes take turns
(``busy_timeout``) and readers never wait. Every warehouse write copies ``import_requests``
into the warehouse (``mirror_import_requests``) so requests are queryable with the rest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

CONTROL_FILE = "control.sqlite3"
ACTIVE = ("pending", "running")
FINISHED = ("done", "failed")
# Outbox retry waits: 1, 2, 4 ... minutes, at most an hour; given up after a day.
OUTBOX_FIRST_WAIT = timedelta(minutes=1)
OUTBOX_MAX_WAIT = timedelta(hours=1)
OUTBOX_GIVE_UP = timedelta(days=1)
# A claim older than this is a sender that died mid-send: the email may be sent again.
OUTBOX_CLAIM_TIMEOUT = timedelta(minutes=10)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS import_requests (
    request_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    connection      TEXT NOT NULL,
    group_reference TEXT NOT NULL,
    remote_group_id TEXT,
    group_name      TEXT,
    notify_email    TEXT,
    source          TEXT NOT NULL,
    retry_of        INTEGER REFERENCES import_requests (request_id),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    requested_at    TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    run_id          TEXT,
    error           TEXT,
    members         INTEGER,
    joined          INTEGER,
    "left"          INTEGER,
    nested_groups   INTEGER,
    pages           INTEGER,
    duration_seconds REAL
);
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


@dataclass(frozen=True)
class ImportRequest:
    request_id: int
    connection: str
    group_reference: str
    remote_group_id: str | None
    group_name: str | None
    notify_email: str | None
    source: str  # cli | launchpad | retry
    retry_of: int | None
    status: str  # pending | running | done | failed
    requested_at: datetime
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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ImportRequest:
        values = dict(row)
        for name in ("requested_at", "started_at", "finished_at"):
            values[name] = _time(values[name])
        return cls(**values)


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
class OutboxEmail:
    request_id: int
    recipient: str
    attempts: int


class RequestConflictError(ValueError):
    """The group is already held by an active request; the message names it."""


class RequestLimitError(ValueError):
    """Recording would exceed the allowed number of active requests."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} requests are already pending or running")
        self.active = active


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
            conn.executescript(_SCHEMA)
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
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- requests ----------------------------------------------------------------------------
    def add_requests(self, requests: list[NewRequest], max_active: int | None = None) -> list[int]:
        """Record all of them or none: a group already held by an active request refuses all,
        as does going over ``max_active`` pending or running requests."""
        now = _text(_now())
        with self._transaction() as conn:
            if max_active is not None:
                active = conn.execute(
                    "SELECT count(*) FROM import_requests WHERE status IN ('pending', 'running')"
                ).fetchone()[0]
                if active + len(requests) > max_active:
                    raise RequestLimitError(active)
            ids: list[int] = []
            for request in requests:
                holder = (
                    None
                    if request.remote_group_id is None
                    else conn.execute(
                        "SELECT request_id, status FROM import_requests WHERE connection = ? "
                        "AND remote_group_id = ? AND status IN ('pending', 'running')",
                        [request.connection, request.remote_group_id],
                    ).fetchone()
                )
                if holder is not None and request.source != "launchpad":
                    raise RequestConflictError(
                        f"'{request.group_name or request.group_reference}' in "
                        f"'{request.connection}' is already requested: request "
                        f"{holder['request_id']} is {holder['status']}"
                    )
                cursor = conn.execute(
                    "INSERT INTO import_requests (connection, group_reference, remote_group_id,"
                    " group_name, notify_email, source, retry_of, status, requested_at,"
                    " started_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
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
                ids.append(int(cursor.lastrowid or 0))
            return ids

    def get(self, request_id: int) -> ImportRequest | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT * FROM import_requests WHERE request_id = ?", [request_id]
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

    def pending_after(self, request_id: int, limit: int) -> list[ImportRequest]:
        """Pending requests newer than ``request_id``, oldest first: the sensor's next batch."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM import_requests WHERE status = 'pending' AND request_id > ? "
                "ORDER BY request_id LIMIT ?",
                [request_id, limit],
            ).fetchall()
        return [ImportRequest.from_row(row) for row in rows]

    def launched_unfinished(self, up_to: int, limit: int) -> list[ImportRequest]:
        """Requests with a run but no outcome yet, oldest first: to reconcile with their runs.

        Launched means: handed to Dagster by the sensor (id up to its cursor), or recorded by
        a run that was already going (it has a run id).
        """
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT * FROM import_requests WHERE status IN ('pending', 'running') "
                "AND (request_id <= ? OR run_id IS NOT NULL) ORDER BY request_id LIMIT ?",
                [up_to, limit],
            ).fetchall()
        return [ImportRequest.from_row(row) for row in rows]

    def active_count(self) -> int:
        with self._connect() as conn:
            return int(
                conn.execute(
                    "SELECT count(*) FROM import_requests WHERE status IN ('pending', 'running')"
                ).fetchone()[0]
            )

    def mark_running(
        self,
        request_id: int,
        run_id: str,
        remote_group_id: str | None = None,
        group_name: str | None = None,
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE import_requests SET status = 'running', run_id = ?, started_at = ?, "
                "remote_group_id = coalesce(?, remote_group_id), "
                "group_name = coalesce(?, group_name) "
                "WHERE request_id = ? AND status IN ('pending', 'running')",
                [run_id, _text(_now()), remote_group_id, group_name, request_id],
            )

    def mark_done(
        self,
        request_id: int,
        *,
        remote_group_id: str,
        group_name: str,
        members: int,
        joined: int,
        left: int,
        nested_groups: int,
        pages: int,
        duration_seconds: float,
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE import_requests SET status = 'done', finished_at = ?, error = NULL, "
                'remote_group_id = ?, group_name = ?, members = ?, joined = ?, "left" = ?, '
                "nested_groups = ?, pages = ?, duration_seconds = ? WHERE request_id = ?",
                [
                    _text(_now()),
                    remote_group_id,
                    group_name,
                    members,
                    joined,
                    left,
                    nested_groups,
                    pages,
                    duration_seconds,
                    request_id,
                ],
            )

    def mark_failed(self, request_id: int, error: str, *, only_if_active: bool = False) -> bool:
        """Record the failure; with ``only_if_active``, leave a finished request as it is."""
        condition = " AND status IN ('pending', 'running')" if only_if_active else ""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE import_requests SET status = 'failed', finished_at = ?, error = ? "
                f"WHERE request_id = ?{condition}",
                [_text(_now()), error[:4000], request_id],
            )
            return cursor.rowcount == 1

    # -- email outbox ------------------------------------------------------------------------
    def queue_completion_emails(self, limit: int = 100) -> int:
        """Queue one email per finished request that asked for one (never twice)."""
        now = _text(_now())
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO email_outbox (request_id, recipient, status, queued_at,"
                " next_attempt_at)"
                " SELECT request_id, notify_email, 'pending', ?, ? FROM import_requests r"
                " WHERE status IN ('done', 'failed') AND notify_email IS NOT NULL"
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
        with closing(sqlite3.connect(self.path, timeout=self.busy_timeout)) as conn:
            frame = pd.read_sql_query("SELECT * FROM import_requests ORDER BY request_id", conn)
        for column in ("requested_at", "started_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        return frame


def mirror_import_requests(conn: duckdb.DuckDBPyConnection, store: ControlStore) -> None:
    """Make the warehouse's ``import_requests`` table a copy of the control store's."""
    frame = store.requests_frame()
    conn.execute("DELETE FROM import_requests")
    if frame.empty:
        return
    conn.register("control_requests", frame)
    try:
        conn.execute("INSERT INTO import_requests BY NAME SELECT * FROM control_requests")
    finally:
        conn.unregister("control_requests")
