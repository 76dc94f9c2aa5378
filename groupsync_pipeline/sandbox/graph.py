"""A faithful fake of Microsoft Graph v1.0 and the identity platform token endpoint.

Real HTTPS on loopback (msal insists on https authorities), seeded with the synthetic
organisation from :mod:`groupsync_pipeline.sandbox.seed`. Used by the test-suite and as the
embedded demo tenant. See ``/shared/api-reference/CONTRACTS.md`` for the behaviour copied.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from groupsync_pipeline.sandbox.seed import (
    SANDBOX_TENANT_ID,
    Group,
    Organisation,
    OtherObject,
    User,
    build_organisation,
)
from groupsync_pipeline.sandbox.tls import make_self_signed

__all__ = [
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "SANDBOX_TENANT_ID",
    "DEFAULT_PERMISSIONS",
    "FaultInjector",
    "Fault",
    "GraphSandbox",
    "RequestRecord",
    "main",
]

SANDBOX_CLIENT_ID = "0b7e3c4a-9f21-4d6b-8e5a-2c1f7a9d3e60"
SANDBOX_CLIENT_SECRET = "sandbox-not-a-secret"  # fake tenant: public on purpose
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
_GRAPH_APP_SCOPE = "00000003-0000-0000-c000-000000000000/.default"  # Graph's appId form
_RESERVED_SCOPES = {"openid", "profile", "offline_access", "email"}  # msal may add these
DEFAULT_PERMISSIONS = frozenset(
    {
        "GroupMember.Read.All",
        "User.Read.All",
        "RoleManagement.Read.Directory",
        "Domain.Read.All",
        "AuditLog.Read.All",
        "Directory.Read.All",
    }
)
MAX_BATCH = 20
MAX_PAGE = 999
DEFAULT_PAGE = 100

JSON_TYPE = (
    "application/json; odata.metadata=minimal; odata.streaming=true; "
    "IEEE754Compatible=false; charset=utf-8"
)
TEXT_TYPE = "text/plain; charset=utf-8"
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")

# Property names from the Graph v1.0 CSDL: $select of anything else is a 400, as in Graph.
GROUP_PROPERTIES = frozenset(
    [
        "id",
        "deletedDateTime",
        "accessType",
        "allowExternalSenders",
        "assignedLabels",
        "assignedLicenses",
        "autoSubscribeNewMembers",
        "classification",
        "createdDateTime",
        "description",
        "displayName",
        "expirationDateTime",
        "groupTypes",
        "hasMembersWithLicenseErrors",
        "hideFromAddressLists",
        "hideFromOutlookClients",
        "infoCatalogs",
        "isArchived",
        "isAssignableToRole",
        "isFavorite",
        "isManagementRestricted",
        "isSubscribedByMail",
        "licenseProcessingState",
        "mail",
        "mailEnabled",
        "mailNickname",
        "membershipRule",
        "membershipRuleProcessingState",
        "onPremisesDomainName",
        "onPremisesExtensionAttributes",
        "onPremisesLastSyncDateTime",
        "onPremisesNetBiosName",
        "onPremisesProvisioningErrors",
        "onPremisesSamAccountName",
        "onPremisesSecurityIdentifier",
        "onPremisesSyncEnabled",
        "organizationId",
        "preferredDataLocation",
        "preferredLanguage",
        "proxyAddresses",
        "renewedDateTime",
        "resourceBehaviorOptions",
        "resourceProvisioningOptions",
        "securityEnabled",
        "securityIdentifier",
        "serviceProvisioningErrors",
        "theme",
        "uniqueName",
        "unseenConversationsCount",
        "unseenCount",
        "unseenMessagesCount",
        "visibility",
        "welcomeMessageEnabled",
    ]
)
USER_PROPERTIES = frozenset(
    [
        "id",
        "deletedDateTime",
        "aboutMe",
        "accountEnabled",
        "ageGroup",
        "assignedLicenses",
        "assignedPlans",
        "authorizationInfo",
        "birthday",
        "businessPhones",
        "city",
        "companyName",
        "consentProvidedForMinor",
        "country",
        "createdDateTime",
        "creationType",
        "customSecurityAttributes",
        "department",
        "deviceEnrollmentLimit",
        "displayName",
        "employeeHireDate",
        "employeeId",
        "employeeLeaveDateTime",
        "employeeOrgData",
        "employeeType",
        "externalUserState",
        "externalUserStateChangeDateTime",
        "faxNumber",
        "givenName",
        "hireDate",
        "identities",
        "identityParentId",
        "imAddresses",
        "interests",
        "isManagementRestricted",
        "isResourceAccount",
        "jobTitle",
        "lastPasswordChangeDateTime",
        "legalAgeGroupClassification",
        "licenseAssignmentStates",
        "mail",
        "mailboxSettings",
        "mailNickname",
        "mobilePhone",
        "mySite",
        "officeLocation",
        "onPremisesDistinguishedName",
        "onPremisesDomainName",
        "onPremisesExtensionAttributes",
        "onPremisesImmutableId",
        "onPremisesLastSyncDateTime",
        "onPremisesProvisioningErrors",
        "onPremisesSamAccountName",
        "onPremisesSecurityIdentifier",
        "onPremisesSyncEnabled",
        "onPremisesUserPrincipalName",
        "otherMails",
        "passwordPolicies",
        "passwordProfile",
        "pastProjects",
        "postalCode",
        "preferredDataLocation",
        "preferredLanguage",
        "preferredName",
        "print",
        "provisionedPlans",
        "proxyAddresses",
        "responsibilities",
        "schools",
        "securityIdentifier",
        "serviceProvisioningErrors",
        "showInAddressList",
        "signInActivity",
        "signInSessionsValidFromDateTime",
        "skills",
        "state",
        "streetAddress",
        "surname",
        "usageLocation",
        "userPrincipalName",
        "userType",
    ]
)
DOMAIN_PROPERTIES = frozenset(
    [
        "id",
        "authenticationType",
        "availabilityStatus",
        "isAdminManaged",
        "isDefault",
        "isInitial",
        "isRoot",
        "isVerified",
        "manufacturer",
        "model",
        "passwordNotificationWindowInDays",
        "passwordValidityPeriodInDays",
        "state",
        "supportedServices",
    ]
)
_OTHER_PROPERTIES = frozenset(
    [
        "deviceId",
        "operatingSystem",
        "operatingSystemVersion",
        "trustType",
        "appId",
        "servicePrincipalType",
        "appDisplayName",
        "companyName",
    ]
)
DIRECTORY_OBJECT_PROPERTIES = GROUP_PROPERTIES | USER_PROPERTIES | _OTHER_PROPERTIES

_ODATA_USER = "#microsoft.graph.user"
_ODATA_GROUP = "#microsoft.graph.group"
# cast segment (lower case) -> (@odata.type, entity set name for @odata.context)
_CASTS = {
    "microsoft.graph.user": (_ODATA_USER, "users"),
    "microsoft.graph.group": (_ODATA_GROUP, "groups"),
    "microsoft.graph.device": ("#microsoft.graph.device", "devices"),
    "microsoft.graph.serviceprincipal": ("#microsoft.graph.servicePrincipal", "servicePrincipals"),
    "microsoft.graph.orgcontact": ("#microsoft.graph.orgContact", "contacts"),
}
_GROUP_READ = ("GroupMember.Read.All", "Group.Read.All", "Directory.Read.All")
_USER_READ = ("User.Read.All", "Directory.Read.All")
_DOMAIN_READ = ("Domain.Read.All", "Directory.Read.All")

# Getters for user properties, so a $select'ed page builds only the keys asked for.
_USER_GETTERS: dict[str, Callable[[User], Any]] = {
    "id": lambda u: u.id,
    "displayName": lambda u: u.display_name,
    "mail": lambda u: u.mail,
    "userPrincipalName": lambda u: u.user_principal_name,
    "userType": lambda u: u.user_type,
    "accountEnabled": lambda u: u.account_enabled,
    "department": lambda u: u.department,
    "externalUserState": lambda u: u.external_user_state,
    "externalUserStateChangeDateTime": lambda u: (
        u.created_date_time if u.external_user_state else None
    ),
    "givenName": lambda u: u.given_name,
    "surname": lambda u: u.surname,
    "jobTitle": lambda u: u.job_title,
    "officeLocation": lambda u: u.office_location,
    "createdDateTime": lambda u: u.created_date_time,
    "businessPhones": lambda u: [],
    "mobilePhone": lambda u: None,
    "preferredLanguage": lambda u: "en-US",
    "mailNickname": lambda u: u.user_principal_name.split("@", 1)[0],
    "otherMails": lambda u: [],
    "imAddresses": lambda u: [u.mail] if u.mail else [],
    "proxyAddresses": lambda u: [f"SMTP:{u.mail}"] if u.mail else [],
    "creationType": lambda u: "Invitation" if u.external_user_state else None,
    "deletedDateTime": lambda u: None,
}


def _user_default(u: User) -> dict[str, Any]:
    """The properties Graph returns for a user when no $select is given."""
    return {
        "businessPhones": [],
        "displayName": u.display_name,
        "givenName": u.given_name,
        "jobTitle": u.job_title,
        "mail": u.mail,
        "mobilePhone": None,
        "officeLocation": u.office_location,
        "preferredLanguage": "en-US",
        "surname": u.surname,
        "userPrincipalName": u.user_principal_name,
        "id": u.id,
    }


def _security_identifier(object_id: str) -> str:
    # Entra derives cloud SIDs from the object id: S-1-12-1-<4 little-endian uint32s>.
    raw = uuid.UUID(object_id).bytes_le
    parts = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, 16, 4)]
    return "S-1-12-1-" + "-".join(map(str, parts))


def _group_full(g: Group, initial_domain: str) -> dict[str, Any]:
    """Every key of the docs' group example (groups_list.json example1)."""
    return {
        "id": g.id,
        "deletedDateTime": None,
        "classification": None,
        "createdDateTime": g.created_date_time,
        "description": g.description,
        "displayName": g.display_name,
        "expirationDateTime": None,
        "groupTypes": list(g.group_types),
        "isAssignableToRole": None,
        "mail": g.mail,
        "mailEnabled": g.mail_enabled,
        "mailNickname": g.mail_nickname,
        "membershipRule": None,
        "membershipRuleProcessingState": None,
        "onPremisesDomainName": None,
        "onPremisesLastSyncDateTime": None,
        "onPremisesNetBiosName": None,
        "onPremisesSamAccountName": None,
        "onPremisesSecurityIdentifier": None,
        "onPremisesSyncEnabled": None,
        "preferredDataLocation": None,
        "preferredLanguage": None,
        "proxyAddresses": (
            [f"SMTP:{g.mail}", f"smtp:{g.mail_nickname}@{initial_domain}"] if g.mail else []
        ),
        "renewedDateTime": g.created_date_time,
        "resourceBehaviorOptions": [],
        "resourceProvisioningOptions": [],
        "securityEnabled": g.security_enabled,
        "securityIdentifier": _security_identifier(g.id),
        "theme": None,
        "visibility": g.visibility,
        "onPremisesProvisioningErrors": [],
        "serviceProvisioningErrors": [],
    }


