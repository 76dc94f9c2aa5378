"""Lake maintenance: retention, flushing, compaction and removal of unused files.

DuckLake never rewrites or deletes anything on its own: small writes are inlined into the
catalog or land as small Parquet files, every write keeps a snapshot (time travel), and files
replaced by a merge or a delete stay on disk while an old snapshot may still read them. The
daily maintenance job (defs/maintenance.py) runs :func:`run_maintenance`, which:

1. deletes activities (and their tags) older than ``GROUPSYNC_ACTIVITY_RETENTION_DAYS``, cut at
   a UTC midnight so whole day partitions go (membership history is never expired), and the
   sign-ins' pairings of name and account older than the 30 days that resolve actors;
2. flushes inlined rows into Parquet files (``ducklake_flush_inlined_data``);
3. rewrites files most of whose rows were deleted (``ducklake_rewrite_data_files``: a day
   emptied by retention leaves its files and delete files until then);
4. merges small adjacent files of each partition (``ducklake_merge_adjacent_files``);
5. expires snapshots older than ``GROUPSYNC_LAKE_SNAPSHOT_RETENTION_DAYS`` (time travel reaches
   that far back; the interval columns of ``group_memberships`` keep the whole history);
6. deletes the files no snapshot needs any more (``ducklake_cleanup_old_files``) and files
   no catalog entry names (``ducklake_delete_orphaned_files``), once older than
   ``GROUPSYNC_LAKE_FILE_GRACE_HOURS``, so a query that started before still finds its files.

Everything runs under the lake's writer lock: a write that deletes or merges at the same time
would race the compaction. Readers are never blocked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import duckdb

from groupsync_pipeline.config import ConfigError, env_number
from groupsync_pipeline.storage.activity_writes import SIGN_IN_PAIRING_DAYS
from groupsync_pipeline.storage.lake import LAKE_ALIAS, Lake

ACTIVITY_RETENTION_ENV = "GROUPSYNC_ACTIVITY_RETENTION_DAYS"
SNAPSHOT_RETENTION_ENV = "GROUPSYNC_LAKE_SNAPSHOT_RETENTION_DAYS"
FILE_GRACE_ENV = "GROUPSYNC_LAKE_FILE_GRACE_HOURS"
DEFAULT_ACTIVITY_RETENTION_DAYS = 180
DEFAULT_SNAPSHOT_RETENTION_DAYS = 7
DEFAULT_FILE_GRACE_HOURS = 24

# The DuckLake catalog's own tables, as DuckDB attaches them beside the lake.
_META = f"__ducklake_metadata_{LAKE_ALIAS}"

logger = logging.getLogger(__name__)

Figure = int | float | str


@dataclass(frozen=True)
class MaintenanceSettings:
    activity_retention_days: int  # 0: keep activities forever
    snapshot_retention_days: float
    file_grace_hours: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MaintenanceSettings:
        """The settings from the environment; a ConfigError names a wrong one."""
        env = os.environ if environ is None else environ
        retention = env_number(
            env, ACTIVITY_RETENTION_ENV, DEFAULT_ACTIVITY_RETENTION_DAYS, 0, 100_000
        )
        if retention != int(retention):
            raise ConfigError(f"{ACTIVITY_RETENTION_ENV} must be a whole number of days")
        return cls(
            activity_retention_days=int(retention),
            snapshot_retention_days=env_number(
                env, SNAPSHOT_RETENTION_ENV, DEFAULT_SNAPSHOT_RETENTION_DAYS, 0, 100_000
            ),
            file_grace_hours=env_number(env, FILE_GRACE_ENV, DEFAULT_FILE_GRACE_HOURS, 0, 100_000),
        )


@dataclass(frozen=True)
class LakeFiles:
    """What the catalog says is stored (works the same on a local folder and on S3)."""

    live_files: int  # data files of the current snapshot
    live_bytes: int
    stored_files: int  # every data and delete file still on storage, old snapshots' included
    stored_bytes: int
    inlined_rows: int  # rows still held in the catalog, not yet in Parquet


@dataclass
class StepReport:
    name: str
    seconds: float
    figures: dict[str, Figure] = field(default_factory=dict)

    def line(self) -> str:
        shown = ", ".join(f"{key} {value}" for key, value in self.figures.items())
        return f"{self.name}: {shown} ({self.seconds:.2f} s)"


@dataclass
class MaintenanceReport:
    before: LakeFiles
    after: LakeFiles
    steps: list[StepReport]
    seconds: float

    def metadata(self) -> dict[str, Figure]:
        """Flat figures for Dagster metadata: ``<step>: <figure>`` plus totals."""
        figures: dict[str, Figure] = {}
        for prefix, files in (("before", self.before), ("after", self.after)):
            for key, value in vars(files).items():
                figures[f"{prefix}: {key}"] = value
        for step in self.steps:
            figures[f"{step.name}: seconds"] = round(step.seconds, 3)
            for key, value in step.figures.items():
                figures[f"{step.name}: {key}"] = value
        figures["seconds"] = round(self.seconds, 3)
        return figures


def lake_files(conn: duckdb.DuckDBPyConnection) -> LakeFiles:
    live_files, live_bytes = conn.execute(
        f"SELECT count(*), coalesce(sum(file_size_bytes), 0) FROM {_META}.ducklake_data_file "
        "WHERE end_snapshot IS NULL"
    ).fetchall()[0]
    stored_files, stored_bytes = conn.execute(
        f"""
        SELECT count(*), coalesce(sum(file_size_bytes), 0) FROM (
            SELECT path, file_size_bytes FROM {_META}.ducklake_data_file
            UNION ALL
            SELECT path, file_size_bytes FROM {_META}.ducklake_delete_file
        )
        """
    ).fetchall()[0]
    scheduled = conn.execute(
        f"SELECT count(*) FROM {_META}.ducklake_files_scheduled_for_deletion"
    ).fetchall()[0][0]
    return LakeFiles(
        live_files=int(live_files),
        live_bytes=int(live_bytes),
        stored_files=int(stored_files) + int(scheduled),
        stored_bytes=int(stored_bytes),
        inlined_rows=_inlined_rows(conn),
    )


def _inlined_rows(conn: duckdb.DuckDBPyConnection) -> int:
    """Rows of the current snapshot still inlined in the catalog."""
    tables = conn.execute(
        f"SELECT DISTINCT table_name FROM {_META}.ducklake_inlined_data_tables"
    ).fetchall()
    total = 0
    for (name,) in tables:
        total += conn.execute(
            f'SELECT count(*) FROM {_META}."{name}" WHERE end_snapshot IS NULL'
        ).fetchall()[0][0]
    return int(total)


def retention_cutoff(now: datetime, days: int) -> datetime | None:
    """The UTC midnight before which activities are deleted; None when kept forever.

    ``days`` whole days are kept before today's: at 180, on 1 July everything from
    2 January 00:00 UTC on stays.
    """
    if days <= 0:
        return None
    today = now.astimezone(UTC).date()
    first_kept: date = today - timedelta(days=days)
    return datetime(first_kept.year, first_kept.month, first_kept.day, tzinfo=UTC)


def delete_old_activities(lake: Lake, cutoff: datetime) -> StepReport:
    """Delete activities before ``cutoff`` and their tags, in one transaction."""
    started = time.monotonic()
    with lake.write() as conn:
        activities = conn.execute(
            "DELETE FROM activities WHERE occurred_at < $cutoff", {"cutoff": cutoff}
        ).fetchall()[0][0]
        tags = conn.execute(
            "DELETE FROM _activity_group_keys WHERE occurred_on < $day",
            {"day": cutoff.date()},
        ).fetchall()[0][0]
    return StepReport(
        "activity retention",
        time.monotonic() - started,
        {
            "cutoff": cutoff.isoformat(),
            "activities deleted": int(activities),
            "tags deleted": int(tags),
        },
    )


def delete_old_sign_in_names(lake: Lake, now: datetime) -> StepReport:
    """Delete the sign-ins' pairings of name and account too old to resolve an actor."""
    started = time.monotonic()
    first_kept = now.astimezone(UTC).date() - timedelta(days=SIGN_IN_PAIRING_DAYS)
    with lake.write() as conn:
        deleted = conn.execute(
            "DELETE FROM _sign_in_names WHERE signed_in_on < $day", {"day": first_kept}
        ).fetchall()[0][0]
    return StepReport(
        "sign-in pairings",
        time.monotonic() - started,
        {"kept from": first_kept.isoformat(), "deleted": int(deleted)},
    )


