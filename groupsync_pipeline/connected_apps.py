"""Open a connector for a configured connection, starting the embedded sandbox when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from groupsync_pipeline.config import Connection
from groupsync_pipeline.connectors.base import Connector, ProgressCallback
from groupsync_pipeline.connectors.office365 import GraphConnector

EMBEDDED_SANDBOX_EVOLVE_SECONDS = 3600.0


@contextmanager
def open_connector(
    connection: Connection, on_page: ProgressCallback | None = None
) -> Iterator[Connector]:
    """A connector for ``connection``; a sandbox connection gets a fresh embedded tenant."""
    if connection.sandbox:
        # Imported here: the sandbox is only loaded when a sandbox connection is used.
        from groupsync_pipeline.sandbox.graph import GraphSandbox

        with (
            # One evolution step per hour since a fixed epoch: every process sees the same
            # tenant at the same time, and the hourly sync has changes to find.
            GraphSandbox(evolve_every=EMBEDDED_SANDBOX_EVOLVE_SECONDS) as sandbox,
            GraphConnector(**sandbox.connection_settings(), on_page=on_page) as connector,
        ):
            yield connector
        return
    with GraphConnector(
        tenant_id=connection.tenant_id,
        client_id=connection.client_id,
        client_secret=connection.read_secret(),
        authority_host=connection.authority_host,
        graph_url=connection.graph_url,
        management_url=connection.management_url,
        ca_bundle=connection.ca_bundle,
        on_page=on_page,
    ) as connector:
        yield connector
