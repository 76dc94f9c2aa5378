"""Connections file and data directory: where groupsync reads its settings.

Connections come from the YAML file named by ``GROUPSYNC_CONNECTIONS``; without it, the bundled
sandbox connection (a fake Microsoft 365 tenant served on loopback) is used, so the product works
with no credentials. Secrets are never in the file: a connection names the environment variable
that holds its secret, and the value is read only when a token is requested.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from groupsync_pipeline.safe_text import is_unsafe
from groupsync_pipeline.yaml_located import DuplicateRecordingLoader, Located, yaml_error_text

CONNECTIONS_ENV = "GROUPSYNC_CONNECTIONS"
DATA_DIR_ENV = "GROUPSYNC_DATA_DIR"
DEFAULT_DATA_DIR = "groupsync-data"

SUPPORTED_APPS = ("office365",)
# Apps the product will connect to; named so a user gets "not supported yet", not "unknown".
PLANNED_APPS = ("google_workspace", "box", "dropbox", "salesforce")

PUBLIC_AUTHORITY_HOST = "https://login.microsoftonline.com"
PUBLIC_GRAPH_URL = "https://graph.microsoft.com/v1.0"
PUBLIC_MANAGEMENT_URL = "https://manage.office.com"

BUNDLED_SANDBOX_NAME = "sandbox"


class ConfigError(ValueError):
    """A connections file or setting that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Connection:
    """One connected app. Holds no secret: ``client_secret_env`` names where the secret lives."""

    name: str
    app: str
    tenant_id: str = ""
    client_id: str = ""
    client_secret_env: str | None = None
    authority_host: str = PUBLIC_AUTHORITY_HOST
    graph_url: str = PUBLIC_GRAPH_URL
    # Office 365 Management Activity API root (file and mailbox audit events).
    management_url: str = PUBLIC_MANAGEMENT_URL
    # PublisherIdentifier on Management API requests (its throttling quota); None: tenant_id.
    publisher_identifier: str | None = None
    ca_bundle: str | None = None
    # True: the embedded sandbox tenant is started for each use; URLs and secret come from it.
    sandbox: bool = False
    source: str = field(default="(bundled default)", compare=False)

    def read_secret(self) -> str:
        """The client secret, read from the environment at the moment it is needed."""
        if self.client_secret_env is None:
            raise ConfigError(f"{self.source}: connection '{self.name}': no client_secret_env")
        value = os.environ.get(self.client_secret_env)
        if not value:
            raise ConfigError(
                f"{self.source}: connection '{self.name}': field 'client_secret_env': "
                f"environment variable {self.client_secret_env} is not set"
            )
        return value


_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
_REQUIRED = ("name", "app", "tenant_id", "client_id", "client_secret_env")
_OPTIONAL = (
    "authority_host",
    "graph_url",
    "management_url",
    "publisher_identifier",
    "ca_bundle",
    "sandbox",
)
_SANDBOX_ALLOWED = ("name", "app", "sandbox")


def bundled_connections() -> list[Connection]:
    return [Connection(name=BUNDLED_SANDBOX_NAME, app="office365", sandbox=True)]