def run_maintenance(
    lake: Lake,
    settings: MaintenanceSettings | None = None,
    *,
    now: datetime | None = None,
    log: Callable[[str], None] | None = None,
) -> MaintenanceReport:
    """Run every maintenance step; each is logged with its figures as it ends.

    ``now`` decides the retention cutoff's day (tests move it); snapshot and file ages are
    measured against the clock, as DuckLake records them."""
    settings = settings or MaintenanceSettings.from_env()
    clock = datetime.now(UTC)
    now = now or clock
    say = log or logger.info
    started = time.monotonic()
    steps: list[StepReport] = []

    def done(step: StepReport) -> None:
        steps.append(step)
        say(step.line())

    lake.ensure_ready()
    with _connection(lake) as conn:
        before = lake_files(conn)
    say(
        f"lake before: {before.live_files} live files ({before.live_bytes} bytes), "
        f"{before.stored_files} stored, {before.inlined_rows} inlined rows"
    )

    cutoff = retention_cutoff(now, settings.activity_retention_days)
    if cutoff is not None:
        done(delete_old_activities(lake, cutoff))
    else:
        done(StepReport("activity retention", 0.0, {"cutoff": "none (kept forever)"}))

    done(delete_old_sign_in_names(lake, now))

    snapshot_cutoff = clock - timedelta(days=settings.snapshot_retention_days)
    file_cutoff = clock - timedelta(hours=settings.file_grace_hours)
    with lake.writer_lock(), _connection(lake) as conn:
        done(_flush(conn))
        done(_rewrite(conn))
        done(_merge(conn))
        done(_expire(conn, snapshot_cutoff))
        done(_cleanup(conn, file_cutoff))
        done(_orphans(conn, file_cutoff))
        after = lake_files(conn)
    say(
        f"lake after: {after.live_files} live files ({after.live_bytes} bytes), "
        f"{after.stored_files} stored, {after.inlined_rows} inlined rows"
    )
    return MaintenanceReport(before, after, steps, time.monotonic() - started)


