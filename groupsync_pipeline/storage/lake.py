"""The lake: every groupsync table, as DuckLake (Parquet data files plus a SQL catalog).

DuckLake gives each reader a snapshot: an analyst's session or a sensor tick never waits for a
run and never sees half of one, and a write costs what it adds, not what is stored.

* Embedded default: a SQLite catalog and a data folder under the data directory, so a laptop
  needs nothing else.
* Scale-out: a PostgreSQL catalog and a data path on S3-compatible object storage, chosen by
  environment variables (`LakeSettings.from_env`); secrets come only from the environment.

Writers are serialized (a ``flock`` beside a SQLite catalog, a PostgreSQL advisory lock with a
PostgreSQL one): groupsync numbers activities and groups from the stored maximum, which only
one writer at a time may do, and a SQLite catalog takes one writer anyway. The slow parts of a
run (reading the apps into staging files) happen outside the lock; only the merge holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

import duckdb
import tenacity

from groupsync_pipeline.storage.control import ControlStore, mirror_import_requests
from groupsync_pipeline.storage.extensions import (
    extension_path,
    load_extensions,
    offline_connection,
)

CATALOG_ENV = "GROUPSYNC_LAKE_CATALOG"
DATA_PATH_ENV = "GROUPSYNC_LAKE_DATA_PATH"
S3_ENDPOINT_ENV = "GROUPSYNC_S3_ENDPOINT"
S3_REGION_ENV = "GROUPSYNC_S3_REGION"
S3_URL_STYLE_ENV = "GROUPSYNC_S3_URL_STYLE"
S3_USE_SSL_ENV = "GROUPSYNC_S3_USE_SSL"

LAKE_ALIAS = "lake"
LAKE_DIR = "lake"
LOCK_FILE = "lake.lock"
STAGING_DIR = "staging"
# pg_advisory_lock key of the lake's writer lock ("groupsyn" as a big-endian int64).
_PG_WRITER_LOCK_KEY = int.from_bytes(b"groupsyn", "big") & 0x7FFF_FFFF_FFFF_FFFF

logger = logging.getLogger(__name__)


# The DuckDB instances of the lakes this process uses (see Lake.connect), most recent last.
_SHARED_INSTANCES: OrderedDict[tuple[LakeSettings, bool], duckdb.DuckDBPyConnection]
_SHARED_INSTANCES = OrderedDict()
_SHARED_INSTANCES_KEPT = 4
_SHARED_LOCK = threading.Lock()


class LakeConfigError(ValueError):
    """The lake's settings (environment variables) are wrong; the message says which."""


class LakeBusyError(RuntimeError):
    """Another writer held the lake for longer than the wait allowed."""


def schema_sql() -> str:
    return resources.files("groupsync_pipeline.storage").joinpath("schema.sql").read_text()


def schema_version() -> str:
    return hashlib.sha256(schema_sql().encode()).hexdigest()[:16]


def open_staging_file(path: Path, ddl: str) -> duckdb.DuckDBPyConnection:
    """A private DuckDB file that streams one run's rows to disk (bounded memory).

    Rows stay in the write-ahead log: the file is read once by the merge and deleted, so
    checkpointing (compressing) it would be wasted work.
    """
    conn = offline_connection(str(path))
    conn.execute("SET checkpoint_threshold = '1TB'")
    conn.execute("PRAGMA disable_checkpoint_on_shutdown")
    conn.execute(ddl)
    return conn


