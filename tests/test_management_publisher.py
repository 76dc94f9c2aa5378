"""Every Office 365 Management Activity API request carries a PublisherIdentifier.

Microsoft's reference asks for it on every request ("Make sure this parameter is specified in
all issued requests to get a dedicated quota"): throttling is counted per publisher, and
requests without it share one quota. The sandbox records it and, here, refuses requests
without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl

import dagster as dg
import pytest

from groupsync_pipeline.sandbox.graph import GraphSandbox
from tests.conftest import SECRET_ENV, make_connector, write_connections
from tests.pipeline_helpers import failure_message, query, run_job

VENDOR_PUBLISHER = "46b472a7-c68e-4adf-8ade-3db49497518e"  # the reference's example


@pytest.fixture
def tenant() -> Iterator[GraphSandbox]:
    # No synthetic traffic, blobs every 2 s, 2 blobs per listing page: NextPageUri is used.
    with GraphSandbox(
        activity_rate=0, management_slot_seconds=2, management_page_size=2
    ) as sandbox:
        sandbox.management.require_publisher_identifier = True
        yield sandbox


def file_events(tenant: GraphSandbox, count: int) -> list[str]:
    user = next(iter(tenant.org.users.values()))
    start = datetime.now(UTC) - timedelta(hours=2)
    return [
        tenant.activity.add_file_event(user.user_principal_name, start + timedelta(minutes=7 * i))
        for i in range(count)
    ]


def management_queries(tenant: GraphSandbox) -> list[list[tuple[str, str]]]:
    return [
        parse_qsl(r.query, keep_blank_values=True)
        for r in tenant.requests
        if r.path.startswith("/office-management/")
    ]


@pytest.mark.parametrize("configured", [None, VENDOR_PUBLISHER])
def test_every_management_request_names_the_publisher(
    tenant: GraphSandbox, configured: str | None
) -> None:
    injected = file_events(tenant, 6)
    end = datetime.now(UTC)
    with make_connector(tenant, publisher_identifier=configured) as graph:
        pages = list(graph.activities("Audit.SharePoint", end - timedelta(hours=3), end))
    assert sorted(a.event_id for page in pages for a in page) == sorted(injected)
    expected = configured or tenant.tenant_id
    recorded = tenant.management.publisher_identifiers
    operations = {operation for operation, _ in recorded}
    assert {"subscriptions/start", "subscriptions/content", "content blob"} <= operations
    assert all(publisher == expected for _, publisher in recorded)
    assert any("nextPage" in dict(q) for q in management_queries(tenant))  # a NextPageUri
    for pairs in management_queries(tenant):  # once each, also on links the API gave
        assert [v for k, v in pairs if k.lower() == "publisheridentifier"] == [expected]


def test_the_activity_pipeline_sends_it(
    tenant: GraphSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, tenant.client_secret)
    monkeypatch.setenv("GROUPSYNC_ACTIVITY_BACKFILL_HOURS", "3")
    monkeypatch.delenv("GROUPSYNC_POLICIES", raising=False)
    monkeypatch.delenv("GROUPSYNC_SMTP_HOST", raising=False)
    injected = file_events(tenant, 3)
    connections = write_connections(tmp_path / "connections.yaml", tenant)
    data = tmp_path / "data"
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_job(instance, "ingest_activities", {}, connections, data)
    assert result.success, failure_message(result)
    stored = query(data, "SELECT event_id FROM activities WHERE source = 'Audit.SharePoint'")
    assert sorted(row[0] for row in stored) == sorted(injected)
    assert {p for _, p in tenant.management.publisher_identifiers} == {tenant.tenant_id}


def test_publisher_identifier_is_read_from_the_connections_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from groupsync_pipeline.config import ConfigError, load_connections

    monkeypatch.setenv("SECRET_FOR_PUBLISHER_TEST", "s")
    entry = (
        "connections:\n  - name: c\n    app: office365\n    tenant_id: t-1\n"
        "    client_id: c-1\n    client_secret_env: SECRET_FOR_PUBLISHER_TEST\n"
    )
    path = tmp_path / "connections.yaml"
    path.write_text(entry)
    assert load_connections(path)[0].publisher_identifier is None
    path.write_text(entry + "    publisher_identifier: 46b472a7-0000-4000-8000-000000000001\n")
    assert load_connections(path)[0].publisher_identifier == "46b472a7-0000-4000-8000-000000000001"
    path.write_text(entry + "    publisher_identifier: 'x&PublisherIdentifier=y'\n")
    with pytest.raises(ConfigError, match="connection 'c': field 'publisher_identifier'"):
        load_connections(path)
