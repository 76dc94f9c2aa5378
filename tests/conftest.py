"""Shared fixtures: a real sandbox tenant on loopback, connection files, data directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from groupsync_pipeline.config import Connection, load_connections
from groupsync_pipeline.connectors.office365 import GraphConnector
from groupsync_pipeline.sandbox.graph import GraphSandbox

# Hooks that make any skip fail the run under GROUPSYNC_FAIL_ON_SKIP=1 (CI).
from .skip_guard import (  # noqa: F401
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

SECRET_ENV = "GROUPSYNC_TEST_CLIENT_SECRET"
# Vendors' documented examples, copied into the repository (each keeps its `_source`): the
# contract tests read them here, never from outside the repository.
VENDOR_EXAMPLES = Path(__file__).resolve().parent / "data" / "vendor"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[GraphSandbox]:
    with GraphSandbox() as tenant:
        yield tenant


@pytest.fixture(autouse=True)
def _clean_sandbox(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sandbox" in request.fixturenames:
        tenant: GraphSandbox = request.getfixturevalue("sandbox")
        tenant.faults.clear()
        tenant.permissions.add("GroupMember.Read.All")


def make_connector(tenant: GraphSandbox, **overrides: object) -> GraphConnector:
    options: dict[str, object] = {
        **tenant.connection_settings(),
        "backoff_initial": 0.05,
        "timeout": 5.0,
    }
    options.update(overrides)
    return GraphConnector(**options)  # type: ignore[arg-type]


@pytest.fixture
def connector(sandbox: GraphSandbox) -> Iterator[GraphConnector]:
    with make_connector(sandbox) as graph:
        yield graph


def connection_entry(tenant: GraphSandbox, name: str = "contoso", **overrides: str) -> dict:
    """One connections-file entry for the sandbox tenant (the secret by variable name)."""
    return {
        "name": name,
        "app": "office365",
        "tenant_id": tenant.tenant_id,
        "client_id": tenant.client_id,
        "client_secret_env": SECRET_ENV,
        "authority_host": tenant.authority_host,
        "graph_url": tenant.graph_url,
        "management_url": tenant.management_url,
        "ca_bundle": tenant.ca_bundle,
        **overrides,
    }


def write_connections(path: Path, tenant: GraphSandbox, name: str = "contoso") -> Path:
    path.write_text(yaml.safe_dump({"connections": [connection_entry(tenant, name)]}))
    return path


@pytest.fixture
def connections_file(
    tmp_path: Path, sandbox: GraphSandbox, monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv(SECRET_ENV, sandbox.client_secret)
    return write_connections(tmp_path / "connections.yaml", sandbox)


@pytest.fixture
def connection(connections_file: Path) -> Connection:
    return load_connections(connections_file)[0]
