"""DuckDB extensions loaded from their PyPI wheels, never downloaded at run time.

The ``duckdb-extension-*`` wheels carry no Python module, only the extension file under their
package folder; their installed file lists say where it is.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata
from pathlib import Path

import duckdb

_DISTRIBUTIONS = {
    "ducklake": "duckdb-extension-ducklake",
    "sqlite_scanner": "duckdb-extension-sqlite-scanner",
    "postgres_scanner": "duckdb-extension-postgres-scanner",
    "httpfs": "duckdb-extension-httpfs",
}


class ExtensionMissingError(RuntimeError):
    """An extension's wheel is not installed (or not for this DuckDB)."""


@cache
def extension_path(name: str) -> Path:
    """The installed file of extension ``name`` for the running DuckDB version."""
    distribution = _DISTRIBUTIONS[name]
    wanted = f"v{duckdb.__version__}"
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        raise ExtensionMissingError(
            f"the DuckDB extension {name} is not installed: pip install "
            f"'{distribution}=={duckdb.__version__}'"
        ) from None
    for file in files:
        if file.name == f"{name}.duckdb_extension" and wanted in file.parts:
            return Path(str(file.locate())).resolve()
    raise ExtensionMissingError(
        f"{distribution} has no {name} extension for DuckDB {duckdb.__version__}: install "
        f"'{distribution}=={duckdb.__version__}'"
    )


def load_extensions(conn: duckdb.DuckDBPyConnection, *names: str) -> None:
    for name in names:
        path = str(extension_path(name)).replace("'", "''")
        conn.execute(f"LOAD '{path}'")


def offline_connection(database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that never installs or autoloads an extension from the network."""
    return duckdb.connect(
        database,
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