def _other_full(o: OtherObject) -> dict[str, Any]:
    body: dict[str, Any] = {"id": o.id, "deletedDateTime": None, "displayName": o.display_name}
    body.update(o.properties)
    return body


def _now_graph() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


class RequestRecord(NamedTuple):
    method: str
    path: str  # decoded path without the query
    query: str  # raw query string
    status: int  # 0 when the connection was dropped without a response


@dataclass
class Fault:
    kind: str
    path: str
    count: int
    status: int | None
    retry_after: str | None
    delay: float
    _regex: re.Pattern[str] | None = field(default=None, repr=False)
    body: bytes | None = None  # for "respond": the exact answer
    content_type: str = "application/json"

    def matches(self, targets: Iterable[str]) -> bool:
        if not self.path:
            return True
        for target in targets:
            if self.path in target or (self._regex is not None and self._regex.search(target)):
                return True
        return False


class FaultInjector:
    """Queue of one-shot (or ``count``-shot) failures, matched by request path + query."""

    # foreign_next_link: a normal page whose @odata.nextLink points at another host (a
    # compromised or misconfigured proxy); a client must not follow it with its token.
    # respond: answer exactly ``status`` / ``body`` / ``content_type`` (what no fake sends on
    # its own: malformed or surprising answers from other implementations of the API).
    KINDS = frozenset(
        {
            "throttle",
            "error",
            "timeout",
            "truncate",
            "garbage",
            "drop",
            "foreign_next_link",
            "respond",
        }
    )
    INNER_KINDS = frozenset({"throttle", "error", "timeout"})  # what a $batch item can do

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(
        self,
        kind: str,
        *,
        path: str = "",
        count: int = 1,
        status: int | None = None,
        retry_after: str | None = None,
        delay: float = 0.0,
        body: bytes | str | None = None,
        content_type: str = "application/json",
    ) -> Fault:
        """Fail the next ``count`` requests whose path+query contains/regex-matches ``path``."""
        if kind not in self.KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(self.KINDS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        try:
            regex: re.Pattern[str] | None = re.compile(path) if path else None
        except re.error:
            regex = None  # not a regex (e.g. "$count(") - substring match still applies
        if isinstance(body, str):
            body = body.encode()
        fault = Fault(kind, path, count, status, retry_after, delay, regex, body, content_type)
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, targets: Iterable[str], kinds: Iterable[str] | None = None) -> Fault | None:
        """Consume one firing of the first pending fault matching any of ``targets``."""
        targets = list(targets)
        allowed = self.KINDS if kinds is None else frozenset(kinds)
        with self._lock:
            for fault in self._faults:
                if fault.kind in allowed and fault.matches(targets):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> int:
        """How many fault firings are still queued."""
        with self._lock:
            return sum(f.count for f in self._faults)


