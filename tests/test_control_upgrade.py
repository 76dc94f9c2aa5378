"""A control store written by the previous release is upgraded in place, losing nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from groupsync_pipeline.storage.control import ControlStore

# The previous release's schema (no request_key, no 'canceled'), as it wrote it.
_V1 = """
CREATE TABLE import_requests (
    request_id INTEGER PRIMARY KEY AUTOINCREMENT, connection TEXT NOT NULL,
    group_reference TEXT NOT NULL, remote_group_id TEXT, group_name TEXT, notify_email TEXT,
    source TEXT NOT NULL, retry_of INTEGER REFERENCES import_requests (request_id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    requested_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, run_id TEXT, error TEXT,
    members INTEGER, joined INTEGER, "left" INTEGER, nested_groups INTEGER, pages INTEGER,
    duration_seconds REAL
);
CREATE TABLE email_outbox (
    request_id INTEGER PRIMARY KEY REFERENCES import_requests (request_id),
    recipient TEXT NOT NULL, status TEXT NOT NULL, queued_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT NOT NULL, claimed_at TEXT,
    sent_at TEXT, last_error TEXT
);
CREATE TABLE shrink_confirmations (group_id TEXT NOT NULL, confirmed_at TEXT NOT NULL,
    confirmed_by TEXT, members_before INTEGER, members_after INTEGER);
INSERT INTO import_requests (connection, group_reference, remote_group_id, group_name, source,
    status, requested_at, finished_at, run_id, members)
VALUES ('c', 'HR', 'g1', 'HR', 'cli', 'done', '2026-01-01T00:00:00+00:00',
    '2026-01-01T00:01:00+00:00', 'run-1', 12),
       ('c', 'Legal', 'g2', 'Legal', 'cli', 'failed', '2026-01-02T00:00:00+00:00',
    '2026-01-02T00:01:00+00:00', 'run-2', NULL);
INSERT INTO import_requests (connection, group_reference, remote_group_id, group_name, source,
    retry_of, status, requested_at)
VALUES ('c', 'Legal', 'g2', 'Legal', 'retry', 2, 'pending', '2026-01-03T00:00:00+00:00');
INSERT INTO email_outbox VALUES (1, 'a@b.io', 'sent', '2026-01-01T00:01:00+00:00', 1,
    '2026-01-01T00:01:00+00:00', NULL, '2026-01-01T00:01:05+00:00', NULL);
"""


def test_previous_release_control_store_is_upgraded(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "control.sqlite3") as conn:
        conn.executescript(_V1)
    store = ControlStore(tmp_path)
    first, second, third = reversed(store.recent())
    assert (first.status, first.members, first.run_id, first.group_name) == (
        "done",
        12,
        "run-1",
        "HR",
    )
    assert (second.status, third.status, third.retry_of) == ("failed", "pending", 2)
    keys = {first.request_key, second.request_key, third.request_key}
    # Marked as the previous release's (its runs carry the request id only), each unique.
    assert len(keys) == 3 and all(key.startswith("v1-") and len(key) == 35 for key in keys)
    # The previous sensor may have launched the pending one: it is not launched again.
    assert third.launched_at == third.requested_at and first.launched_at is None
    assert store.outbox()[0]["status"] == "sent"
    # The new status works, foreign keys still hold, and a new request gets its own key.
    assert store.cancel(3, "tester").status == "canceled"
    with sqlite3.connect(tmp_path / "control.sqlite3") as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert "import_requests_v" not in " ".join(
            row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")
        )
    # Opening it again changes nothing.
    assert [r.request_key for r in ControlStore(tmp_path).recent()] == [
        r.request_key for r in store.recent()
    ]
