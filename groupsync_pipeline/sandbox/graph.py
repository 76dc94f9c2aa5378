"""A faithful fake of Microsoft Graph v1.0 and the identity platform token endpoint.

Real HTTPS on loopback (msal insists on https authorities), seeded with the synthetic
organisation from :mod:`groupsync_pipeline.sandbox.seed`. Used by the test-suite and as the
embedded demo tenant. See ``/shared/api-reference/CONTRACTS.md`` for the behaviour copied.

Also serves directory roles, the audit logs (``/auditLogs/signIns``, ``/directoryAudits``) from
the synthetic stream of :mod:`.activity_stream`, and the Office 365 Management Activity API of
:mod:`.management` under ``/office-management`` (tokens for ``https://manage.office.com``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import math
import re
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from groupsync_pipeline.sandbox.activity_stream import (
    DEFAULT_RATE,
    DIRECTORY_AUDIT,
    SIGN_IN,
    ActivityEvent,
    ActivityStream,
)
from groupsync_pipeline.sandbox.management import (
    DEFAULT_PAGE_SIZE,
    MANAGEMENT_APP_ID,
    MANAGEMENT_AUDIENCE,
    MANAGEMENT_PREFIX,
    ManagementActivityApi,
)
from groupsync_pipeline.sandbox.seed import (
    EVOLVE_EPOCH,
    SANDBOX_TENANT_ID,
    DirectoryRole,
    Group,
    Organisation,
    OtherObject,
    User,
    build_organisation,
)
from groupsync_pipeline.sandbox.tls import make_self_signed

__all__ = [
    "GRAPH_SCOPE",
    "MANAGEMENT_SCOPE",
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "SANDBOX_TENANT_ID",
    "DEFAULT_PERMISSIONS",
    "DELTA_EXPIRY_MODES",
    "EVOLVE_EPOCH",
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
GRAPH_AUDIENCE = "https://graph.microsoft.com"
MANAGEMENT_SCOPE = f"{MANAGEMENT_AUDIENCE}/.default"
# scope -> audience of the token minted for it (one resource per token request, as in Entra)
_SCOPE_AUDIENCES = {
    GRAPH_SCOPE: GRAPH_AUDIENCE,
    _GRAPH_APP_SCOPE: GRAPH_AUDIENCE,
    MANAGEMENT_SCOPE: MANAGEMENT_AUDIENCE,
    f"{MANAGEMENT_APP_ID}/.default": MANAGEMENT_AUDIENCE,
}
_RESERVED_SCOPES = {"openid", "profile", "offline_access", "email"}  # msal may add these
DEFAULT_PERMISSIONS = frozenset(
    {
        "GroupMember.Read.All",
        "User.Read.All",
        "RoleManagement.Read.Directory",
        "Domain.Read.All",
        "AuditLog.Read.All",
        "Directory.Read.All",
        "ActivityFeed.Read",  # Office 365 Management APIs (manage.office.com)
    }
)
# Application permissions of the Office 365 Management APIs: only in manage.office.com tokens.
_MANAGEMENT_PERMISSIONS = frozenset({"ActivityFeed.Read", "ActivityFeed.ReadDlp"})
AUDIT_MAX_PAGE = 1000  # signIns/directoryAudits: $top up to 1000 (also the default page)
AUDIT_RETENTION = 30 * 24 * 3600.0  # Entra keeps sign-in and audit logs 30 days (P1/P2)
_AUDIT_PARAMS = frozenset({"$filter", "$top", "$skiptoken", "$orderby"})
_ROLE_READ = ("RoleManagement.Read.Directory", "Directory.Read.All")

MAX_BATCH = 20
MAX_PAGE = 999
DEFAULT_PAGE = 100
DELTA_MAX_FILTER_IDS = 50  # groups/delta: "$filter only id eq (<= 50)"
DELTA_TOKEN_LIFETIME = 7 * 24 * 3600.0  # directory-object delta tokens live about 7 days
DELTA_EXPIRY_MODES = ("gone", "syncStateNotFound", "resyncRequired")
_DELTA_SEGMENTS = frozenset(
    {"delta", "delta()", "microsoft.graph.delta", "microsoft.graph.delta()"}
)
_DELTA_PARAMS = frozenset({"$select", "$expand", "$filter", "$skiptoken", "$deltatoken"})
_FILTER_ID_RE = re.compile(r"\s*id\s+eq\s+'([^']*)'\s*", re.IGNORECASE)

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
    # What a $batch item can do; "respond" answers one inner request (say, one /users/{id})
    # with exactly the status and JSON body given.
    INNER_KINDS = frozenset({"throttle", "error", "timeout", "respond"})

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

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _bad_token() -> GraphError:
    # Garbled or forged: distinct from an expired token (which asks for a full resync).
    return GraphError(400, "Request_BadRequest", "Badly formed token.")


@dataclass(frozen=True)
class _DeltaShape:
    """What a delta round tracks; carried inside its tokens (deltaLinks hold only a token)."""

    select: tuple[str, ...] | None  # None: every property
    members: bool
    ids: tuple[str, ...] | None  # $filter=id eq ... or ...

    def dump(self) -> dict[str, Any]:
        return {"s": self.select, "m": self.members, "i": self.ids}

    @classmethod
    def load(cls, raw: dict[str, Any]) -> _DeltaShape:
        select, ids = raw["s"], raw["i"]
        return cls(
            tuple(map(str, select)) if select is not None else None,
            bool(raw["m"]),
            tuple(map(str, ids)) if ids is not None else None,
        )

    def query(self) -> list[tuple[str, str]]:
        """The request parameters that ask for this shape (for a fresh start's Location)."""
        pairs: list[tuple[str, str]] = []
        if self.select is not None:  # None: every property and members (no $select)
            pairs.append(("$select", ",".join((*self.select, *(["members"] * self.members)))))
        if self.ids is not None:
            pairs.append(("$filter", " or ".join(f"id eq '{i}'" for i in self.ids)))
        return pairs


@dataclass
class _DeltaItem:
    """One group object of a delta round, before paging."""

    ordinal: int  # stable position: the page cursor
    group: Group
    removed_reason: str | None = None  # the group itself is gone: {"@removed": ...}
    members: Sequence[str] | None = None  # members@delta ids (None: not tracked)
    member_removals: frozenset[str] = frozenset()  # ids in ``members`` that were removed


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
        # Recorded before answering: a client that got its answer finds its request logged.
        sandbox._record(req, resp.status)
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", req.request_id)
        self.send_header("client-request-id", req.client_request_id)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
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
        evolve_every: float | None = None,
        delta_page_groups: int = 100,
        delta_page_members: int = 1000,
        delta_token_lifetime: float = DELTA_TOKEN_LIFETIME,
        delta_expiry_mode: str = "gone",
        omit_deleted_user_removals: bool = False,
        random_token_key: bool = False,
        clock: Callable[[], float] | None = None,
        activity_rate: float = DEFAULT_RATE,
        management_page_size: int = DEFAULT_PAGE_SIZE,
        management_slot_seconds: int | None = None,
    ) -> None:
        """``activity_rate``: synthetic audit events per hour at a weekday peak (0: off, only
        injected events); ``management_page_size``: blobs per Management API content page;
        ``management_slot_seconds``: fixed blob slots (default: 5-15 minutes, like the API)."""
        self.org: Organisation = org if org is not None else build_organisation()
        if evolve_every is not None and evolve_every <= 0:
            raise ValueError("evolve_every must be a positive number of seconds")
        if delta_expiry_mode not in DELTA_EXPIRY_MODES:
            raise ValueError(f"delta_expiry_mode must be one of {DELTA_EXPIRY_MODES}")
        if delta_page_groups < 1 or delta_page_members < 1:
            raise ValueError("delta page limits must be >= 1")
        # The tenant advances one evolution step every ``evolve_every`` seconds since
        # EVOLVE_EPOCH, caught up before each Graph request: fresh sandboxes agree over time.
        self.evolve_every = evolve_every
        self.delta_page_groups = delta_page_groups
        self.delta_page_members = delta_page_members
        self.delta_token_lifetime = delta_token_lifetime
        self.delta_expiry_mode = delta_expiry_mode
        # Graph: "permanently deleted users may not appear as removals".
        self.omit_deleted_user_removals = omit_deleted_user_removals
        # Wall clock for evolution steps and token ages (tests substitute their own).
        self.clock: Callable[[], float] = clock or time.time
        self._delta_epoch = 0  # bumped by expire_delta_tokens()
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
        # access token -> (expiry in time.monotonic(), audience)
        self._tokens: dict[str, tuple[float, str]] = {}
        self._tokens_lock = threading.Lock()
        # Signs $skiptoken/$deltatoken values. Derived from the tenant (and seed) so another
        # process serving the same tenant accepts them; a fake, so no secrecy is needed.
        self._skip_key = (
            secrets.token_bytes(32)
            if random_token_key
            else hashlib.sha256(
                f"groupsync-sandbox-tokens:{self.org.tenant_id}:{self.org.seed}".encode()
            ).digest()
        )
        # Audit events (Graph auditLogs + Management Activity API) and that API itself.
        self.activity = ActivityStream(self.org, rate=activity_rate)
        self.management = ManagementActivityApi(
            self, page_size=management_page_size, slot_seconds=management_slot_seconds
        )
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
        self.catch_up()
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
    def management_url(self) -> str:
        """Root of the Office 365 Management Activity API (https://manage.office.com)."""
        return f"{self.base_url}/{MANAGEMENT_PREFIX}"

    @property
    def management_feed_url(self) -> str:
        """``{management_url}/api/v1.0/{tenant_id}/activity/feed``."""
        return self.management.root()

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
            "management_url": self.management_url,
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
            for token, (_, audience) in self._tokens.items():
                self._tokens[token] = (0.0, audience)

    def expire_delta_tokens(self) -> None:
        """Every outstanding delta/skip token of /groups/delta now answers as expired."""
        self._delta_epoch += 1

    def evolution_step(self, at: float | None = None) -> int:
        """The step the tenant is at, at unix time ``at`` (now), with ``evolve_every``."""
        if not self.evolve_every:
            return self.org.steps_applied
        now = self.clock() if at is None else at
        return max(0, math.floor((now - EVOLVE_EPOCH.timestamp()) / self.evolve_every))

    def catch_up(self) -> int:
        """Evolve the tenant to the current step (time-driven mode); returns steps_applied."""
        if self.evolve_every:
            target = self.evolution_step()
            if target > self.org.steps_applied:
                with self.org.lock:
                    self.org.evolve_to(target)
        return self.org.steps_applied

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, req: _Request) -> _Response:
        try:
            segments = [s for s in req.path.split("/") if s]
            if segments and segments[0].lower() == "v1.0":
                return self._graph(req, segments[1:])
            if segments and segments[0].lower() == MANAGEMENT_PREFIX:
                answer = self.management.handle(req.method, segments[1:], req.query, req.headers)
                return _Response(
                    answer.status, answer.body(), "application/json; charset=utf-8", answer.headers
                )
            if len(segments) >= 2:
                return self._identity(req, segments)
            raise GraphError(400, "BadRequest", f"Invalid version: {req.path.strip('/')}")
        except GraphError as err:
            resp = self._error(err.status, err.code, err.message, req)
            resp.headers.update(err.headers)
            return resp

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
        if req.path.lower().startswith(f"/{MANAGEMENT_PREFIX}/"):
            return self._management_fault(fault, req)
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

    def _management_fault(self, fault: Fault, req: _Request) -> _Response:
        # manage.office.com's own error shape: {"error": {"code": "AF429", "message": ...}}.
        if fault.kind == "throttle":
            body = {
                "error": {
                    "code": "AF429",
                    "message": f"Too many requests. Method={req.method}, "
                    f"PublisherId={req.params().get('publisheridentifier') or self.tenant_id}",
                }
            }
            headers = {"Retry-After": fault.retry_after or "1"}
            return _Response(429, body, "application/json; charset=utf-8", headers)
        body = {
            "error": {
                "code": "AF50000",
                "message": "An internal error occurred. Retry the request.",
            }
        }
        resp = _Response(fault.status or 503, body, "application/json; charset=utf-8")
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
        bad = [s for s in scopes if s not in _SCOPE_AUDIENCES]
        if bad:
            return self._aad_error(
                req,
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid. "
                f"The scope {' '.join(bad)} is not valid.",
            )
        audiences = {_SCOPE_AUDIENCES[s] for s in scopes}
        if len(audiences) > 1:  # one token is for one resource
            return self._aad_error(
                req,
                400,
                "invalid_scope",
                28000,
                "Provided value for the input parameter scope is not valid because it contains "
                "more than one resource. Scope " + " ".join(scopes) + " is not valid.",
            )
        token = self._mint_token(audiences.pop())
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

    def _mint_token(self, audience: str = GRAPH_AUDIENCE) -> str:
        # JWT-shaped like Entra's (clients may decode `roles`), but opaque to the sandbox:
        # validity is a lookup in self._tokens, the random jti/signature make it unguessable.
        now = int(time.time())

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = {"typ": "JWT", "alg": "RS256", "kid": "sandbox"}
        management = audience == MANAGEMENT_AUDIENCE
        roles = [
            p for p in sorted(self.permissions) if (p in _MANAGEMENT_PERMISSIONS) == management
        ]
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.token_lifetime,
            "app_displayname": "groupsync sandbox",
            "appid": self.client_id,
            "idtyp": "app",
            "roles": roles,
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
            self._tokens[token] = (time.monotonic() + self.token_lifetime, audience)
        return token

    def _token_info(self, token: str) -> tuple[float, str] | None:
        """(expiry, audience) of a live token this sandbox issued, else None."""
        with self._tokens_lock:
            info = self._tokens.get(token)
        if info is None or info[0] <= time.monotonic():
            return None
        return info

    # -- Graph -------------------------------------------------------------------------------
    def _authenticate(self, req: _Request) -> None:
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        with self._tokens_lock:
            info = self._tokens.get(token)
        if info is None:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed or is not a token issued by this tenant.",
            )
        expiry, audience = info
        if expiry <= time.monotonic():
            raise GraphError(
                401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid."
            )
        if audience != GRAPH_AUDIENCE:  # e.g. a manage.office.com token
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            )

    def _require(self, any_of: tuple[str, ...]) -> None:
        if not self.permissions.intersection(any_of):
            raise GraphError(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )

    def _graph(self, req: _Request, segments: list[str]) -> _Response:
        self.catch_up()
        self._authenticate(req)
        lowered = [s.lower() for s in segments]
        if lowered == ["$batch"]:
            if req.method != "POST":
                raise _method_not_allowed()
            return self._batch(req)  # each inner request locks on its own
        if req.method != "GET":
            raise _method_not_allowed()
        if not lowered:
            raise GraphError(400, "BadRequest", "Resource not found for the segment 'v1.0'.")
        if lowered[0] == "auditlogs":
            # Outside the org lock: generating hours of audit events must not stall the rest.
            return self._audit_logs(req, segments[1:], lowered[1:])
        # Hold the org lock while reading: the tenant may be mutated by another thread
        # (evolution, tests). JSON encoding and socket I/O happen after, outside it.
        with self.org.lock:
            return self._graph_get(req, segments, lowered)

    def _graph_get(self, req: _Request, segments: list[str], lowered: list[str]) -> _Response:
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
        if root == "directoryroles":
            self._require(_ROLE_READ)
            return self._directory_roles(req, segments[1:], lowered[1:])
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

    def _top(
        self, params: dict[str, str], default: int = DEFAULT_PAGE, maximum: int = MAX_PAGE
    ) -> int:
        raw = params.get("$top")
        if raw is None:
            return default
        try:
            top = int(raw)
        except ValueError:
            raise GraphError(
                400, "BadRequest", f"Invalid value '{raw}' for query option '$top'."
            ) from None
        if not 1 <= top <= maximum:
            raise GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Invalid page size specified: '{top}'. Must be between 1 and {maximum} inclusive.",
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

        assignable = self.org.role_assignable_group_ids()

        def render(g: Group) -> dict[str, Any]:
            full = _group_full(g, initial)
            if g.id in assignable:
                full["isAssignableToRole"] = True
            if not select:
                return full
            out = {"id": g.id}
            for name in select:
                out[name] = full.get(name)
            return out

        return render

    def _groups(self, req: _Request, segs: list[str], lowered: list[str]) -> _Response:
        params = req.params()
        if len(lowered) == 1 and lowered[0] in _DELTA_SEGMENTS:
            return self._groups_delta(req, params)
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

    # groups/delta
    def _groups_delta(self, req: _Request, params: dict[str, str]) -> _Response:
        """``GET /groups/delta``: rounds of pages ending in a deltaLink, then net changes."""
        for name in params:
            if name == "$skip":
                raise GraphError(
                    400, "Request_BadRequest", "'$skip' is not supported by the service."
                )
            if name.startswith("$") and name not in _DELTA_PARAMS:
                raise GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"The query parameter '{name}' is not supported with change tracking over "
                    "the 'groups' resource.",
                )
        skip, delta = params.get("$skiptoken"), params.get("$deltatoken")
        since: int | None = None  # None: an initial round (every group)
        # Where this page starts: (group ordinal, last member id already sent of that group).
        # Members go out sorted by id, so the cursor survives membership changes mid-round.
        cursor: tuple[int, str] = (0, "")
        first_page = False
        if skip is not None:
            state = self._open_token(skip, "s")
            shape = _DeltaShape.load(state)
            self._check_fresh(state, shape)
            start, since, cursor = state["v"], state["f"], (state["o"], state["a"])
        elif delta is not None and delta.lower() == "latest":
            # "Sync from now": no data, just a deltaLink at the current state.
            shape = self._delta_shape(params)
            return _Response(
                200,
                {
                    "@odata.context": self._context("groups", []),
                    "@odata.deltaLink": self._delta_link(self.org.version, shape),
                    "value": [],
                },
            )
        elif delta:
            state = self._open_token(delta, "d")
            shape = _DeltaShape.load(state)
            self._check_fresh(state, shape)
            start, since = self.org.version, state["v"]
        else:  # no token, or the empty $deltatoken of a 410's Location: start afresh
            shape = self._delta_shape(params)
            start, first_page = self.org.version, True
        items = self._delta_items(shape, since, start, cursor[0])
        value, next_cursor = self._delta_fill(items, cursor, shape.select)
        select = list(shape.select or ())
        body: dict[str, Any] = {
            "@odata.context": self._context("groups", select if first_page else [])
        }
        if next_cursor is not None:
            token = self._seal_token(
                {"k": "s", "v": start, "f": since, "o": next_cursor[0], "a": next_cursor[1]},
                shape,
            )
            body["@odata.nextLink"] = f"{self.graph_url}/groups/delta?$skiptoken={token}"
        else:
            # The round's START version: its pages showed the tenant as of then, so every
            # change made while the client paged comes in the next round.
            body["@odata.deltaLink"] = self._delta_link(start, shape)
        body["value"] = value
        return _Response(200, body)

    def _delta_shape(self, params: dict[str, str]) -> _DeltaShape:
        raw = params.get("$select")
        names = [p.strip() for p in (raw or "").split(",") if p.strip()]
        for name in names:
            if name not in GROUP_PROPERTIES and name != "members":
                raise GraphError(
                    400,
                    "Request_BadRequest",
                    f"Could not find a property named '{name}' on type 'microsoft.graph.group'.",
                )
        expand = [p.strip() for p in params.get("$expand", "").split(",") if p.strip()]
        for item in expand:
            if item.lower() != "members" and not item.lower().startswith("members("):
                raise GraphError(
                    400,
                    "Request_UnsupportedQuery",
                    f"Expanding '{item}' is not supported with change tracking: only members.",
                )
        ids: tuple[str, ...] | None = None
        if "$filter" in params:
            ids = self._delta_filter_ids(params["$filter"])
        if not names:  # no $select: every property is tracked, members included
            return _DeltaShape(None, True, ids)
        select = tuple(dict.fromkeys(n for n in names if n != "members"))
        return _DeltaShape(select, "members" in names or bool(expand), ids)

    @staticmethod
    def _delta_filter_ids(text: str) -> tuple[str, ...]:
        clauses = re.split(r"\s+or\s+", text.strip(), flags=re.IGNORECASE)
        ids: list[str] = []
        for clause in clauses:
            match = _FILTER_ID_RE.fullmatch(clause)
            if match is None:
                raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
            if not _GUID_RE.match(match.group(1)):
                raise GraphError(
                    400, "Request_BadRequest", f"Invalid object identifier '{match.group(1)}'."
                )
            ids.append(match.group(1).lower())
        if len(ids) > DELTA_MAX_FILTER_IDS:
            raise GraphError(
                400,
                "Request_UnsupportedQuery",
                f"Too many 'id eq' clauses in $filter: the maximum is {DELTA_MAX_FILTER_IDS}.",
            )
        return tuple(dict.fromkeys(ids))

    def _seal_token(self, state: dict[str, Any], shape: _DeltaShape) -> str:
        payload = {**state, **shape.dump(), "t": int(self.clock()), "e": self._delta_epoch}
        raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 9)
        mac = hmac.new(self._skip_key, b"delta:" + raw, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + raw).rstrip(b"=").decode()

    def _open_token(self, token: str, kind: str) -> dict[str, Any]:
        """A token's state, or 400 "Badly formed token" if garbled, forged or misused."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise _bad_token() from None
        mac, body = raw[:16], raw[16:]
        expected = hmac.new(self._skip_key, b"delta:" + body, hashlib.sha256).digest()[:16]
        if len(raw) <= 16 or not hmac.compare_digest(mac, expected):
            raise _bad_token()
        try:
            state = json.loads(zlib.decompress(body))
            _DeltaShape.load(state)
            numbers = ("v", "t", "e", "o") if kind == "s" else ("v", "t", "e")
            ok = (
                isinstance(state, dict)
                and state["k"] == kind
                and all(isinstance(state[key], int) for key in numbers)
                and (kind == "d" or isinstance(state["a"], str))
                and (kind == "d" or state["f"] is None or isinstance(state["f"], int))
            )
        except (ValueError, KeyError, TypeError, zlib.error):
            ok = False
        if not ok:  # e.g. a skiptoken passed as a deltatoken
            raise _bad_token()
        return dict(state)

    def _check_fresh(self, state: dict[str, Any], shape: _DeltaShape) -> None:
        """Expired (age, expire_delta_tokens) or unknown state: the "full resync" answers."""
        expired = (
            state["e"] != self._delta_epoch
            or self.clock() - state["t"] > self.delta_token_lifetime
            or state["v"] > self.org.version  # a state this tenant has not reached
        )
        if not expired:
            return
        if self.delta_expiry_mode == "gone":
            # Location: a fresh round of the same shape, with an empty $deltatoken.
            query = urlencode([*shape.query(), ("$deltatoken", "")], quote_via=quote, safe="$,'")
            raise GraphError(
                410,
                "resyncRequired",
                "Resync required. The delta token has expired: replace local state with a full "
                "resynchronisation starting from the URL in the Location header.",
                {"Location": f"{self.graph_url}/groups/delta?{query}"},
            )
        if self.delta_expiry_mode == "syncStateNotFound":
            raise GraphError(
                400,
                "syncStateNotFound",
                "The sync state generation is not found; the delta token has expired. Start a "
                "full resynchronisation without a state token.",
            )
        raise GraphError(
            400,
            "resyncRequired",
            "Resync required. Start a full resynchronisation without a state token.",
        )

    def _delta_link(self, version: int, shape: _DeltaShape) -> str:
        token = self._seal_token({"k": "d", "v": version}, shape)
        return f"{self.graph_url}/groups/delta?$deltatoken={token}"

    def _delta_items(
        self, shape: _DeltaShape, since: int | None, start: int, from_ordinal: int
    ) -> list[_DeltaItem]:
        """The round's group objects from ``from_ordinal`` on, in stable (creation) order.

        Every page of a round shows the tenant as of the round's start version (memberships
        rewound through the change log) and the deltaLink resumes from there: a change made
        while a client pages is never half-seen and then netted away.
        """
        org = self.org
        wanted = set(shape.ids) if shape.ids is not None else None
        items: list[_DeltaItem] = []

        def keep(gid: str) -> bool:
            return (wanted is None or gid in wanted) and org.group_ordinal(gid) >= from_ordinal

        if since is None:  # initial round: every group with all its direct members
            snapshot = org.snapshot(start)
            for group in snapshot.groups:
                if keep(group.id):
                    members = snapshot.members(group.id) if shape.members else None
                    items.append(_DeltaItem(org.group_ordinal(group.id), group, None, members))
            return items
        net = org.net_changes(since, start)
        for gid in net.deleted:
            group = org.deleted_groups[gid]
            if keep(gid):
                # Microsoft 365 groups are soft-deleted (restorable): reason "changed".
                reason = "changed" if "Unified" in group.group_types else "deleted"
                items.append(_DeltaItem(org.group_ordinal(gid), group, reason))
        props_tracked = shape.select is None or "displayName" in shape.select
        renamed = set(net.renamed) if props_tracked else set()
        created = set(net.created)
        for gid in dict.fromkeys([*net.created, *net.renamed, *net.members]):
            if not keep(gid):
                continue
            entries = sorted(
                (member, removed)
                for member, removed, by_user_deletion in net.members.get(gid, [])
                if shape.members
                and not (removed and by_user_deletion and self.omit_deleted_user_removals)
            )
            if not entries and gid not in renamed and gid not in created:
                continue  # nothing this round tracks changed
            items.append(
                _DeltaItem(
                    org.group_ordinal(gid),
                    org.find_group(gid),  # if deleted since the round began, next round says so
                    None,
                    [m for m, _ in entries] if shape.members else None,
                    frozenset(m for m, removed in entries if removed),
                )
            )
        items.sort(key=lambda item: item.ordinal)
        return items

    def _delta_fill(
        self, items: list[_DeltaItem], cursor: tuple[int, str], select: tuple[str, ...] | None
    ) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """One page: at most delta_page_groups objects and delta_page_members member entries.

        A group whose members do not fit is cut: the rest follow on the next page(s) in a
        repeat of the same group object (Graph: "the same group id repeats; merge").
        """
        page: list[dict[str, Any]] = []
        budget = self.delta_page_members
        for item in items:
            if len(page) >= self.delta_page_groups:
                return page, (item.ordinal, "")
            after = cursor[1] if item.ordinal == cursor[0] else ""
            body = self._delta_object(item, select)
            if item.members is None:
                page.append(body)
                continue
            offset = bisect.bisect_right(item.members, after) if after else 0
            remaining = len(item.members) - offset
            if remaining <= 0:
                if not after:
                    page.append(body)  # an empty group: no members@delta key
                continue
            if budget == 0:
                return page, (item.ordinal, after)
            take = min(budget, remaining)
            chunk = item.members[offset : offset + take]
            body["members@delta"] = [self._delta_member(m, item.member_removals) for m in chunk]
            page.append(body)
            budget -= take
            if take < remaining:
                return page, (item.ordinal, chunk[-1])
        return page, None

    def _delta_object(self, item: _DeltaItem, select: tuple[str, ...] | None) -> dict[str, Any]:
        if item.removed_reason is not None:
            return {"id": item.group.id, "@removed": {"reason": item.removed_reason}}
        full = _group_full(item.group, self.org.initial_domain)
        if select is None:
            return full
        return {"id": item.group.id, **{name: full.get(name) for name in select}}

    def _delta_member(self, member_id: str, removals: frozenset[str]) -> dict[str, Any]:
        org = self.org
        if member_id in org.users or member_id in org.deleted_users:
            odata = _ODATA_USER
        elif member_id in org.groups or member_id in org.deleted_groups:
            odata = _ODATA_GROUP
        else:
            other = org.others.get(member_id)
            odata = other.odata_type if other else "#microsoft.graph.directoryObject"
        entry: dict[str, Any] = {"@odata.type": odata, "id": member_id}
        if member_id in removals:
            entry["@removed"] = {"reason": "deleted"}
        return entry

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
            text = params["$filter"]
            users = _filter(self._named_users(text, users), text, _USER_FILTERS)
        users = _order(users, params.get("$orderby"), {"displayName": "display_name"})
        return self._page(
            req, params, users, lambda u: render(u.id), self._context("users", select), count
        )

    def _named_users(self, text: str, users: list[User]) -> list[User]:
        """The users a filter can match when each of its alternatives names a sign-in name or
        mail (the lookup of audit-log actors, many per ingest): found by index, not a scan."""
        names: list[str] = []
        for clauses in _parse_filter(text, _USER_FILTERS):
            named = [v for a, v in clauses if a in ("user_principal_name", "mail")]
            if not named or not isinstance(named[0], str):
                return users
            names.append(named[0])
        ids = {uid for name in names for uid in self.org.users_named(name)}
        return [u for u in users if u.id in ids]

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

    # directoryRoles
    def _find_role(self, key: str) -> DirectoryRole:
        lowered = key.lower()
        if lowered.startswith("roletemplateid="):  # alternate key: roleTemplateId={id}
            template = key.split("=", 1)[1].strip("'")
            role = next(
                (r for r in self.org.roles if r.role_template_id.lower() == template.lower()), None
            )
        else:
            if not _GUID_RE.match(key):
                raise GraphError(400, "Request_BadRequest", f"Invalid object identifier '{key}'.")
            role = next((r for r in self.org.roles if r.id == lowered), None)
        if role is None:
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{key}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )
        return role

    @staticmethod
    def _render_role(role: DirectoryRole) -> dict[str, Any]:
        return {
            "id": role.id,
            "deletedDateTime": None,
            "description": role.description,
            "displayName": role.display_name,
            "roleTemplateId": role.role_template_id,
        }

    def _directory_roles(self, req: _Request, segs: list[str], lowered: list[str]) -> _Response:
        """``GET /directoryRoles[/{id}|/roleTemplateId={tid}][/members]``: activated roles."""
        params = req.params()
        if not segs:
            self._check_query(params, set())  # the docs: no OData query parameters
            return _Response(
                200,
                {
                    "@odata.context": self._context("directoryRoles", []),
                    "value": [self._render_role(r) for r in self.org.roles],
                },
            )
        role = self._find_role(segs[0])
        if len(segs) == 1:
            self._check_query(params, set())
            body = {"@odata.context": self._context("directoryRoles", []) + "/$entity"}
            body.update(self._render_role(role))
            return _Response(200, body)
        if lowered[1:] != ["members"]:
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segs[1]}'.")
        self._check_query(params, {"$skiptoken", "$select"})
        select = self._select(params, DIRECTORY_OBJECT_PROPERTIES, "directoryObject")
        members = [m for m in role.members if self.org.object_exists(m)]
        base = self._render_member(select, annotate=True)
        users = self.org.users

        def render(object_id: str) -> dict[str, Any]:
            out = base(object_id)
            user = users.get(object_id)
            if user is not None and not select:
                out["userType"] = user.user_type  # who is a guest admin matters here
            return out

        return self._page(
            req, params, members, render, self._context("directoryObjects", select), False
        )

    # auditLogs
    def _audit_logs(self, req: _Request, segs: list[str], lowered: list[str]) -> _Response:
        """``GET /auditLogs/signIns`` and ``/auditLogs/directoryAudits``: newest first."""
        if req.method != "GET":
            raise _method_not_allowed()
        if len(lowered) != 1 or lowered[0] not in ("signins", "directoryaudits"):
            bad = segs[0] if segs else "auditLogs"
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{bad}'.")
        sign_ins = lowered[0] == "signins"
        self._require(("AuditLog.Read.All",))
        if not sign_ins:
            self._require(("Directory.Read.All",))  # CONTRACTS.md: directoryAudits needs both
        entity = "auditLogs/signIns" if sign_ins else "auditLogs/directoryAudits"
        time_field = "createdDateTime" if sign_ins else "activityDateTime"
        params = req.params()
        self._check_query(params, set(_AUDIT_PARAMS))
        top = self._top(params, default=AUDIT_MAX_PAGE, maximum=AUDIT_MAX_PAGE)
        orderby = params.get("$orderby", "").strip()
        if orderby and re.fullmatch(rf"{time_field}(\s+desc)?", orderby, re.IGNORECASE) is None:
            raise GraphError(400, "Request_UnsupportedQuery", "Unsupported sort property.")
        start, end, equals = _audit_filter(params.get("$filter", ""), time_field, sign_ins)
        listing = "|".join((entity.lower(), params.get("$filter", ""), orderby.lower()))
        now = self.clock()
        token = params.get("$skiptoken")
        cursor: tuple[float, str] | None = None
        as_of = now
        if token is not None:
            as_of, cursor = self._open_audit_token(token, listing)
        start = max(start, as_of - AUDIT_RETENTION)
        if cursor is not None:
            end = min(end, cursor[0])
        stream = self.activity
        render = stream.graph_sign_in if sign_ins else stream.graph_directory_audit
        kind = SIGN_IN if sign_ins else DIRECTORY_AUDIT
        page: list[ActivityEvent] = []
        more = False
        # Every page shows the log as of the first page (as_of): events arriving while a client
        # pages cannot shift it; they are found by the next query.
        for event in stream.events({kind}, start, end, visible_by=as_of):
            if cursor is not None and (event.at, event.id) >= cursor:
                continue
            if equals and not self._audit_match(event, equals, sign_ins):
                continue
            if len(page) == top:
                more = True
                break
            page.append(event)
        body: dict[str, Any] = {"@odata.context": f"{self.graph_url}/$metadata#{entity}"}
        if more:
            last = page[-1]
            pairs = [
                (k, v)
                for k, v in parse_qsl(req.query, keep_blank_values=True)
                if k.lower() != "$skiptoken"
            ]
            pairs.append(("$skiptoken", self._seal_audit_token(as_of, (last.at, last.id), listing)))
            query = urlencode(pairs, quote_via=quote, safe="$,'():")
            body["@odata.nextLink"] = f"{self.graph_url}/{entity}?{query}"
        body["value"] = [render(e) for e in page]
        return _Response(200, body)

    def _audit_match(self, event: ActivityEvent, equals: dict[str, str], sign_ins: bool) -> bool:
        d = self.activity.details(event)
        if sign_ins:
            user = d["user"]
            actual = {
                "userid": d["user_id"],
                "userprincipalname": user.user_principal_name if user else "",
                "appdisplayname": d["app"][0],
            }
        else:
            actual = {
                "initiatedby/user/id": d["actor_id"] or "",
                "activitydisplayname": d["activity"][0],
                "category": d["activity"][1],
            }
        return all(actual.get(k, "").casefold() == v.casefold() for k, v in equals.items())

    def _seal_audit_token(self, as_of: float, cursor: tuple[float, str], listing: str) -> str:
        state = json.dumps(
            [as_of, cursor[0], cursor[1], hashlib.sha256(listing.encode()).hexdigest()[:16]]
        ).encode()
        mac = hmac.new(self._skip_key, b"audit:" + state, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + state).rstrip(b"=").decode()

    def _open_audit_token(self, token: str, listing: str) -> tuple[float, tuple[float, str]]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, state = raw[:16], raw[16:]
            expected = hmac.new(self._skip_key, b"audit:" + state, hashlib.sha256).digest()[:16]
            if not hmac.compare_digest(mac, expected):
                raise ValueError("forged")
            as_of, at, event_id, bound = json.loads(state)
            if bound != hashlib.sha256(listing.encode()).hexdigest()[:16]:
                raise ValueError("another listing")
            return float(as_of), (float(at), str(event_id))
        except (ValueError, TypeError, binascii.Error):
            raise GraphError(400, "Request_BadRequest", "Invalid skip token.") from None

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
            if fault is not None and fault.kind == "respond":
                resp = _inner_answer(fault)
            elif fault is not None:
                resp = self._fault_response(fault, inner)
            else:
                resp = self._dispatch(inner)
        headers = {"Content-Type": resp.content_type, **resp.headers}
        payload = resp.payload
        if resp.content_type == TEXT_TYPE and isinstance(payload, int):
            payload = int(payload)  # $count: the inner body is the bare integer
        return resp.status, headers, payload


def _inner_answer(fault: Fault) -> _Response:
    """A "respond" fault inside $batch: inner bodies are JSON values (text when not JSON)."""
    raw = (fault.body or b"").decode("utf-8", "replace")
    try:
        payload: Any = json.loads(raw) if raw else None
    except ValueError:
        payload = raw
    return _Response(fault.status or 200, payload, fault.content_type)


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


def _parse_filter(text: str, allowed: dict[str, str]) -> list[list[tuple[str, Any]]]:
    """``prop eq literal [and ...] [or ...]`` -> alternatives, each [(attribute, value)]
    ("and" binds tighter than "or", as in OData); anything else is unsupported."""
    outside_quotes = r"(?=(?:[^']*'[^']*')*[^']*$)"
    alternatives: list[list[tuple[str, Any]]] = []
    for alternative in re.split(rf"\s+or\s+{outside_quotes}", text.strip(), flags=re.IGNORECASE):
        clauses: list[tuple[str, Any]] = []
        for part in re.split(rf"\s+and\s+{outside_quotes}", alternative, flags=re.IGNORECASE):
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
        alternatives.append(clauses)
    return alternatives


def _filter(items: list[Any], text: str, allowed: dict[str, str]) -> list[Any]:
    # Strings compare without regard to case, as directory eq does; folded once per value.
    alternatives = [
        [(attr, value.casefold() if isinstance(value, str) else value) for attr, value in clauses]
        for clauses in _parse_filter(text, allowed)
    ]

    def holds(item: Any) -> bool:
        for clauses in alternatives:
            for attr, value in clauses:
                actual = getattr(item, attr)
                if isinstance(value, str) and isinstance(actual, str):
                    if actual.casefold() != value:
                        break
                elif actual != value:
                    break
            else:
                return True
        return False

    return [item for item in items if holds(item)]


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


_AUDIT_CLAUSE_RE = re.compile(
    r"\s*([\w/]+)\s+(ge|gt|le|lt|eq)\s+('(?:[^']|'')*'|[0-9][0-9T:.\-+Z]*)\s*", re.IGNORECASE
)
_AUDIT_EQ_FIELDS = {
    True: ("userid", "userprincipalname", "appdisplayname"),
    False: ("initiatedby/user/id", "activitydisplayname", "category"),
}


def _audit_time(literal: str) -> float:
    text = literal.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise GraphError(
            400, "BadRequest", f"The DateTimeOffset literal '{literal}' is not valid."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _audit_filter(
    text: str, time_field: str, sign_ins: bool
) -> tuple[float, float, dict[str, str]]:
    """``$filter`` of an audit log: time bounds (and/ge/gt/le/lt, unquoted ISO timestamps)
    and a few ``eq`` string filters -> (start, end inclusive, {field: value})."""
    start, end = 0.0, math.inf
    equals: dict[str, str] = {}
    if not text.strip():
        return start, end, equals
    parts = re.split(r"\s+and\s+(?=(?:[^']*'[^']*')*[^']*$)", text.strip(), flags=re.IGNORECASE)
    for part in parts:
        match = _AUDIT_CLAUSE_RE.fullmatch(part)
        if match is None:
            raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
        name, op, literal = match.group(1), match.group(2).lower(), match.group(3)
        if name.lower() == time_field.lower() and not literal.startswith("'"):
            moment = _audit_time(literal)
            if op == "ge":
                start = max(start, moment)
            elif op == "gt":
                start = max(start, moment + 1e-7)
            elif op == "le":
                end = min(end, moment)
            elif op == "lt":
                end = min(end, moment - 1e-7)
            else:
                start, end = max(start, moment), min(end, moment)
        elif name.lower() in _AUDIT_EQ_FIELDS[sign_ins] and op == "eq" and literal.startswith("'"):
            equals[name.lower()] = literal[1:-1].replace("''", "'")
        else:
            raise GraphError(400, "Request_UnsupportedQuery", "Unsupported Query.")
    return start, end, equals


def main(argv: list[str] | None = None) -> None:
    """``python -m groupsync_pipeline.sandbox.graph``: serve the sandbox until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Microsoft Graph sandbox on loopback HTTPS")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument(
        "--evolve-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="advance the tenant one deterministic step every SECONDS since "
        f"{EVOLVE_EPOCH:%Y-%m-%dT%H:%MZ} (e.g. 3600)",
    )
    parser.add_argument(
        "--activity-rate",
        type=float,
        default=DEFAULT_RATE,
        metavar="EVENTS",
        help=f"synthetic audit events per hour at a weekday peak (0: none; default {DEFAULT_RATE})",
    )
    args = parser.parse_args(argv)
    org = build_organisation(seed=args.seed, users=args.users)
    sandbox = GraphSandbox(
        org,
        host=args.host,
        port=args.port,
        evolve_every=args.evolve_every,
        activity_rate=args.activity_rate,
    ).start()
    print(f"base_url      {sandbox.base_url}")
    print(f"graph_url     {sandbox.graph_url}")
    print(f"management    {sandbox.management_url}")
    print(f"tenant_id     {sandbox.tenant_id}")
    print(f"client_id     {sandbox.client_id}")
    print(f"client_secret {sandbox.client_secret}")
    print(f"ca_bundle     {sandbox.ca_bundle}")
    if args.evolve_every:
        print(f"evolve_step   {sandbox.org.steps_applied} (every {args.evolve_every:g}s)")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
