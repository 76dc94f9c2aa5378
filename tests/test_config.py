"""The connections file: every mistake is one clear message naming file, connection, field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from groupsync_pipeline.config import (
    ConfigError,
    check_email_address,
    data_dir,
    find_connection,
    load_connections,
)

GOOD = {
    "name": "contoso",
    "app": "office365",
    "tenant_id": "00000000-0000-0000-0000-000000000001",
    "client_id": "00000000-0000-0000-0000-000000000002",
    "client_secret_env": "CONTOSO_SECRET",
}


def write(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "connections.yaml"
    path.write_text(yaml.safe_dump({"connections": list(entries)}))
    return path


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTOSO_SECRET", "s3cr3t-value")
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)


def test_good_file_gives_public_cloud_defaults(tmp_path: Path) -> None:
    (connection,) = load_connections(write(tmp_path, GOOD))
    assert connection.authority_host == "https://login.microsoftonline.com"
    assert connection.graph_url == "https://graph.microsoft.com/v1.0"
    assert connection.read_secret() == "s3cr3t-value"
    assert "s3cr3t" not in repr(connection)


def test_without_a_file_the_bundled_sandbox_is_used() -> None:
    (connection,) = load_connections()
    assert connection.sandbox and connection.name == "sandbox" and connection.app == "office365"


def test_environment_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GROUPSYNC_CONNECTIONS", str(write(tmp_path, GOOD)))
    assert [c.name for c in load_connections()] == ["contoso"]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"app": "myspace"}, "app", "unknown app 'myspace'"),
        ({"app": "box"}, "app", "not supported yet"),
        ({"tenant_id": None}, "tenant_id", "missing"),
        ({"client_secret_env": "NOT_SET_ANYWHERE"}, "client_secret_env", "is not set"),
        ({"graph_url": "http://graph.example"}, "graph_url", "https://"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "ca_bundle", "file not found"),
        ({"tenant_id": 42}, "tenant_id", "non-empty string"),
        ({"sandbox": "yes"}, "sandbox", "true or false"),
        ({"authority_host": "https://"}, "authority_host", "with a host"),
        ({"graph_url": "https://graph.example/v1.0?x=1"}, "graph_url", "no query"),
        ({"management_url": "http://manage.example"}, "management_url", "https://"),
        ({"management_url": ""}, "management_url", "non-empty string"),
        ({"tenant_id": "contoso/../evil"}, "tenant_id", "use the id"),
        ({"client_id": "id with spaces"}, "client_id", "use the id"),
    ],
)
def test_bad_field_names_file_connection_and_field(
    tmp_path: Path, change: dict, field: str, words: str
) -> None:
    entry = {**GOOD, **change}
    entry = {k: v for k, v in entry.items() if v is not None}
    path = write(tmp_path, entry)
    with pytest.raises(ConfigError) as raised:
        load_connections(path)
    message = str(raised.value)
    assert str(path) in message
    assert "connection 'contoso'" in message
    assert f"field '{field}'" in message
    assert words in message
    assert "s3cr3t" not in message


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="connection 'contoso': field 'name': duplicate"):
        load_connections(write(tmp_path, GOOD, GOOD))


def test_missing_name_is_reported_by_position(tmp_path: Path) -> None:
    entry = {k: v for k, v in GOOD.items() if k != "name"}
    with pytest.raises(ConfigError, match=r"connection #1: field 'name': missing"):
        load_connections(write(tmp_path, entry))


def test_names_are_plain_ascii(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="field 'name': use ASCII letters"):
        load_connections(write(tmp_path, {**GOOD, "name": "cöntoso"}))


def test_sandbox_connection_takes_no_urls(tmp_path: Path) -> None:
    entry = {"name": "demo", "app": "office365", "sandbox": True, "graph_url": "https://x"}
    with pytest.raises(ConfigError, match="field 'graph_url': not allowed with 'sandbox: true'"):
        load_connections(write(tmp_path, entry))


@pytest.mark.parametrize("text", ["connections: [", "just a string", "connections: []", "{}"])
def test_malformed_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "connections.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load_connections(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read connections file"):
        load_connections(tmp_path / "nope.yaml")


def test_unknown_connection_lists_configured(tmp_path: Path) -> None:
    connections = load_connections(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"unknown connection 'fabrikam' \(configured: contoso\)"):
        find_connection(connections, "fabrikam")


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("GROUPSYNC_DATA_DIR")
    assert data_dir().name == "groupsync-data"


@pytest.mark.parametrize("address", ["hr-lead@contoso.com", " a.b+c@sub.example.org "])
def test_good_email_addresses(address: str) -> None:
    assert check_email_address(address) == address.strip()


@pytest.mark.parametrize(
    "address",
    ["nobody", "a@b", "Name <a@b.com>", "a@b.com\r\nBcc: x@evil.com", "a@b.com, c@d.com", ""],
)
def test_bad_email_addresses(address: str) -> None:
    with pytest.raises(ConfigError, match="not a valid email address"):
        check_email_address(address)