@contextmanager
def _connection(lake: Lake) -> Iterator[duckdb.DuckDBPyConnection]:
    """``lake.connect()``: a plain connection, no transaction (DuckLake's maintenance calls
    commit on their own)."""
    conn = lake.connect()
    try:
        yield conn
    finally:
        conn.close()


def _timed(name: str, run: Callable[[], dict[str, Figure]]) -> StepReport:
    started = time.monotonic()
    figures = run()
    return StepReport(name, time.monotonic() - started, figures)


def _flush(conn: duckdb.DuckDBPyConnection) -> StepReport:
    def run() -> dict[str, Figure]:
        rows = conn.execute(f"CALL ducklake_flush_inlined_data('{LAKE_ALIAS}')").fetchall()
        return {"rows flushed": sum(int(row[2] or 0) for row in rows), "tables": len(rows)}

    return _timed("flush inlined data", run)


def _rewrite(conn: duckdb.DuckDBPyConnection) -> StepReport:
    """Rewrite files whose rows are (almost) all deleted: a retention delete leaves delete
    files beside the data files it emptied, and this drops both."""

    def run() -> dict[str, Figure]:
        rows = conn.execute(f"CALL ducklake_rewrite_data_files('{LAKE_ALIAS}')").fetchall()
        return {
            "files rewritten": sum(int(row[2] or 0) for row in rows),
            "files written": sum(int(row[3] or 0) for row in rows),
        }

    return _timed("rewrite deleted files", run)


def _merge(conn: duckdb.DuckDBPyConnection) -> StepReport:
    def run() -> dict[str, Figure]:
        live_before = lake_files(conn).live_files
        rows = conn.execute(f"CALL ducklake_merge_adjacent_files('{LAKE_ALIAS}')").fetchall()
        live_after = lake_files(conn).live_files
        return {
            "files merged": sum(int(row[2] or 0) for row in rows),
            "files written": sum(int(row[3] or 0) for row in rows),
            "live files before": live_before,
            "live files after": live_after,
        }

    return _timed("merge adjacent files", run)


def _expire(conn: duckdb.DuckDBPyConnection, older_than: datetime) -> StepReport:
    def run() -> dict[str, Figure]:
        rows = conn.execute(
            f"CALL ducklake_expire_snapshots('{LAKE_ALIAS}', older_than => $t)",
            {"t": older_than},
        ).fetchall()
        return {"snapshots expired": len(rows), "older than": older_than.isoformat()}

    return _timed("expire snapshots", run)


def _cleanup(conn: duckdb.DuckDBPyConnection, older_than: datetime) -> StepReport:
    def run() -> dict[str, Figure]:
        rows = conn.execute(
            f"CALL ducklake_cleanup_old_files('{LAKE_ALIAS}', older_than => $t)",
            {"t": older_than},
        ).fetchall()
        return {"files deleted": len(rows)}

    return _timed("cleanup old files", run)


def _orphans(conn: duckdb.DuckDBPyConnection, older_than: datetime) -> StepReport:
    def run() -> dict[str, Figure]:
        rows = conn.execute(
            f"CALL ducklake_delete_orphaned_files('{LAKE_ALIAS}', older_than => $t)",
            {"t": older_than},
        ).fetchall()
        return {"files deleted": len(rows)}

    return _timed("delete orphaned files", run)