def load_connections(path: str | os.PathLike[str] | None = None) -> list[Connection]:
    """Read and validate the connections file (default: ``$GROUPSYNC_CONNECTIONS``)."""
    if path is None:
        path = os.environ.get(CONNECTIONS_ENV) or None
    if path is None:
        return bundled_connections()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read connections file: {exc.strerror}") from None
    try:
        # A SafeLoader that also reports repeated keys (plain PyYAML keeps the last silently).
        document = yaml.load(text, Loader=DuplicateRecordingLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {yaml_error_text(exc)}") from None
    if isinstance(document, Located) and document.duplicates:
        key, first, repeat = document.duplicates[0]
        raise ConfigError(
            f"{source}: line {repeat}: key {key!r} given twice (first on line {first})"
        )
    if not isinstance(document, dict) or set(document) != {"connections"}:
        raise ConfigError(f"{source}: expected a mapping with one key 'connections'")
    entries = document["connections"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: 'connections' must be a non-empty list")
    connections: list[Connection] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        connection = _parse_connection(source, index, entry)
        if connection.name in seen:
            raise ConfigError(
                f"{source}: connection '{connection.name}': field 'name': duplicate name"
            )
        seen.add(connection.name)
        connections.append(connection)
    return connections


def _parse_connection(source: str, index: int, entry: Any) -> Connection:
    label = f"connection #{index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {label}: expected a mapping of fields")
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        label = f"connection '{name}'"

    def fail(field_name: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {label}: field '{field_name}': {problem}")

    if isinstance(entry, Located) and entry.duplicates:
        key, first, repeat = entry.duplicates[0]
        raise fail(str(key), f"given twice (lines {first} and {repeat})")
    for key in entry:
        if key not in _REQUIRED + _OPTIONAL:
            raise fail(str(key), f"unknown field (allowed: {', '.join(_REQUIRED + _OPTIONAL)})")
    for key, value in entry.items():
        if key == "sandbox":
            if not isinstance(value, bool):
                raise fail(key, "must be true or false")
        elif not isinstance(value, str) or not value.strip():
            raise fail(key, "must be a non-empty string")
        elif any(is_unsafe(char) for char in value):
            # No id, URL, variable name or path holds one; shown later, it would act.
            raise fail(key, "contains a control or invisible character")
    if "name" not in entry:
        raise fail("name", "missing")
    if not _NAME.match(entry["name"]):
        raise fail("name", "use ASCII letters, digits, '-', '_' or '.' only")
    if "app" not in entry:
        raise fail("app", "missing")
    app = entry["app"]
    if app not in SUPPORTED_APPS:
        if app in PLANNED_APPS:
            raise fail(
                "app", f"'{app}' is not supported yet (supported: {', '.join(SUPPORTED_APPS)})"
            )
        raise fail("app", f"unknown app '{app}' (supported: {', '.join(SUPPORTED_APPS)})")

    if entry.get("sandbox"):
        extra = [k for k in entry if k not in _SANDBOX_ALLOWED]
        if extra:
            raise fail(extra[0], "not allowed with 'sandbox: true' (the embedded tenant sets it)")
        return Connection(name=entry["name"], app=app, sandbox=True, source=source)

    for key in _REQUIRED:
        if key not in entry:
            raise fail(key, "missing")
    for key in ("authority_host", "graph_url", "management_url"):
        if key in entry:
            url = urlsplit(entry[key])
            if url.scheme != "https" or not url.hostname or url.query or url.fragment:
                raise fail(key, "must be an https:// URL with a host (no query)")
    for key in ("tenant_id", "client_id", "publisher_identifier"):
        # They go into URLs and form fields: refuse anything that could change their meaning.
        if key in entry and not _IDENTIFIER.match(entry[key]):
            raise fail(
                key, "use the id as shown in the app registration (letters, digits, '-', '.')"
            )
    graph_url = entry.get("graph_url", PUBLIC_GRAPH_URL)
    management_url = entry.get("management_url", PUBLIC_MANAGEMENT_URL)
    if _is_graph_root(management_url, graph_url):
        # The connector would refuse it at run time: each API's token goes only to its own
        # address, and these two would overlap.
        raise fail(
            "management_url" if "management_url" in entry else "graph_url",
            f"{management_url} is the Graph root of graph_url {graph_url}; the Office 365 "
            f"Management Activity API has its own address (public cloud: {PUBLIC_MANAGEMENT_URL})",
        )
    ca_bundle = entry.get("ca_bundle")
    if ca_bundle is not None:
        problem = _ca_bundle_problem(ca_bundle)
        if problem:
            raise fail("ca_bundle", problem)
    secret_env = entry["client_secret_env"]
    if not os.environ.get(secret_env):
        raise fail("client_secret_env", f"environment variable {secret_env} is not set")
    return Connection(
        name=entry["name"],
        app=app,
        tenant_id=entry["tenant_id"],
        client_id=entry["client_id"],
        client_secret_env=secret_env,
        authority_host=entry.get("authority_host", PUBLIC_AUTHORITY_HOST).rstrip("/"),
        graph_url=entry.get("graph_url", PUBLIC_GRAPH_URL).rstrip("/"),
        management_url=entry.get("management_url", PUBLIC_MANAGEMENT_URL).rstrip("/"),
        publisher_identifier=entry.get("publisher_identifier"),
        ca_bundle=ca_bundle,
        source=source,
    )


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or 443


def _is_graph_root(management_url: str, graph_url: str) -> bool:
    """True when the Management API address is Graph's host root, or graph_url itself."""
    if _origin(management_url) != _origin(graph_url):
        return False
    path = urlsplit(management_url).path.rstrip("/")
    return path in ("", urlsplit(graph_url).path.rstrip("/"))


def _ca_bundle_problem(ca_bundle: str) -> str | None:
    """Why ``ca_bundle`` cannot serve as the trust anchor of every HTTPS call, or None."""
    if not Path(ca_bundle).is_file():
        return f"file not found: {ca_bundle}"
    try:
        # Exactly what the connector does with it, so a bad file fails here, not in a run.
        ssl.create_default_context(cafile=ca_bundle)
    except ssl.SSLError:
        return f"not a PEM certificate (or bundle of them): {ca_bundle}"
    except OSError as exc:
        return f"cannot read {ca_bundle}: {exc.strerror or exc}"
    return None


def env_number(
    environ: Mapping[str, str], name: str, fallback: float, low: float, high: float
) -> float:
    """A number setting from the environment: ``fallback`` when unset, else within bounds."""
    raw = environ.get(name, "").strip()
    if not raw:
        return fallback
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g}: {raw!r}")
    return value


def find_connection(connections: list[Connection], name: str) -> Connection:
    for connection in connections:
        if connection.name == name:
            return connection
    known = ", ".join(c.name for c in connections)
    raise ConfigError(f"unknown connection '{name}' (configured: {known})")


_EMAIL = re.compile(r"^[^@\s<>(),;:\"\[\]]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def check_email_address(value: str) -> str:
    """A single plain address (no display name, no header tricks), or a ConfigError."""
    address = value.strip()
    if not _EMAIL.match(address):
        raise ConfigError(f"not a valid email address: {value!r}")
    return address


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where DuckDB files live: the argument, else $GROUPSYNC_DATA_DIR, else ./groupsync-data."""
    chosen = explicit or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().resolve()
