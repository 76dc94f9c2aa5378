"""The analysts' data: what people query (`groupsync sql`, `activities`, `alerts`, `groups`).

It is the lake (storage/lake.py) opened read-only: DuckLake gives the session the snapshot
that was current when it opened, so a reader never blocks a run and never sees half of one.
Everything that reads it for people goes through ``open_analyst_data``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from groupsync_pipeline.storage.lake import Lake, LakeConfigError


class AnalystDataError(Exception):
    """The analysts' data cannot be read as asked; the message says why and what to do."""


class NoDataError(AnalystDataError):
    """Nothing to read yet: no lake, or it lacks the table asked for."""


def analyst_data_path(data_dir: Path) -> str:
    """Where the analysts' data lives (for messages: people are told what they read)."""
    return Lake(data_dir).settings.describe()


@contextmanager
def open_analyst_data(
    data_dir: Path, require_table: str | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only DuckDB session on the analysts' data, closed at the end of the block.

    Read-only in every sense: the lake is attached read-only, and the session can reach no
    other file (no ATTACH, COPY TO, file readers or extension installs; only the lake's own
    files), so a query typed by a person can neither change the data nor reach elsewhere.
    Times are shown in UTC, like the data.
    """
    try:
        lake = Lake(data_dir)
    except LakeConfigError as exc:
        raise AnalystDataError(str(exc)) from None
    if not lake.exists():
        raise NoDataError(
            f"no data yet: {lake.settings.describe()} does not exist (nothing has been "
            "imported into this data directory; check --data-dir or $GROUPSYNC_DATA_DIR)"
        )
    try:
        conn = lake.connect(read_only=True, shared=False)  # its settings get locked down
    except duckdb.Error as exc:
        raise AnalystDataError(
            f"cannot open {lake.settings.describe()} read-only ({exc})"
        ) from None
    try:
        conn.execute("SET TimeZone = 'UTC'")
        # Only the lake's own files stay reachable; nothing else can be turned back on
        # (DuckDB refuses it while running).
        conn.execute("SET allowed_directories = ?", [lake.settings.readable_locations()])
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
                    f"no {require_table} yet: the lake has no {require_table} table (the "
                    "pipeline that writes it has not run against this data directory)"
                )
        yield conn
    finally:
        conn.close()
