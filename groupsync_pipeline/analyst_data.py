"""The analysts' data: what people query (`groupsync sql`, `activities`, `alerts`, `groups`).

Today it is the published snapshot ``groupsync.duckdb`` (see storage/warehouse.py): a copy the
pipeline swaps in by atomic rename after each commit, so a reader never blocks a writer.
Everything that reads it for people goes through ``open_analyst_data``: when the storage
changes, this one function changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from groupsync_pipeline.storage.warehouse import Warehouse


class AnalystDataError(Exception):
    """The analysts' data cannot be read as asked; the message says why and what to do."""


class NoDataError(AnalystDataError):
    """Nothing to read yet: no published data, or it lacks the table asked for."""


def analyst_data_path(data_dir: Path) -> Path:
    """Where the analysts' data lives (for messages: people are told what they read)."""
    return Warehouse(data_dir).published_path


@contextmanager
def open_analyst_data(
    data_dir: Path, require_table: str | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only DuckDB session on the analysts' data, closed at the end of the block.

    Read-only in every sense: the database is opened read-only, and the session can reach no
    other file (no ATTACH, COPY TO, file readers or extension installs), so a query typed by
    a person can neither change the data nor lock the pipeline's private warehouse. Times are
    shown in UTC, like the data.
    """
    path = analyst_data_path(data_dir)
    if not path.exists():
        raise NoDataError(
            f"no data yet: {path} does not exist (nothing has been imported into this data "
            "directory; check --data-dir or $GROUPSYNC_DATA_DIR)"
        )
    try:
        conn = duckdb.connect(str(path), read_only=True)
    except (duckdb.IOException, duckdb.ConnectionException) as exc:
        # A session holding the snapshot read-write (e.g. `duckdb groupsync.duckdb`) makes
        # DuckDB refuse every other opener, read-only ones included.
        raise AnalystDataError(
            f"cannot open {path} read-only ({exc}). A session that holds it read-write blocks "
            "every reader: close it, or reopen it with `duckdb -readonly`"
        ) from None
    try:
        conn.execute("SET TimeZone = 'UTC'")
        # Cannot be turned back on in this session (DuckDB refuses it while running).
        conn.execute("SET enable_external_access = false")
        # Nor can anything else be set: a query must not turn on logging or profiling to a
        # file, which would break the session (and abort the process when it closes).
        conn.execute("SET lock_configuration = true")
        if require_table is not None:
            present = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $table",
                {"table": require_table},
            ).fetchall()[0][0]
            if not present:
                raise NoDataError(
                    f"no {require_table} yet: {path} has no {require_table} table (the "
                    "pipeline that writes it has not run against this data directory)"
                )
        yield conn
    finally:
        conn.close()
