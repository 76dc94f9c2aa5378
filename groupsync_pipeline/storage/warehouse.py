"""Where the DuckDB files live and who may open them.

DuckDB locks a file for a connection's whole life, and a read-write holder blocks even
read-only openers in other processes. So the pipeline keeps two files:

* ``warehouse.duckdb``, private to the pipeline. Writers take an exclusive ``flock`` on
  ``warehouse.lock`` (a second writer waits instead of failing), open the file only for one
  transaction, and close it; the pipeline's own readers take a shared lock.
* ``groupsync.duckdb``, the published snapshot people query. After each commit the checkpointed
  warehouse is copied beside it and renamed over it atomically. An analyst's open session keeps
  the snapshot it opened (whole, never half-written) and never blocks the pipeline.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import duckdb

from groupsync_pipeline.storage.control import ControlStore, mirror_import_requests

WAREHOUSE_FILE = "warehouse.duckdb"
PUBLISHED_FILE = "groupsync.duckdb"
LOCK_FILE = "warehouse.lock"
STAGING_DIR = "staging"
PUBLISH_PENDING = ".publish-pending"  # present from a commit until its snapshot is published

logger = logging.getLogger(__name__)


class WarehouseBusyError(RuntimeError):
    """Another writer held the warehouse for longer than the wait allowed."""


class WarehousePublishError(RuntimeError):
    """The snapshot people read could not be replaced (after a commit, which stands: write()
    logs it as a warning and the next write or pipeline read publishes it)."""


def open_staging_file(path: Path, ddl: str) -> duckdb.DuckDBPyConnection:
    """A private DuckDB file that streams one run's rows to disk (bounded memory).

    Rows stay in the write-ahead log: the file is read once by the merge and deleted, so
    checkpointing (compressing) it would be wasted work.
    """
    conn = duckdb.connect(str(path))
    conn.execute("SET checkpoint_threshold = '1TB'")
    conn.execute("PRAGMA disable_checkpoint_on_shutdown")
    conn.execute(ddl)
    return conn


def remove_staging_file(path: Path) -> None:
    """Delete a staging DuckDB file and its write-ahead log."""
    for suffix in ("", ".wal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def schema_sql() -> str:
    return resources.files("groupsync_pipeline.storage").joinpath("schema.sql").read_text()


class Warehouse:
    """The pipeline's DuckDB files under one data directory."""

    def __init__(self, data_dir: str | os.PathLike[str], lock_timeout: float = 900.0) -> None:
        self.data_dir = Path(data_dir)
        self.lock_timeout = lock_timeout

    @property
    def warehouse_path(self) -> Path:
        return self.data_dir / WAREHOUSE_FILE

    @property
    def published_path(self) -> Path:
        return self.data_dir / PUBLISHED_FILE

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        """Hold the warehouse lock (LOCK_EX to write, LOCK_SH to read), waiting for it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / LOCK_FILE, "a+") as handle:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(handle, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarehouseBusyError(
                            f"another groupsync process held {self.warehouse_path} for more "
                            f"than {self.lock_timeout:.0f} s"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One all-or-nothing transaction on the warehouse, then publish the snapshot.

        Once COMMIT returns the change is made: nothing after it (a full disk during the
        checkpoint or the copy) may report the write as failed. Such a problem is logged as a
        warning and the snapshot is published by the next write or pipeline read.
        """
        with self._locked(fcntl.LOCK_EX):
            self._remove_leftover_copies()
            if self._pending_marker.exists():  # an earlier commit was never published
                self._publish_after_commit(None)
            conn = duckdb.connect(str(self.warehouse_path))
            try:
                conn.execute(schema_sql())
                conn.execute("BEGIN TRANSACTION")
                try:
                    yield conn
                    # Requests live in the control store; each write refreshes their copy here.
                    mirror_import_requests(conn, ControlStore(self.data_dir))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                self._pending_marker.touch()  # set before COMMIT: a crash after it republishes
                conn.execute("COMMIT")
                self._publish_after_commit(conn)
            finally:
                conn.close()

    def _publish_after_commit(self, conn: duckdb.DuckDBPyConnection | None) -> None:
        """Checkpoint (the copy must hold everything, no WAL) and publish; never raise."""
        try:
            if conn is None:
                conn = duckdb.connect(str(self.warehouse_path))
                try:
                    conn.execute("CHECKPOINT")
                finally:
                    conn.close()
            else:
                conn.execute("CHECKPOINT")
            self._publish()
        except (OSError, duckdb.Error, WarehousePublishError) as exc:
            logger.warning(
                "the change is committed, but the snapshot %s could not be published yet "
                "(%s); the next write or pipeline read publishes it",
                self.published_path,
                exc,
            )

    def _remove_leftover_copies(self) -> None:
        """Half-written snapshot copies of a publisher killed mid-copy (only writers publish,
        and the caller holds the writer lock, so none of them is in use)."""
        for leftover in self.data_dir.glob(f".{PUBLISHED_FILE}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    @property
    def _pending_marker(self) -> Path:
        return self.data_dir / PUBLISH_PENDING

    def _publish(self) -> None:
        """Copy the warehouse beside the snapshot and rename it over the snapshot."""
        temporary = self.data_dir / f".{PUBLISHED_FILE}.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copyfile(self.warehouse_path, temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, self.published_path)
            directory = os.open(self.data_dir, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power cut
            finally:
                os.close(directory)
        except OSError as exc:
            raise WarehousePublishError(
                f"publishing {self.published_path} failed ({exc.strerror or exc})"
            ) from exc
        finally:
            temporary.unlink(missing_ok=True)
        self._pending_marker.unlink(missing_ok=True)

    def ensure_published(self) -> None:
        """Create the schema and the snapshot if new; republish one left stale by a crash."""
        if (
            not self.published_path.exists()
            or not self.warehouse_path.exists()
            or self._pending_marker.exists()
        ):
            with self.write():
                pass

    @contextmanager
    def read_if_free(self) -> Iterator[duckdb.DuckDBPyConnection | None]:
        """A read-only connection to the warehouse only if no writer holds it now (None
        otherwise, and None when there is no warehouse yet): for a caller that must never
        wait, such as a sensor tick. It never creates or publishes anything."""
        if not self.warehouse_path.exists():
            yield None
            return
        with open(self.data_dir / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                conn = duckdb.connect(str(self.warehouse_path), read_only=True)
                try:
                    yield conn
                finally:
                    conn.close()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def shared_lock(self) -> Iterator[None]:
        """No writer until the block ends: for a caller that attaches the warehouse itself."""
        self.ensure_published()
        with self._locked(fcntl.LOCK_SH):
            yield

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for the pipeline's own reads (checks, CLI listings).

        It reads the private warehouse under a shared lock, not the published snapshot: an
        analyst holding the snapshot read-write would make any other opener of it fail.
        """
        with self.shared_lock():
            conn = duckdb.connect(str(self.warehouse_path), read_only=True)
            try:
                yield conn
            finally:
                conn.close()

    def staging_path(self) -> Path:
        """A fresh private DuckDB file for streaming an import before it is merged."""
        folder = self.data_dir / STAGING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        day_ago = time.time() - 86400
        for old in folder.glob("*.duckdb*"):  # left by runs that were killed
            with contextlib.suppress(OSError):  # another import may be removing its own
                if old.is_file() and old.stat().st_mtime < day_ago:
                    old.unlink()
        return folder / f"{uuid.uuid4().hex}.duckdb"
