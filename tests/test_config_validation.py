"""The connections file refuses, with one message naming file, connection and field, what used
to be taken silently or to fail only at run time: duplicate keys, a ca_bundle that is not a PEM
certificate, a management_url that is the Graph root, hostile characters in a field."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main
from groupsync_pipeline.config import ConfigError, load_connections
from groupsync_pipeline.sandbox.tls import make_self_signed

HEAD = """connections:
  - name: contoso
    app: office365
    tenant_id: 00000000-0000-0000-0000-000000000001
    client_id: 00000000-0000-0000-0000-000000000002
    client_secret_env: CONTOSO_SECRET
"""


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTOSO_SECRET", "s3cr3t-value")
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "connections.yaml"
    path.write_text(text)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_connections(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert "s3cr3t" not in message
    return message


def test_duplicate_field_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEAD
        + "    graph_url: https://graph.microsoft.us/v1.0\n"
        + "    graph_url: https://graph.evil.example/v1.0\n",
    )
    message = refused(path)
    assert "connection 'contoso'" in message and "field 'graph_url'" in message
    assert "given twice (lines 7 and 8)" in message


def test_duplicate_top_level_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + "connections:\n  - name: other\n    app: office365\n")
    assert "line 7: key 'connections' given twice" in refused(path)


def test_ca_bundle_must_be_a_pem_certificate(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    message = refused(write(tmp_path, HEAD + f"    ca_bundle: {not_pem}\n"))
    assert "connection 'contoso'" in message and "field 'ca_bundle'" in message
    assert "not a PEM certificate" in message

    # A private key alone is not a certificate either.
    cert, key = make_self_signed(tmp_path / "tls")
    message = refused(write(tmp_path, HEAD + f"    ca_bundle: {key}\n"))
    assert "field 'ca_bundle'" in message and "not a PEM certificate" in message

    (connection,) = load_connections(write(tmp_path, HEAD + f"    ca_bundle: {cert}\n"))
    assert connection.ca_bundle == str(cert)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ("    management_url: https://graph.microsoft.com\n", "management_url"),
        ("    management_url: https://GRAPH.microsoft.com:443/\n", "management_url"),
        ("    management_url: https://graph.microsoft.com/v1.0\n", "management_url"),
        (
            "    graph_url: https://graph.microsoft.us/v1.0\n"
            "    management_url: https://graph.microsoft.us\n",
            "management_url",
        ),
        ("    graph_url: https://manage.office.com/v1.0\n", "graph_url"),  # the default clashes
    ],
)
def test_management_url_must_not_be_the_graph_root(tmp_path: Path, fields: str, field: str) -> None:
    message = refused(write(tmp_path, HEAD + fields))
    assert "connection 'contoso'" in message and f"field '{field}'" in message
    assert "Graph" in message


def test_management_api_beside_graph_on_one_host_is_fine(tmp_path: Path) -> None:
    # A proxy (or the sandbox) serving both under different paths is legitimate.
    path = write(
        tmp_path,
        HEAD
        + "    graph_url: https://proxy.example/v1.0\n"
        + "    management_url: https://proxy.example/office-management\n",
    )
    (connection,) = load_connections(path)
    assert connection.management_url == "https://proxy.example/office-management"


def test_bool_field_holding_maybe_is_a_clean_error(tmp_path: Path) -> None:
    path = write(tmp_path, "connections:\n  - name: demo\n    app: office365\n    sandbox: maybe\n")
    message = refused(path)
    assert "connection 'demo': field 'sandbox': must be true or false" in message


@pytest.mark.parametrize(
    "value", ["https://graph.example/v1.0\x1b]0;x\x07", "https://g.example/\u202e"]
)
def test_hostile_characters_in_a_field_are_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "connections.yaml"
    path.write_text(HEAD + f'    graph_url: "{value.encode("unicode_escape").decode()}"\n')
    message = refused(path)
    assert "field 'graph_url'" in message and "control or invisible character" in message
    assert "\x1b" not in message and "\u202e" not in message


def test_connections_command_reports_a_bad_file_in_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, HEAD + "    tenant_id: again\n")
    monkeypatch.setenv("GROUPSYNC_CONNECTIONS", str(path))
    result = CliRunner().invoke(main, ["connections"])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {path}: connection 'contoso': field 'tenant_id': given twice (lines 4 and 7)\n"
    )