def remove_staging_file(path: Path) -> None:
    """Delete a staging DuckDB file and its write-ahead log."""
    for suffix in ("", ".wal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class S3Settings:
    """Where S3-compatible object storage is; credentials are read from the environment
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) per connection."""

    endpoint: str | None
    region: str | None
    url_style: str | None
    use_ssl: bool

    def secret_statement(self, credentials: bool = True) -> str:
        options = ["TYPE s3"]
        for option, variable in (
            ("KEY_ID", "AWS_ACCESS_KEY_ID"),
            ("SECRET", "AWS_SECRET_ACCESS_KEY"),
            ("SESSION_TOKEN", "AWS_SESSION_TOKEN"),
        ):
            if not credentials:
                options.append(f"{option} '...'")
            elif os.environ.get(variable):
                options.append(f"{option} {sql_text(os.environ[variable])}")
        if self.endpoint:
            options.append(f"ENDPOINT {sql_text(self.endpoint)}")
        if self.region:
            options.append(f"REGION {sql_text(self.region)}")
        if self.url_style:
            options.append(f"URL_STYLE {sql_text(self.url_style)}")
        options.append(f"USE_SSL {'true' if self.use_ssl else 'false'}")
        return f"CREATE OR REPLACE TEMPORARY SECRET groupsync_s3 ({', '.join(options)})"


@dataclass(frozen=True)
class LakeSettings:
    """Where the lake's catalog and data files are."""

    catalog_kind: str  # sqlite | postgres
    catalog: str  # a file path (sqlite) or a libpq connection string without password
    data_path: str  # a local folder or s3://bucket/prefix/
    s3: S3Settings | None = None

    @classmethod
    def from_env(cls, data_dir: str | os.PathLike[str]) -> LakeSettings:
        base = Path(data_dir).absolute() / LAKE_DIR
        raw_catalog = os.environ.get(CATALOG_ENV, "").strip()
        if not raw_catalog:
            kind, catalog = "sqlite", str(base / "catalog.sqlite")
        else:
            kind, _, catalog = raw_catalog.partition(":")
            if kind not in ("sqlite", "postgres") or not catalog.strip():
                raise LakeConfigError(
                    f"{CATALOG_ENV} must be 'sqlite:<file>' or 'postgres:<connection string>' "
                    f"(e.g. postgres:dbname=lake host=db.internal user=groupsync)"
                )
            if kind == "postgres" and "password" in catalog.lower():
                raise LakeConfigError(
                    f"{CATALOG_ENV} must not hold a password: set PGPASSWORD (or use a "
                    "~/.pgpass file) instead"
                )
            if kind == "sqlite":
                catalog = str(Path(catalog).expanduser().absolute())
        data_path = os.environ.get(DATA_PATH_ENV, "").strip() or str(base / "data")
        s3 = None
        if data_path.startswith(("s3://", "s3a://", "gcs://", "r2://")):
            s3 = S3Settings(
                endpoint=os.environ.get(S3_ENDPOINT_ENV) or None,
                region=os.environ.get(S3_REGION_ENV) or None,
                url_style=os.environ.get(S3_URL_STYLE_ENV) or None,
                use_ssl=os.environ.get(S3_USE_SSL_ENV, "true").lower() not in ("0", "false", "no"),
            )
        else:
            data_path = str(Path(data_path).expanduser().absolute())
        if not data_path.endswith("/"):
            data_path += "/"
        return cls(kind, catalog, data_path, s3)

    def describe(self) -> str:
        """For logs and errors: the connection string has no password by construction."""
        return f"DuckLake ({self.catalog_kind} catalog {self.catalog}, data {self.data_path})"

    def attach_statement(self, alias: str, read_only: bool) -> str:
        options = [f"DATA_PATH {sql_text(self.data_path)}"]
        if read_only:
            options.append("READ_ONLY")
        target = f"ducklake:{self.catalog_kind}:{self.catalog}"
        return f"ATTACH {sql_text(target)} AS {alias} ({', '.join(options)})"

    def readable_locations(self) -> list[str]:
        """The local folders a read-only session must reach (the catalog file, data files)."""
        folders = [self.data_path] if self.s3 is None else []
        if self.catalog_kind == "sqlite":
            folders.append(str(Path(self.catalog).parent) + "/")
        return folders

    def extensions(self) -> list[str]:
        scanner = "sqlite_scanner" if self.catalog_kind == "sqlite" else "postgres_scanner"
        return ["ducklake", scanner, *(["httpfs"] if self.s3 else [])]


def is_transient_write_error(exc: BaseException) -> bool:
    """A commit another writer's commit or a busy catalog refused: worth running again."""
    if isinstance(exc, duckdb.TransactionException):
        return True
    text = str(exc).lower()
    return isinstance(exc, duckdb.Error) and (
        "database is locked" in text or "transaction conflict" in text
    )


class Lake:
    """The lake of one data directory (and the settings in the environment)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        lock_timeout: float = 900.0,
        settings: LakeSettings | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.lock_timeout = lock_timeout
        self.settings = settings or LakeSettings.from_env(self.data_dir)
        self._ready = False

    # -- connections -----------------------------------------------------------------------

    def attach(
        self, conn: duckdb.DuckDBPyConnection, alias: str = LAKE_ALIAS, read_only: bool = True
    ) -> None:
        """Attach the lake to an existing connection (e.g. a staging file's) as ``alias``."""
        settings = self.settings
        load_extensions(conn, *settings.extensions())
        if settings.s3 is not None:
            conn.execute(settings.s3.secret_statement())
        if settings.catalog_kind == "sqlite" and (not read_only or Path(settings.catalog).exists()):
            _use_write_ahead_log(Path(settings.catalog))
        if settings.s3 is None and not read_only:
            Path(settings.data_path).mkdir(parents=True, exist_ok=True)
        conn.execute(settings.attach_statement(alias, read_only))

    def connect(self, read_only: bool = False, shared: bool = True) -> duckdb.DuckDBPyConnection:
        """A new connection with the lake attached as ``lake`` and in use; no transaction.

        ``shared``: a connection to this process's DuckDB instance for the lake, which loaded
        the extensions and attached the lake once (loading them costs 0.2-0.5 s, more than most
        reads). Each connection still has its own transactions and reads the latest commit.
        Unshared: a DuckDB instance of its own, for a session that changes instance-wide
        settings (an analyst's locked-down session).
        """
        if not shared:
            return self._new_instance(read_only)
        key = (self.settings, read_only)
        with _SHARED_LOCK:
            instance = _SHARED_INSTANCES.get(key)
            if instance is None:
                instance = self._new_instance(read_only)
                _SHARED_INSTANCES[key] = instance
                while len(_SHARED_INSTANCES) > _SHARED_INSTANCES_KEPT:
                    # Dropped, not closed: a connection made from it may still be in use.
                    _SHARED_INSTANCES.popitem(last=False)
            _SHARED_INSTANCES.move_to_end(key)
            conn = instance.cursor()
        conn.execute(f"USE {LAKE_ALIAS}")
        conn.execute("SET TimeZone = 'UTC'")
        return conn

    def _new_instance(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        conn = offline_connection()
        try:
            self.attach(conn, LAKE_ALIAS, read_only)
            conn.execute(f"USE {LAKE_ALIAS}")
            # Day partitions and people's output are in UTC, whatever the machine's zone.
            conn.execute("SET TimeZone = 'UTC'")
            # An ASOF join is never run as a nested loop: DuckDB 1.5.5 chose one for 9,000
            # events against a day of sign-ins (placing a batch took 1.5 s instead of 0.1 s).
            conn.execute("SET GLOBAL asof_loop_join_threshold = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One all-or-nothing transaction on the lake, under the writer lock.

        The connection's default catalog is the lake, so unqualified names are its tables.
        """
        with self.writer_lock():
            conn = self.connect(read_only=False)
            attached_before = _attached(conn)
            try:
                conn.execute("BEGIN TRANSACTION")
                try:
                    self._ensure_schema(conn)
                    yield conn
                    # Requests live in the control store; each write refreshes their copy here.
                    mirror_import_requests(conn, ControlStore(self.data_dir))
                except BaseException:
                    with contextlib.suppress(duckdb.Error):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                self._ready = True
            finally:
                # Staging files the transaction attached (DuckDB refuses to detach them inside
                # it); attachments belong to the shared instance, not to this connection.
                for name in _attached(conn) - attached_before:
                    with contextlib.suppress(duckdb.Error):
                        conn.execute(f'DETACH "{name}"')
                conn.close()

    def retrying(self, attempts: int = 5) -> tenacity.Retrying:
        """Run a whole write again when another writer's commit or a busy catalog refused it:
        ``for attempt in lake.retrying(): with attempt, lake.write() as conn: ...``."""
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient_write_error),
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=5),
            before_sleep=lambda state: logger.warning(
                "the lake refused a write (%s); running it again (attempt %d)",
                state.outcome.exception() if state.outcome else "?",
                state.attempt_number + 1,
            ),
            reraise=True,
        )

    def _ensure_schema(self, conn: duckdb.DuckDBPyConnection) -> None:
        """Apply schema.sql when the lake's recorded schema version differs (DDL makes catalog
        snapshots, so it is not re-run on every write)."""
        if self._stored_schema_version(conn) == schema_version():
            return
        conn.execute(schema_sql())
        # zstd, not DuckLake's default snappy: the raw events compress to less than half.
        conn.execute(f"CALL {LAKE_ALIAS}.set_option('parquet_compression', 'zstd')")
        conn.execute("DELETE FROM _schema_state")
        conn.execute(
            "INSERT INTO _schema_state VALUES (?, now())",
            [schema_version()],
        )

    @staticmethod
    def _stored_schema_version(conn: duckdb.DuckDBPyConnection) -> str | None:
        exists = conn.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? "
            "AND table_name = '_schema_state'",
            [LAKE_ALIAS],
        ).fetchall()[0][0]
        if not exists:
            return None
        rows = conn.execute("SELECT schema_version FROM _schema_state").fetchall()
        return rows[0][0] if rows else None

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the lake's writer lock, waiting for it up to ``lock_timeout``."""
        if self.settings.catalog_kind == "postgres":
            with self._postgres_lock():
                yield
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / LOCK_FILE, "a+") as handle:
            self._wait(lambda: _try_flock(handle))
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _postgres_lock(self) -> Iterator[None]:
        try:
            import psycopg2  # comes with dagster-postgres: the scale-out extra
            import psycopg2.errors
        except ImportError:
            raise LakeConfigError(
                "a PostgreSQL catalog needs psycopg2: pip install 'groupsync[postgres]'"
            ) from None
        pg = psycopg2.connect(self.settings.catalog)
        try:
            pg.autocommit = True
            with pg.cursor() as cursor:
                # Waiting in PostgreSQL's lock queue (first come, first served), not polling:
                # a writer in a loop must not take the lock again ahead of one that waits.
                cursor.execute("SET lock_timeout = %s", [f"{int(self.lock_timeout * 1000)}ms"])
                try:
                    cursor.execute("SELECT pg_advisory_lock(%s)", [_PG_WRITER_LOCK_KEY])
                except psycopg2.errors.LockNotAvailable:
                    raise self._busy() from None
                try:
                    yield
                finally:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [_PG_WRITER_LOCK_KEY])
        finally:
            pg.close()  # ends the session, which releases the lock in any case

    def _wait(self, try_lock: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while not try_lock():
            if time.monotonic() > deadline:
                raise self._busy()
            time.sleep(0.05)

    def _busy(self) -> LakeBusyError:
        return LakeBusyError(
            f"another groupsync process held the lake's writer lock for more than "
            f"{self.lock_timeout:.0f} s ({self.settings.describe()})"
        )

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the lake has been created (its schema applied) yet."""
        return self._readable_version() is not None

    def ensure_ready(self) -> None:
        """Create the lake, or bring its schema up to date, if a reader would not find it."""
        if self._ready:
            return
        if self._readable_version() != schema_version():
            with self.write():
                pass
        self._ready = True

    def _readable_version(self) -> str | None:
        if self.settings.catalog_kind == "sqlite" and not Path(self.settings.catalog).exists():
            return None
        try:
            conn = self.connect(read_only=True)
        except duckdb.Error:
            return None
        try:
            return self._stored_schema_version(conn)
        finally:
            conn.close()

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection on the lake's latest snapshot; never waits for a writer."""
        self.ensure_ready()
        conn = self.connect(read_only=True)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def read_if_free(self) -> Iterator[duckdb.DuckDBPyConnection | None]:
        """A read-only connection, or None when the lake does not exist yet or its catalog is
        busy right now: for a caller that must never wait or create, such as a sensor tick."""
        if self._readable_version() is None:
            yield None
            return
        try:
            conn = self.connect(read_only=True)
        except duckdb.Error as exc:
            logger.info("the lake could not be read now (%s); trying again later", exc)
            yield None
            return
        try:
            yield conn
        finally:
            conn.close()

    def staging_path(self) -> Path:
        """A fresh private path for streaming a run's reads before they are merged: a DuckDB
        file, or the stem of a run's own staging files (``with_suffix``)."""
        folder = self.data_dir / STAGING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        day_ago = time.time() - 86400
        for old in folder.iterdir():  # left by runs that were killed
            with contextlib.suppress(OSError):  # another import may be removing its own
                if old.is_file() and old.stat().st_mtime < day_ago:
                    old.unlink()
        return folder / f"{uuid.uuid4().hex}.duckdb"


def attach_instructions(lake: Lake) -> str:
    """For people: where the lake is and the statements that attach it read-only."""
    settings = lake.settings
    loads = "\n".join(
        f"LOAD {sql_text(str(extension_path(name)))};" for name in settings.extensions()
    )
    secret = (
        "\n-- object storage: put your credentials in place of the dots\n"
        + settings.s3.secret_statement(credentials=False)
        + ";"
        if settings.s3 is not None
        else ""
    )
    return (
        f"{settings.describe()}\n\n"
        "From Python:\n"
        "    from groupsync_pipeline.storage.lake import Lake\n"
        f"    conn = Lake({str(lake.data_dir)!r}).connect(read_only=True)\n\n"
        f"From a DuckDB {duckdb.__version__} shell:\n"
        f"{loads}{secret}\n"
        f"{settings.attach_statement(LAKE_ALIAS, read_only=True)};\n"
        f"USE {LAKE_ALIAS};"
    )


def _attached(conn: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        row[0] for row in conn.execute("SELECT database_name FROM duckdb_databases()").fetchall()
    }


_WAL_CATALOGS: set[Path] = set()


def _use_write_ahead_log(catalog: Path) -> None:
    """Put a SQLite catalog in WAL mode (it stays so): readers then never block the writer's
    COMMIT, nor it them. In the default rollback mode, an analyst's open transaction made
    commits fail with "database is locked"."""
    if catalog in _WAL_CATALOGS:
        return
    catalog.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(catalog, timeout=30)) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:  # busy now: the next attach tries again
        logger.info("could not put %s in WAL mode yet (%s)", catalog, exc)
        return
    _WAL_CATALOGS.add(catalog)


def _try_flock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