class GraphError(Exception):
    """Raised inside request handling; becomes a Graph-shaped error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class _Response:
    status: int
    payload: Any  # dict for JSON, str/int for text, bytes for raw
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        if isinstance(self.payload, bytes):
            return self.payload
        if self.content_type == TEXT_TYPE:
            return str(self.payload).encode()
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class _Request:
    method: str
    path: str  # decoded, without query
    query: str  # raw
    headers: dict[str, str]  # lower-case names
    body: bytes
    request_id: str
    client_request_id: str

    def params(self) -> dict[str, str]:
        return {k.lower(): v for k, v in parse_qsl(self.query, keep_blank_values=True)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sandbox: GraphSandbox) -> None:
        self.sandbox = sandbox
        super().__init__(addr, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake here, in the worker thread: a slow client cannot stall accept().
        sandbox = self.sandbox
        try:
            conn = sandbox._ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        sandbox._track(conn, True)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            sandbox._track(conn, False)
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response (timeouts, faults) are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one TLS handshake per client, not per page
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections eventually free their thread
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        sandbox = self.server.sandbox
        split = urlsplit(self.path)
        path, query = unquote(split.path), split.query
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = _Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=body,
            request_id=str(uuid.uuid4()),
            client_request_id=headers.get("client-request-id") or str(uuid.uuid4()),
        )
        fault = sandbox.faults.take([self.path, unquote(self.path)])
        if fault is not None and fault.kind == "drop":
            sandbox._record(req, 0)
            self._hang_up()
            return
        if fault is not None and fault.kind == "timeout":
            sandbox._stopping.wait(fault.delay)  # the client's timeout fires first
            fault = None
        if fault is not None and fault.kind == "garbage":
            resp = _Response(200, _GARBAGE_HTML, "text/html; charset=utf-8")
        elif fault is not None and fault.kind == "respond":
            resp = _Response(fault.status or 200, fault.body or b"", fault.content_type)
        elif fault is not None and fault.kind in ("throttle", "error"):
            resp = sandbox._fault_response(fault, req)
        else:
            resp = sandbox._dispatch(req)
            foreign = fault is not None and fault.kind == "foreign_next_link"
            if foreign and isinstance(resp.payload, dict) and "@odata.nextLink" in resp.payload:
                resp.payload["@odata.nextLink"] = "https://graph.attacker.example/v1.0/next"
        data = resp.body()
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", req.request_id)
        self.send_header("client-request-id", req.client_request_id)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        sandbox._record(req, resp.status)
        if fault is not None and fault.kind == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._hang_up()
            return
        self.wfile.write(data)

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


_GARBAGE_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
    b"</h1></center><hr><center>corporate-proxy/1.0</center></body></html>"
)


class GraphSandbox:
    """Microsoft Graph v1.0 + identity platform, served over HTTPS on loopback."""

    def __init__(
        self,
        org: Organisation | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = SANDBOX_CLIENT_ID,
        client_secret: str = SANDBOX_CLIENT_SECRET,
        token_lifetime: int = 3599,
        permissions: set[str] | None = None,
    ) -> None:
        self.org: Organisation = org if org is not None else build_organisation()
        self.host = host
        self.port = port
        self.tenant_id: str = self.org.tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime = token_lifetime
        self.permissions: set[str] = (
            set(permissions) if permissions is not None else set(DEFAULT_PERMISSIONS)
        )
        self.faults = FaultInjector()
        self.requests: list[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # access token -> expiry (time.monotonic())
        self._tokens_lock = threading.Lock()
        self._skip_key = secrets.token_bytes(32)  # signs $skiptoken values
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._ca_bundle: Path | None = None
        self._ssl_context: ssl.SSLContext
        self._stopping = threading.Event()
        self._conns: set[Any] = set()
        self._conns_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> GraphSandbox:
        if self._server is not None:
            return self
        self._tmpdir = Path(tempfile.mkdtemp(prefix="graph-sandbox-"))
        cert, key = make_self_signed(self._tmpdir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self._ssl_context = ctx
        self._ca_bundle = cert
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"graph-sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would otherwise linger
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> GraphSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: Any, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("GraphSandbox is not started")
        return f"https://{self.host}:{self.port}"

    @property
    def authority_host(self) -> str:
        return self.base_url

    @property
    def authority(self) -> str:
        """msal ``authority`` for this tenant."""
        return f"{self.base_url}/{self.tenant_id}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def ca_bundle(self) -> str:
        if self._ca_bundle is None:
            raise RuntimeError("GraphSandbox is not started")
        return str(self._ca_bundle)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting this sandbox's certificate."""
        return ssl.create_default_context(cafile=self.ca_bundle)

    def connection_settings(self) -> dict[str, str]:
        """What a client needs to reach this tenant, named as GraphConnector's arguments."""
        return {
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "authority_host": self.authority_host,
            "graph_url": self.graph_url,
            "ca_bundle": self.ca_bundle,
        }

    # -- request log and tokens --------------------------------------------------------------
    def _record(self, req: _Request, status: int) -> None:
        with self._log_lock:
            self.requests.append(RequestRecord(req.method, req.path, req.query, status))

    def request_count(self, path_prefix: str = "") -> int:
        with self._log_lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def reset_log(self) -> None:
        with self._log_lock:
            self.requests.clear()

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (401 on the next Graph call)."""
        with self._tokens_lock:
            for token in self._tokens:
                self._tokens[token] = 0.0

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, req: _Request) -> _Response:
        try:
            segments = [s for s in req.path.split("/") if s]
            if segments and segments[0].lower() == "v1.0":
                return self._graph(req, segments[1:])
            if len(segments) >= 2:
                return self._identity(req, segments)
            raise GraphError(400, "BadRequest", f"Invalid version: {req.path.strip('/')}")
        except GraphError as err:
            return self._error(err.status, err.code, err.message, req)

    def _error(self, status: int, code: str, message: str, req: _Request) -> _Response:
        return _Response(
            status,
            {
                "error": {
                    "code": code,
                    "message": message,
                    "innerError": {
                        "date": _now_graph(),
                        "request-id": req.request_id,
                        "client-request-id": req.client_request_id,
                    },
                }
            },
        )

    def _fault_response(self, fault: Fault, req: _Request) -> _Response:
        if fault.kind == "throttle":
            # Body exactly like the docs' sample (throttling_429.json).
            return _Response(
                429,
                {
                    "error": {
                        "code": "TooManyRequests",
                        "innerError": {
                            "code": "429",
                            "date": _now_graph(),
                            "message": "Please retry after",
                            "request-id": req.request_id,
                            "status": "429",
                        },
                        "message": "Please retry again later.",
                    }
                },
                "application/json",
                {"Retry-After": fault.retry_after or "1"},
            )
        status = fault.status or 503
        if status == 503:
            code, message = "serviceNotAvailable", "Service unavailable"
        elif status == 504:
            code, message = "serviceNotAvailable", "Gateway timeout"
        else:
            code, message = "generalException", "General exception while processing"
        resp = self._error(status, code, message, req)
        if fault.retry_after:
            resp.headers["Retry-After"] = fault.retry_after
        return resp

    # -- identity platform -------------------------------------------------------------------
    def _known_tenant(self, tenant: str) -> bool:
        tenant = tenant.lower()
        return tenant == self.tenant_id.lower() or any(
            tenant == d["id"].lower() for d in self.org.domains if d.get("isVerified")
        )

    def _identity(self, req: _Request, segments: list[str]) -> _Response:
        tenant, rest = segments[0], "/".join(segments[1:]).lower()
        routes = {
            "v2.0/.well-known/openid-configuration": ("GET", self._openid_configuration),
            "oauth2/v2.0/token": ("POST", self._token),
            "discovery/v2.0/keys": ("GET", lambda r, t: _Response(200, {"keys": []})),
        }
        route = routes.get(rest)
        if route is None:
            return self._aad_error(req, 404, "invalid_request", 90002, "Not found.")
        if req.method != route[0]:
            return self._aad_error(
                req,
                405,
                "invalid_request",
                900561,
                "The endpoint only accepts " + route[0] + " requests.",
            )
        if not self._known_tenant(tenant):
            return self._aad_error(
                req,
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant "
                "ID and are signing into the correct cloud. Check with your subscription "
                "administrator, this may happen if there are no active subscriptions for the "
                "tenant.",
            )
        return route[1](req, tenant)

    def _openid_configuration(self, req: _Request, tenant: str) -> _Response:
        root = f"{self.base_url}/{tenant}"
        return _Response(
            200,
            {
                "token_endpoint": f"{root}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{root}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{self.base_url}/{self.tenant_id}/v2.0",
                "request_uri_parameter_supported": False,
                "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
            },
            "application/json; charset=utf-8",
        )

    def _aad_error(
        self, req: _Request, status: int, error: str, code: int, message: str
    ) -> _Response:
        trace_id = req.request_id
        correlation_id = req.client_request_id  # AAD echoes the client's correlation id
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return _Response(
            status,
            {
                "error": error,
                "error_description": (
                    f"AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\n"
                    f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
                ),
                "error_codes": [code],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"{self.base_url}/error?code={code}",
            },
            "application/json; charset=utf-8",
        )

    def _token(self, req: _Request, tenant: str) -> _Response:
        form = dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("basic "):  # RFC 6749 2.3.1: url-encoded id:secret
            try:
                decoded = base64.b64decode(auth[6:].strip()).decode()
                basic_id, _, basic_secret = decoded.partition(":")
                client_id, secret = unquote(basic_id), unquote(basic_secret)
            except (binascii.Error, UnicodeDecodeError):
                return self._aad_error(
                    req, 401, "invalid_client", 7000216, "Malformed Basic authorization header."
                )
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            if not grant:
                return self._aad_error(
                    req,
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'grant_type'.",
                )
            return self._aad_error(
                req,
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            )
        if client_id != self.client_id:
            return self._aad_error(
                req,
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You "
                "may have sent your authentication request to the wrong tenant.",
            )
        if not secret:
            return self._aad_error(
                req,
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' "
                "or 'client_secret'.",
            )
        if not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
            return self._aad_error(
                req,
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID, for a secret added to "
                f"app '{self.client_id}'.",
            )
        scopes = [s for s in form.get("scope", "").split() if s not in _RESERVED_SCOPES]
        if not scopes:
            return self._aad_error(
                req,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            )
        bad = [s for s in scopes if s not in (GRAPH_SCOPE, _GRAPH_APP_SCOPE)]
        if bad:
            return self._aad_error(
                req,
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid. "
                f"The scope {' '.join(bad)} is not valid.",
            )
        token = self._mint_token()
        return _Response(
            200,
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime,
                "access_token": token,
            },
            "application/json; charset=utf-8",
        )

    def _mint_token(self) -> str:
        # JWT-shaped like Entra's (clients may decode `roles`), but opaque to the sandbox:
        # validity is a lookup in self._tokens, the random jti/signature make it unguessable.
        now = int(time.time())

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = {"typ": "JWT", "alg": "RS256", "kid": "sandbox"}
        claims = {
            "aud": "https://graph.microsoft.com",
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.token_lifetime,
            "app_displayname": "groupsync sandbox",
            "appid": self.client_id,
            "idtyp": "app",
            "roles": sorted(self.permissions),
            "tid": self.tenant_id,
            "jti": secrets.token_urlsafe(16),
        }
        token = ".".join(
            (
                b64(json.dumps(header).encode()),
                b64(json.dumps(claims).encode()),
                b64(secrets.token_bytes(64)),
            )
        )
        with self._tokens_lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime
        return token

    # -- Graph -------------------------------------------------------------------------------
    def _authenticate(self, req: _Request) -> None:
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        with self._tokens_lock:
            expiry = self._tokens.get(token)
        if expiry is None:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed or is not a token issued by this tenant.",
            )
        if expiry <= time.monotonic():
            raise GraphError(
                401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid."
            )

    def _require(self, any_of: tuple[str, ...]) -> None:
        if not self.permissions.intersection(any_of):
            raise GraphError(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )

    def _graph(self, req: _Request, segments: list[str]) -> _Response:
        self._authenticate(req)
        lowered = [s.lower() for s in segments]
        if lowered == ["$batch"]:
            if req.method != "POST":
                raise _method_not_allowed()
            return self._batch(req)
        if req.method != "GET":
            raise _method_not_allowed()
        if not lowered:
            raise GraphError(400, "BadRequest", "Resource not found for the segment 'v1.0'.")
        root = lowered[0]
        if root == "groups":
            self._require(_GROUP_READ)
            return self._groups(req, segments[1:], lowered[1:])
        if root == "users":
            self._require(_USER_READ)
            return self._users(req, segments[1:], lowered[1:])
        if root == "domains":
            self._require(_DOMAIN_READ)
            return self._domains(req, segments[1:])
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segments[0]}'.")

    # query helpers
    def _check_query(self, params: dict[str, str], supported: set[str]) -> None:
        for name in params:
            if name == "$skip":
                raise GraphError(
                    400, "Request_BadRequest", "'$skip' is not supported by the service."
                )
            if name.startswith("$") and name not in supported:
                raise GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"The query parameter '{name}' is not supported by this sandbox endpoint.",
                )

    def _top(self, params: dict[str, str]) -> int:
        raw = params.get("$top")
        if raw is None:
            return DEFAULT_PAGE
        try:
            top = int(raw)
        except ValueError:
            raise GraphError(
                400, "BadRequest", f"Invalid value '{raw}' for query option '$top'."
            ) from None
        if not 1 <= top <= MAX_PAGE:
            raise GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Invalid page size specified: '{top}'. Must be between 1 and {MAX_PAGE} "
                "inclusive.",
            )
        return top

    @staticmethod
    def _select(params: dict[str, str], allowed: frozenset[str], type_name: str) -> list[str]:
        raw = params.get("$select", "")
        names = [p.strip() for p in raw.split(",") if p.strip()]
        for name in names:
            if name not in allowed:
                raise GraphError(
                    400,
                    "Request_BadRequest",
                    f"Could not find a property named '{name}' on type "
                    f"'microsoft.graph.{type_name}'.",
                )
        return names

    def _count_allowed(self, req: _Request) -> None:
        if req.headers.get("consistencylevel", "").lower() != "eventual":
            raise GraphError(
                400,
                "Request_BadRequest",
                "Count is not currently supported. Specify the ConsistencyLevel header "
                "with the value 'eventual'.",
            )

    def _wants_count(self, req: _Request, params: dict[str, str]) -> bool:
        raw = params.get("$count", "").lower()
        if raw in ("", "false"):
            return False
        if raw != "true":
            raise GraphError(400, "BadRequest", f"Invalid value '{raw}' for query option '$count'.")
        self._count_allowed(req)
        return True

    def _skip_token(self, offset: int, listing: str) -> str:
        payload = offset.to_bytes(4, "big") + hashlib.sha256(listing.encode()).digest()[:8]
        mac = hmac.new(self._skip_key, payload, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + payload).rstrip(b"=").decode()

    def _skip_offset(self, token: str, listing: str) -> int:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        mac, payload = raw[:16], raw[16:]
        expected = hmac.new(self._skip_key, payload, hashlib.sha256).digest()[:16]
        if (
            len(raw) != 28
            or not hmac.compare_digest(mac, expected)
            or payload[4:] != hashlib.sha256(listing.encode()).digest()[:8]
        ):
            raise GraphError(400, "Request_BadRequest", "Invalid skip token.")
        return int.from_bytes(payload[:4], "big")

    def _page(
        self,
        req: _Request,
        params: dict[str, str],
        items: list[Any],
        render: Callable[[Any], dict[str, Any]],
        context: str,
        count: bool,
    ) -> _Response:
        """One page of ``items`` with an opaque, signed ``@odata.nextLink``."""
        top = self._top(params)
        # The token is bound to the listing (path + filter + order): no reuse elsewhere.
        listing = "|".join(
            (req.path.lower(), params.get("$filter", ""), params.get("$orderby", ""))
        )
        token = params.get("$skiptoken")
        offset = 0 if token is None else self._skip_offset(token, listing)
        end = offset + top
        body: dict[str, Any] = {"@odata.context": context}
        if count:
            body["@odata.count"] = len(items)
        if end < len(items):
            pairs = [
                (k, v)
                for k, v in parse_qsl(req.query, keep_blank_values=True)
                if k.lower() != "$skiptoken"
            ]
            pairs.append(("$skiptoken", self._skip_token(end, listing)))
            query = urlencode(pairs, quote_via=quote, safe="$,'()")
            body["@odata.nextLink"] = f"{self.graph_url}{quote(req.path[5:])}?{query}"
        body["value"] = [render(item) for item in items[offset:end]]
        return _Response(200, body)

    def _context(self, entity_set: str, select: list[str]) -> str:
        suffix = f"({','.join(select)})" if select else ""
        return f"{self.graph_url}/$metadata#{entity_set}{suffix}"

    # groups
    def _find_group(self, group_id: str) -> Group:
        if not _GUID_RE.match(group_id):
            raise GraphError(400, "Request_BadRequest", f"Invalid object identifier '{group_id}'.")
        group = self.org.groups.get(group_id.lower())
        if group is None:
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{group_id}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )
        return group

    def _render_group(self, select: list[str]) -> Callable[[Group], dict[str, Any]]:
        initial = self.org.initial_domain

        def render(g: Group) -> dict[str, Any]:
            full = _group_full(g, initial)
            if not select:
                return full
            out = {"id": g.id}
            for name in select:
                out[name] = full.get(name)
            return out

        return render

    def _groups(self, req: _Request, segs: list[str], lowered: list[str]) -> _Response:
        params = req.params()
        if not segs:
            self._check_query(
                params, {"$top", "$select", "$filter", "$skiptoken", "$count", "$orderby"}
            )
            select = self._select(params, GROUP_PROPERTIES, "group")
            count = self._wants_count(req, params)
            groups = list(self.org.groups.values())
            if "$filter" in params:
                groups = _filter(groups, params["$filter"], _GROUP_FILTERS)
            groups = _order(groups, params.get("$orderby"), {"displayName": "display_name"})
            return self._page(
                req,
                params,
                groups,
                self._render_group(select),
                self._context("groups", select),
                count,
            )
        if lowered == ["$count"]:
            self._count_allowed(req)
            return _Response(200, len(self.org.groups), TEXT_TYPE)
        group = self._find_group(segs[0])
        if len(segs) == 1:
            self._check_query(params, {"$select"})
            select = self._select(params, GROUP_PROPERTIES, "group")
            body = {"@odata.context": self._context("groups", select) + "/$entity"}
            body.update(self._render_group(select)(group))
            return _Response(200, body)
        kind = lowered[1]
        if kind not in ("members", "transitivemembers"):
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segs[1]}'.")
        tail = lowered[2:]
        want_count = bool(tail) and tail[-1] == "$count"
        if want_count:
            tail = tail[:-1]
        if len(tail) > 1 or (tail and tail[0] not in _CASTS):
            bad = segs[2] if tail and tail[0] not in _CASTS else segs[3]
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{bad}'.")
        cast = _CASTS[tail[0]] if tail else None
        transitive = kind == "transitivemembers"
        if cast is not None and cast[0] == _ODATA_USER:
            ids = (
                self.org.transitive_user_ids(group.id)
                if transitive
                else [m for m in group.members if m in self.org.users]
            )
        else:
            ids = self.org.transitive_members(group.id) if transitive else group.members
            if cast is not None:
                ids = [m for m in ids if self._odata_type(m) == cast[0]]
        if want_count:
            self._count_allowed(req)
            return _Response(200, len(ids), TEXT_TYPE)
        self._check_query(params, {"$top", "$select", "$skiptoken", "$count"})
        if cast is not None and cast[0] == _ODATA_USER:
            select = self._select(params, USER_PROPERTIES, "user")
        elif cast is not None and cast[0] == _ODATA_GROUP:
            select = self._select(params, GROUP_PROPERTIES, "group")
        else:
            select = self._select(params, DIRECTORY_OBJECT_PROPERTIES, "directoryObject")
        count = self._wants_count(req, params)
        context = self._context(cast[1] if cast else "directoryObjects", select)
        # OData minimal metadata: @odata.type only where it differs from the collection type.
        render = self._render_member(select, annotate=cast is None)
        return self._page(req, params, ids, render, context, count)

    def _odata_type(self, object_id: str) -> str | None:
        if object_id in self.org.users:
            return _ODATA_USER
        if object_id in self.org.groups:
            return _ODATA_GROUP
        other = self.org.others.get(object_id)
        return other.odata_type if other is not None else None

    def _render_member(self, select: list[str], *, annotate: bool) -> Callable[[str], dict]:
        users, groups, others = self.org.users, self.org.groups, self.org.others
        initial = self.org.initial_domain
        # Properties a type does not have are omitted; known-but-unset ones are null.
        getters = [
            (name, _USER_GETTERS.get(name))
            for name in select
            if name != "id" and name in USER_PROPERTIES
        ]

        def render(object_id: str) -> dict[str, Any]:
            user = users.get(object_id)
            if user is not None:
                out: dict[str, Any] = {"@odata.type": _ODATA_USER} if annotate else {}
                if not select:
                    out.update(_user_default(user))
                    return out
                out["id"] = user.id
                for name, getter in getters:
                    out[name] = getter(user) if getter is not None else None
                return out
            group = groups.get(object_id)
            if group is not None:
                full = _group_full(group, initial)
                odata = _ODATA_GROUP
            else:
                other = others.get(object_id)
                if other is None:  # dangling id: Graph silently omits deleted objects
                    return {"@odata.type": "#microsoft.graph.directoryObject", "id": object_id}
                full = _other_full(other)
                odata = other.odata_type
            out = {"@odata.type": odata} if annotate else {}
            if not select:
                out.update(full)
                return out
            out["id"] = object_id
            for name in select:
                if name in full:  # properties the type does not have are omitted
                    out[name] = full[name]
            return out

        return render

    # users
    def _find_user(self, key: str) -> User:
        user = self.org.users.get(key.lower())
        if user is None:
            lowered = key.lower()
            user = next(
                (u for u in self.org.users.values() if u.user_principal_name.lower() == lowered),
                None,
            )
        if user is None:
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{key}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )
        return user

    def _users(self, req: _Request, segs: list[str], lowered: list[str]) -> _Response:
        params = req.params()
        if lowered == ["$count"]:
            self._count_allowed(req)
            return _Response(200, len(self.org.users), TEXT_TYPE)
        if len(segs) > 1:
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segs[1]}'.")
        select = self._select(params, USER_PROPERTIES, "user")
        render = self._render_member(select, annotate=False)
        if segs:
            self._check_query(params, {"$select"})
            user = self._find_user(segs[0])
            body = {"@odata.context": self._context("users", select) + "/$entity"}
            body.update(render(user.id))
            return _Response(200, body)
        self._check_query(
            params, {"$top", "$select", "$filter", "$skiptoken", "$count", "$orderby"}
        )
        count = self._wants_count(req, params)
        users: list[User] = list(self.org.users.values())
        if "$filter" in params:
            users = _filter(users, params["$filter"], _USER_FILTERS)
        users = _order(users, params.get("$orderby"), {"displayName": "display_name"})
        return self._page(
            req, params, users, lambda u: render(u.id), self._context("users", select), count
        )

    # domains
    def _domains(self, req: _Request, segs: list[str]) -> _Response:
        params = req.params()
        self._check_query(params, {"$select"})
        select = self._select(params, DOMAIN_PROPERTIES, "domain")

        def render(d: dict[str, Any]) -> dict[str, Any]:
            return {"id": d["id"], **{k: d.get(k) for k in select}} if select else dict(d)

        if segs:
            if len(segs) > 1:
                raise GraphError(
                    400, "BadRequest", f"Resource not found for the segment '{segs[1]}'."
                )
            match = next((d for d in self.org.domains if d["id"].lower() == segs[0].lower()), None)
            if match is None:
                raise GraphError(
                    404,
                    "Request_ResourceNotFound",
                    f"Resource '{segs[0]}' does not exist or one of its queried "
                    "reference-property objects are not present.",
                )
            return _Response(
                200,
                {"@odata.context": self._context("domains", select) + "/$entity", **render(match)},
            )
        return _Response(
            200,
            {
                "@odata.context": self._context("domains", select),
                "value": [render(d) for d in self.org.domains],
            },
        )

    # $batch
    def _batch(self, req: _Request) -> _Response:
        try:
            payload = json.loads(req.body or b"null")
            items = payload["requests"]
            if not isinstance(items, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise GraphError(400, "BadRequest", "Invalid batch payload format.") from None
        if len(items) > MAX_BATCH:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"Too many requests in the batch: the maximum is {MAX_BATCH}.",
            )
        ids = [str(item.get("id", "")) if isinstance(item, dict) else "" for item in items]
        if "" in ids or len(set(ids)) != len(ids):
            raise GraphError(400, "BadRequest", "Batch request ids must be present and unique.")
        statuses: dict[str, int] = {}
        responses = []
        for item, item_id in zip(items, ids, strict=True):
            status, headers, body = self._batch_item(req, item, statuses)
            statuses[item_id] = status
            responses.append({"id": item_id, "status": status, "headers": headers, "body": body})
        return _Response(200, {"responses": responses})

    def _batch_item(
        self, outer: _Request, item: dict[str, Any], statuses: dict[str, int]
    ) -> tuple[int, dict[str, str], Any]:
        url = str(item.get("url", ""))
        if url.lower().startswith(("http://", "https://")):
            resp = self._error(400, "BadRequest", "Batch request URLs must be relative.", outer)
            return resp.status, {"Content-Type": "application/json"}, resp.payload
        relative = "/" + url.lstrip("/")
        split = urlsplit(relative)
        inner_headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        inner = _Request(
            method=str(item.get("method", "GET")).upper(),
            path="/v1.0" + unquote(split.path),
            query=split.query,
            headers={**inner_headers, "authorization": outer.headers.get("authorization", "")},
            body=b"",
            request_id=str(uuid.uuid4()),
            client_request_id=outer.client_request_id,
        )
        depends = item.get("dependsOn") or []
        if any(statuses.get(str(dep), 424) >= 400 for dep in depends):
            resp = self._error(424, "FailedDependency", "Dependent request failed.", inner)
        elif inner.path.lower() == "/v1.0/$batch":
            resp = self._error(400, "BadRequest", "Nested batch requests are not allowed.", inner)
        else:
            fault = self.faults.take(
                [relative, "/v1.0" + relative, unquote(relative)], FaultInjector.INNER_KINDS
            )
            if fault is not None and fault.kind == "timeout":
                self._stopping.wait(fault.delay)
                fault = None
            resp = (
                self._fault_response(fault, inner) if fault is not None else self._dispatch(inner)
            )
        headers = {"Content-Type": resp.content_type, **resp.headers}
        payload = resp.payload
        if resp.content_type == TEXT_TYPE and isinstance(payload, int):
            payload = int(payload)  # $count: the inner body is the bare integer
        return resp.status, headers, payload


def _method_not_allowed() -> GraphError:
    return GraphError(
        405, "Request_BadRequest", "Specified HTTP method is not allowed for the request target."
    )


# -- $filter / $orderby ----------------------------------------------------------------------
_CLAUSE_RE = re.compile(r"\s*(\w+)\s+eq\s+('(?:[^']|'')*'|true|false|null)\s*", re.IGNORECASE)
_GROUP_FILTERS: dict[str, str] = {"displayName": "display_name", "id": "id"}
_USER_FILTERS: dict[str, str] = {
    "userType": "user_type",
    "accountEnabled": "account_enabled",
    "id": "id",
    "displayName": "display_name",
    "mail": "mail",
    "userPrincipalName": "user_principal_name",
    "department": "department",
}


def _parse_filter(text: str, allowed: dict[str, str]) -> list[tuple[str, Any]]:
    """``prop eq literal [and ...]`` -> [(attribute, value)]; anything else is unsupported."""
    clauses: list[tuple[str, Any]] = []
    parts = re.split(r"\s+and\s+(?=(?:[^']*'[^']*')*[^']*$)", text.strip(), flags=re.IGNORECASE)
    for part in parts:
        match = _CLAUSE_RE.fullmatch(part)
        attr = allowed.get(match.group(1)) if match else None
        if match is None or attr is None:
            raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
        literal = match.group(2)
        value: Any
        if literal.startswith("'"):
            value = literal[1:-1].replace("''", "'")  # OData doubles quotes inside strings
        else:
            value = {"true": True, "false": False, "null": None}[literal.lower()]
        clauses.append((attr, value))
    return clauses


def _filter(items: list[Any], text: str, allowed: dict[str, str]) -> list[Any]:
    clauses = _parse_filter(text, allowed)

    def keep(item: Any) -> bool:
        for attr, value in clauses:
            actual = getattr(item, attr)
            if isinstance(value, str) and isinstance(actual, str):
                if actual.casefold() != value.casefold():  # directory eq is case-insensitive
                    return False
            elif actual != value:
                return False
        return True

    return [item for item in items if keep(item)]


def _order(items: list[Any], orderby: str | None, allowed: dict[str, str]) -> list[Any]:
    if not orderby:
        return items
    prop, _, direction = orderby.strip().partition(" ")
    attr = allowed.get(prop)
    if attr is None or direction.strip().lower() not in ("", "asc", "desc"):
        raise GraphError(400, "Request_UnsupportedQuery", "Unsupported sort property.")
    return sorted(
        items,
        key=lambda item: (getattr(item, attr) or "").casefold(),
        reverse=direction.strip().lower() == "desc",
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m groupsync_pipeline.sandbox.graph``: serve the sandbox until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Microsoft Graph sandbox on loopback HTTPS")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=6000)
    args = parser.parse_args(argv)
    org = build_organisation(seed=args.seed, users=args.users)
    sandbox = GraphSandbox(org, host=args.host, port=args.port).start()
    print(f"base_url      {sandbox.base_url}")
    print(f"graph_url     {sandbox.graph_url}")
    print(f"tenant_id     {sandbox.tenant_id}")
    print(f"client_id     {sandbox.client_id}")
    print(f"client_secret {sandbox.client_secret}")
    print(f"ca_bundle     {sandbox.ca_bundle}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
