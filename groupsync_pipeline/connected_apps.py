"""Open a connector for a configured connection, starting the embedded sandbox when asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from groupsync_pipeline.config import Connection
from groupsync_pipeline.connectors.base import Connector, ProgressCallback
from groupsync_pipeline.connectors.office365 import GraphConnector

EMBEDDED_SANDBOX_EVOLVE_SECONDS = 3600.0
# What the embedded sandbox's saved sync state belongs to. It listens on a new port in every
# run, but it is always the same tenant (fixed seed), so its address must not count.
EMBEDDED_SANDBOX_API_ROOT = "embedded sandbox tenant"


@contextmanager
def open_connector(
    connection: Connection,
    on_page: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[Connector]:
    """A connector for ``connection``; a sandbox connection gets a fresh embedded tenant.

    ``log`` gets the connector's notices, such as each wait before retrying a throttled call.
    """
    if connection.sandbox:
        # Imported here: the sandbox is only loaded when a sandbox connection is used.
        from groupsync_pipeline.sandbox.graph import GraphSandbox

        with (
            # One evolution step per hour since a fixed epoch: every process sees the same
            # tenant at the same time, and the hourly sync has changes to find.
            GraphSandbox(evolve_every=EMBEDDED_SANDBOX_EVOLVE_SECONDS) as sandbox,
            GraphConnector(**sandbox.connection_settings(), on_page=on_page, log=log) as connector,
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
        log=log,
        # Optional connection field; older configurations do not have it.
        publisher_identifier=connection.publisher_identifier,
    ) as connector:
        yield connector


def api_root(connection: Connection) -> str:
    """What identifies the API and tenant a connection's saved sync state belongs to.

    A saved delta link is only good for the API root and tenant it came from: when this
    changes (another host, port, path or tenant), the next sync must read everything again.
    Host and scheme are compared without regard to case, a default port is dropped.
    """
    if connection.sandbox:
        return EMBEDDED_SANDBOX_API_ROOT
    url = urlsplit(connection.graph_url.strip())
    host = (url.hostname or "").lower()
    port = f":{url.port}" if url.port not in (None, 443) else ""
    path = url.path.rstrip("/")
    return f"{url.scheme.lower()}://{host}{port}{path} tenant {connection.tenant_id.lower()}"
