"""Dagster resources: the connections file and the lake. No connection opened at load."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from groupsync_pipeline.config import (
    ConfigError,
    Connection,
    data_dir,
    find_connection,
    load_connections,
)
from groupsync_pipeline.storage.control import ControlStore
from groupsync_pipeline.storage.lake import Lake


class ConnectionsResource(dg.ConfigurableResource):
    """Connected apps, from the file named by GROUPSYNC_CONNECTIONS (default: the sandbox)."""

    connections_file: str | None = Field(
        default=None,
        description="Path of the connections YAML; unset: $GROUPSYNC_CONNECTIONS, else the "
        "bundled sandbox tenant.",
    )

    def all(self) -> list[Connection]:
        try:
            return load_connections(self.connections_file)
        except ConfigError as exc:
            raise dg.Failure(description=str(exc)) from None

    def get(self, name: str) -> Connection:
        try:
            return find_connection(self.all(), name)
        except ConfigError as exc:
            raise dg.Failure(description=str(exc)) from None


class LakeResource(dg.ConfigurableResource):
    """The DuckDB files; writers are serialized by a file lock and the lake pool."""

    data_dir: str | None = Field(
        default=None,
        description="Directory of the DuckDB files; unset: $GROUPSYNC_DATA_DIR, "
        "else ./groupsync-data.",
    )

    def get(self) -> Lake:
        return Lake(data_dir(self.data_dir))

    def control(self) -> ControlStore:
        """Import requests, the email outbox and shrink confirmations (never locks DuckDB)."""
        return ControlStore(data_dir(self.data_dir))
