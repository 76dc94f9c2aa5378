"""``groupsync migrate``: bring a 0.x data directory (a DuckDB warehouse) into the lake.

DuckDB 1.5.5, which DuckLake needs, cannot open a warehouse file written by DuckDB 2.0.1, but
it reads that DuckDB's ``EXPORT DATABASE ... (FORMAT parquet)``: a folder with ``schema.sql``,
``load.sql`` and one Parquet file per table. :func:`migrate` checks the whole export first
(every table the lake has, every file readable, every column with a place in the lake), then
loads every table in ONE lake transaction, by column name: all of it or nothing.

Columns the lake added are filled: ``_activity_group_keys.occurred_on`` (the partition key of
tags) from the tagged activity's time. ``group_key`` values are kept, so tags keep pointing at
their groups.

Import requests live in the control store (``control.sqlite3``), not in the lake: the lake's
``import_requests`` is a copy each write refreshes. The previous data directory's control
store is brought along (copied into an empty one, else merged request by request) before the
lake transaction commits; the export's copy of the requests is used only to check that the
control store given is the right one.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from groupsync_pipeline.storage.activity_writes import remember_sign_in_names
from groupsync_pipeline.storage.control import CONTROL_FILE, ControlStore
from groupsync_pipeline.storage.extensions import offline_connection
from groupsync_pipeline.storage.lake import LAKE_ALIAS, Lake

# Tables of the lake that are not the previous release's: never in an export.
# Tables the lake added; _sign_in_names is derived from the activities after they are loaded.
LAKE_ONLY_TABLES = {"_schema_state", "_sign_in_names"}
# Refreshed from the control store by every lake write (storage/control.py).
MIRRORED_TABLES = {"import_requests"}
# Columns the lake added, and how to fill them from the export (SQL over the export's files:
# {table} is the table's rows, {activities} the activities').
DERIVED_COLUMNS: dict[tuple[str, str], str] = {
    ("_activity_group_keys", "occurred_on"): "(a.occurred_at AT TIME ZONE 'UTC')::DATE",
}
# Load order: groups and activities before what refers to them (only for reading the log).
_FIRST = ("connected_apps", "user_groups", "accounts", "group_memberships", "activities")
_COPY = re.compile(r"^\s*COPY\s+(?P<table>.+?)\s+FROM\s+'(?P<path>(?:[^']|'')*)'", re.I)
_CREATE_TABLE = re.compile(r"CREATE\s+TABLE\s+(?P<table>[^\s(]+)\s*\(", re.I)
_CONTROL_TABLES = ("import_requests", "email_outbox", "shrink_confirmations")

EXPORT_HINT = (
    "export the previous release's warehouse with the DuckDB that wrote it (README: Upgrading "
    "from 0.x): EXPORT DATABASE 'EXPORT_DIR' (FORMAT parquet)"
)


class MigrationError(Exception):
    """The export or the target cannot be migrated; nothing was changed. Says why."""


@dataclass(frozen=True)
class ExportTable:
    name: str
    path: Path
    rows: int
    columns: tuple[str, ...]


@dataclass
class MigrationReport:
    tables: dict[str, int] = field(default_factory=dict)  # rows loaded per table
    control: str = ""  # what happened to the control store
    seconds: float = 0.0


def _unquote(identifier: str) -> str:
    """The last part of a possibly qualified, possibly quoted name."""
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', identifier.strip())
    quoted, plain = parts[-1]
    return quoted.replace('""', '"') if quoted else plain


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read_export(export_dir: Path) -> dict[str, ExportTable]:
    """Every table of an EXPORT DATABASE folder, its file checked readable; else an error."""
    if not export_dir.is_dir():
        raise MigrationError(f"{export_dir}: no such folder; {EXPORT_HINT}")
    load_sql = export_dir / "load.sql"
    schema_file = export_dir / "schema.sql"
    for needed in (schema_file, load_sql):
        if not needed.is_file():
            raise MigrationError(
                f"{export_dir} is not a complete DuckDB export: {needed.name} is missing; "
                f"{EXPORT_HINT}"
            )
    created = {_unquote(m["table"]) for m in _CREATE_TABLE.finditer(schema_file.read_text())}
    files: dict[str, Path] = {}
    for line in load_sql.read_text().splitlines():
        match = _COPY.match(line)
        if match:
            # The folder may have moved since the export: files are looked up beside load.sql.
            name = Path(match["path"].replace("''", "'")).name
            files[_unquote(match["table"])] = export_dir / name
    unloaded = sorted(created - set(files))
    if unloaded:
        raise MigrationError(
            f"{export_dir} is not a complete DuckDB export: load.sql loads no data for "
            f"{', '.join(unloaded)}; {EXPORT_HINT}"
        )
    tables: dict[str, ExportTable] = {}
    with closing(offline_connection()) as conn:
        for name, path in sorted(files.items()):
            if not path.is_file():
                raise MigrationError(
                    f"the export is incomplete: {path} (table {name}) is missing; {EXPORT_HINT}"
                )
            try:
                rows = conn.execute(
                    "SELECT coalesce(sum(num_rows), 0) FROM parquet_file_metadata($p)",
                    {"p": str(path)},
                ).fetchall()[0][0]
                columns = tuple(
                    row[0]
                    for row in conn.execute(
                        "DESCRIBE SELECT * FROM read_parquet($p)", {"p": str(path)}
                    ).fetchall()
                )
            except duckdb.Error as exc:
                raise MigrationError(
                    f"the export is damaged: {path} (table {name}) cannot be read: "
                    f"{str(exc).splitlines()[0]}"
                ) from None
            tables[name] = ExportTable(name, path, int(rows), columns)
    return tables


@dataclass(frozen=True)
class _LakeTable:
    name: str
    columns: dict[str, bool]  # name -> nullable


def _lake_tables(conn: duckdb.DuckDBPyConnection) -> dict[str, _LakeTable]:
    rows = conn.execute(
        "SELECT table_name, column_name, is_nullable FROM duckdb_columns() "
        "WHERE database_name = $db AND schema_name = 'main' "
        "AND table_name IN (SELECT table_name FROM duckdb_tables() WHERE database_name = $db) "
        "ORDER BY table_name, column_index",
        {"db": LAKE_ALIAS},
    ).fetchall()
    tables: dict[str, _LakeTable] = {}
    for table, column, nullable in rows:
        tables.setdefault(table, _LakeTable(table, {})).columns[column] = bool(nullable)
    return tables


def _check_fit(export: dict[str, ExportTable], lake: dict[str, _LakeTable]) -> list[str]:
    """The tables to load, in order; an error if any data would have no place."""
    wanted = set(lake) - LAKE_ONLY_TABLES
    missing = sorted(wanted - set(export))
    if missing:
        raise MigrationError(
            f"the export is incomplete: it has no table {', '.join(missing)}; {EXPORT_HINT}"
        )
    unknown = sorted(set(export) - wanted)
    if unknown:
        raise MigrationError(
            f"the export has tables this release does not know ({', '.join(unknown)}): "
            "was it made from a groupsync warehouse of release 0.x?"
        )
    for name in sorted(wanted):
        source, target = export[name], lake[name]
        extra = [c for c in source.columns if c not in target.columns]
        if extra:
            raise MigrationError(
                f"table {name} of the export has columns the lake does not: "
                f"{', '.join(extra)}; they would be lost"
            )
        for column, nullable in target.columns.items():
            if column in source.columns or (name, column) in DERIVED_COLUMNS or nullable:
                continue
            raise MigrationError(
                f"table {name} of the export lacks the column {column}, which the lake needs"
            )
    return [t for t in _FIRST if t in wanted] + sorted(wanted - set(_FIRST))


def _holds_data(conn: duckdb.DuckDBPyConnection, tables: list[str]) -> list[str]:
    return [
        name
        for name in tables
        if name not in MIRRORED_TABLES
        and conn.execute(f"SELECT count(*) FROM {_ident(name)}").fetchall()[0][0]
    ]


def _load_table(
    conn: duckdb.DuckDBPyConnection,
    table: ExportTable,
    lake_table: _LakeTable,
    export: dict[str, ExportTable],
) -> int:
    columns = [c for c in lake_table.columns if c in table.columns]
    derived = [c for c in lake_table.columns if (table.name, c) in DERIVED_COLUMNS]
    target = ", ".join(_ident(c) for c in [*columns, *derived])
    chosen = ", ".join(f"t.{_ident(c)}" for c in columns)
    params: dict[str, str] = {"path": str(table.path)}
    if derived:
        expressions = ", ".join(DERIVED_COLUMNS[(table.name, c)] for c in derived)
        params["activities"] = str(export["activities"].path)
        sql = (
            f"INSERT INTO {_ident(table.name)} ({target}) "
            f"SELECT {chosen}, {expressions} FROM read_parquet($path) AS t "
            "LEFT JOIN read_parquet($activities) AS a ON a.activity_id = t.activity_id"
        )
        orphans = conn.execute(
            "SELECT count(*) FROM read_parquet($path) AS t WHERE NOT EXISTS "
            "(SELECT 1 FROM read_parquet($activities) AS a WHERE a.activity_id = t.activity_id)",
            params,
        ).fetchall()[0][0]
        if orphans:
            raise MigrationError(
                f"table {table.name} of the export has {orphans} rows for activities the "
                "export does not hold: their day (the partition) is unknown"
            )
    else:
        sql = (
            f"INSERT INTO {_ident(table.name)} ({target}) "
            f"SELECT {chosen} FROM read_parquet($path) AS t"
        )
    loaded = int(conn.execute(sql, params).fetchall()[0][0])
    if loaded != table.rows:
        raise MigrationError(
            f"table {table.name}: {loaded} rows loaded but the export holds {table.rows}"
        )
    return loaded


# -- the control store -----------------------------------------------------------------------


@dataclass
class _ControlPlan:
    source: Path | None  # the previous control store, upgraded copy in a scratch folder
    scratch: Path | None
    target: ControlStore
    copy_whole: bool  # the target is absent or empty: the source replaces it
    new_requests: int
    description: str


def _export_request_keys(table: ExportTable) -> set[str]:
    with closing(offline_connection()) as conn:
        rows = conn.execute(
            "SELECT request_key FROM read_parquet($p) WHERE request_key IS NOT NULL",
            {"p": str(table.path)},
        ).fetchall()
    return {row[0] for row in rows}


def _read_only(path: Path) -> sqlite3.Connection:
    # as_uri() escapes the characters a URI gives a meaning to ('?', '#', '%').
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)


def _control_contents(path: Path) -> tuple[dict[str, int], int]:
    """Request key -> id, and the number of rows in every control table."""
    with closing(_read_only(path)) as conn:
        present = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        keys = dict(conn.execute("SELECT request_key, request_id FROM import_requests"))
        rows = sum(
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in _CONTROL_TABLES
            if table in present
        )
    return keys, rows


def _plan_control(
    data_dir: Path, export_dir: Path, control: Path | None, export_keys: set[str]
) -> _ControlPlan:
    target = ControlStore(data_dir)
    source = control if control is not None else export_dir / CONTROL_FILE
    if control is None and not source.exists():
        source = None
    if source is not None:
        if not source.is_file():
            raise MigrationError(f"{source}: no such control store (control.sqlite3)")
        if target.path.exists() and source.resolve() == target.path.resolve():
            source = None  # an upgrade in place: the control store is where it belongs
    target_keys: dict[str, int] = {}
    target_rows = 0
    if target.path.exists():
        target.active_count()  # brings an older file's schema up to date
        target_keys, target_rows = _control_contents(target.path)
    if source is None:
        lost = export_keys - set(target_keys)
        if lost:
            raise MigrationError(
                f"the export holds {len(lost)} import requests that no control store here "
                f"has: give the previous data directory's {CONTROL_FILE} with --control "
                "(it also holds the email outbox and shrink confirmations)"
            )
        kept = "control store kept as it is" if target.path.exists() else "no control store"
        return _ControlPlan(None, None, target, False, 0, kept)
    # A private, upgraded copy: the source (the old data directory's file) is never written.
    scratch = data_dir / f".migrate-control-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    try:
        with (
            closing(_read_only(source)) as old,
            closing(sqlite3.connect(scratch / CONTROL_FILE)) as new,
        ):
            old.backup(new)
        copy = ControlStore(scratch)
        copy.active_count()
        source_keys, _ = _control_contents(copy.path)
    except sqlite3.Error as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise MigrationError(f"{source}: not a readable groupsync control store ({exc})") from None
    lost = export_keys - set(source_keys) - set(target_keys)
    if lost:
        shutil.rmtree(scratch, ignore_errors=True)
        raise MigrationError(
            f"{source} lacks {len(lost)} import requests the export holds: is it the same "
            "data directory's control store?"
        )
    new = {key: rid for key, rid in source_keys.items() if key not in target_keys}
    taken = sorted(rid for rid in new.values() if rid in set(target_keys.values()))
    if taken:
        shutil.rmtree(scratch, ignore_errors=True)
        raise MigrationError(
            f"the control store of {data_dir} already numbers other requests "
            f"{', '.join(map(str, taken[:10]))}: migrate into a new data directory"
        )
    copy_whole = target_rows == 0
    how = "copied" if copy_whole else f"merged ({len(new)} new requests)"
    return _ControlPlan(
        copy.path, scratch, target, copy_whole, len(new), f"control store {how} from {source}"
    )


def _apply_control(plan: _ControlPlan) -> None:
    if plan.source is None:
        return
    plan.target.path.parent.mkdir(parents=True, exist_ok=True)
    if plan.copy_whole:
        with (
            closing(sqlite3.connect(plan.source)) as src,
            closing(sqlite3.connect(plan.target.path)) as dst,
        ):
            src.backup(dst)
        return
    with closing(sqlite3.connect(plan.target.path, isolation_level=None, timeout=30)) as conn:
        conn.execute("ATTACH DATABASE ? AS old", [str(plan.source)])
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, condition in (
                (
                    "import_requests",
                    "request_key NOT IN (SELECT request_key FROM main.import_requests)",
                ),
                (
                    "email_outbox",
                    "request_id NOT IN (SELECT request_id FROM main.email_outbox)",
                ),
            ):
                columns = ", ".join(
                    f'"{row[1]}"' for row in conn.execute(f"PRAGMA main.table_info({table})")
                )
                conn.execute(
                    f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM old.{table} "
                    f"WHERE {condition}"
                )
            conn.execute(
                "INSERT INTO main.shrink_confirmations SELECT * FROM old.shrink_confirmations "
                "EXCEPT SELECT * FROM main.shrink_confirmations"
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


@contextmanager
def _scratch_removed(plan: _ControlPlan) -> Iterator[None]:
    try:
        yield
    finally:
        if plan.scratch is not None:
            shutil.rmtree(plan.scratch, ignore_errors=True)


# -- the whole migration ---------------------------------------------------------------------


def migrate(
    lake: Lake,
    export_dir: Path,
    *,
    control: Path | None = None,
    replace: bool = False,
    progress: Callable[[str], None] = print,
) -> MigrationReport:
    """Load an EXPORT DATABASE folder of a 0.x warehouse (and its control store) into ``lake``.

    Refuses a lake that holds data already unless ``replace`` (then its rows are deleted in the
    same transaction). Any error leaves the lake and the control store as they were.
    """
    started = time.monotonic()
    export = read_export(export_dir)
    progress(
        f"export {export_dir}: {len(export)} tables, {sum(t.rows for t in export.values()):,} rows"
    )
    lake.ensure_ready()
    with closing(lake.connect(read_only=True)) as conn:
        lake_tables = _lake_tables(conn)
        order = _check_fit(export, lake_tables)
        holding = _holds_data(conn, order)
    if holding and not replace:
        named = ", ".join(holding[:4]) + (", ..." if len(holding) > 4 else "")
        raise MigrationError(
            f"the lake ({lake.settings.describe()}) already holds data (tables {named}): "
            "nothing was changed. Migrate into a new data directory, or pass --replace to "
            "replace what it holds"
        )
    export_keys = _export_request_keys(export["import_requests"])
    plan = _plan_control(lake.data_dir, export_dir, control, export_keys)
    report = MigrationReport()
    with _scratch_removed(plan), lake.write() as conn:
        for name in order:
            if replace:
                conn.execute(f"DELETE FROM {_ident(name)}")
            if name in MIRRORED_TABLES:
                continue
            table_started = time.monotonic()
            loaded = _load_table(conn, export[name], lake_tables[name], export)
            report.tables[name] = loaded
            progress(f"  {name}: {loaded:,} rows ({time.monotonic() - table_started:.1f} s)")
        if replace:
            conn.execute("DELETE FROM _sign_in_names")
        remember_sign_in_names(conn, "activities")
        # Last, so an error above leaves the control store untouched; the lake's
        # import_requests is refreshed from it as this transaction commits.
        _apply_control(plan)
    report.control = plan.description
    with lake.read() as conn:
        requests = conn.execute("SELECT count(*) FROM import_requests").fetchall()[0][0]
    report.tables["import_requests"] = int(requests)
    progress(f"  import_requests: {requests:,} rows ({plan.description})")
    report.seconds = time.monotonic() - started
    progress(
        f"migrated {sum(report.tables.values()):,} rows in {report.seconds:.1f} s into "
        f"{lake.settings.describe()}"
    )
    return report
