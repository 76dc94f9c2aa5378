"""Microsoft Entra ID / Office 365 through Microsoft Graph v1.0 (app-only, client credentials),
and its audit logs through Graph and the Office 365 Management Activity API.

Contract: shared/api-reference/CONTRACTS.md. msal gets the tokens through this connector's own
httpx client, so one TLS setting (``ca_bundle``) and one timeout cover identity and API calls.
Graph and the Management API each get their own token (their own audience); each token is only
ever sent under its own API's URL.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import queue
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx
import msal
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    stop_when_event_set,
)

from groupsync_pipeline import json_text
from groupsync_pipeline.connectors.base import (
    Account,
    Activity,
    ActivitySource,
    AuthenticationError,
    ConnectorError,
    DeltaExpiredError,
    DeltaPage,
    DirectoryLookup,
    GroupChange,
    GroupNotFoundError,
    MemberPage,
    MemberRef,
    PermissionDeniedError,
    ProgressCallback,
    RemoteGroup,
    UnreadableAccount,
    VendorError,
    close_matches,
)
from groupsync_pipeline.connectors.office365_activity import (
    directory_audit_activity,
    management_activity,
    pick_directory_user,
    sign_in_name_filter,
    signin_activity,
)

PAGE_SIZE = 999  # Graph's documented maximum $top for groups, members and users
PREFETCH_PAGES = 4  # pages fetched ahead of the consumer; bounds memory
BATCH_SIZE = 20  # Graph's documented maximum requests per $batch
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_TYPE = "#microsoft.graph.user"
GROUP_SELECT = "id,displayName,description,mail,groupTypes,securityEnabled,mailEnabled"
MEMBER_SELECT = "id,displayName,mail,userPrincipalName,userType,accountEnabled"
MEMBER_ROWS_SQL = (
    resources.files("groupsync_pipeline.connectors").joinpath("office365_members.sql").read_text()
)
# members is selected so that each page carries members@delta (the membership changes).
DELTA_SELECT = "displayName,description,mail,mailEnabled,securityEnabled,groupTypes,members"
# Graph error codes meaning "the saved delta state is gone: start over" (compared lower case).
_SYNC_RESET_CODES = frozenset({"syncstatenotfound", "syncstateinvalid", "resyncrequired"})
_KIND_PROPERTIES = frozenset({"groupTypes", "securityEnabled", "mailEnabled"})
# GroupChange fields a group can lose (null in Graph), and their Graph property names.
_CLEARABLE = {"description": "description", "mail": "mail"}
# Token audiences of the Graph clouds; any other graph_url (a proxy, the sandbox) asks for the
# public Graph audience.
_GRAPH_AUDIENCES = (
    "graph.microsoft.com",
    "graph.microsoft.us",
    "dod-graph.microsoft.us",
    "microsoftgraph.chinacloudapi.cn",
)
# Which application permission each path needs, to name it in a 403 message (first match).
_PERMISSIONS = (
    ("/groups", "GroupMember.Read.All"),
    ("/users", "User.Read.All"),
    ("/domains", "Domain.Read.All"),
    ("/directoryRoles", "RoleManagement.Read.Directory"),
    ("/roleManagement", "RoleManagement.Read.Directory"),
    ("/auditLogs/directoryAudits", "AuditLog.Read.All (and Directory.Read.All)"),
    ("/auditLogs", "AuditLog.Read.All"),
)
# The Management API has one application permission for the activity feed.
_MANAGEMENT_PERMISSION = "ActivityFeed.Read (Office 365 Management APIs)"
# Token audiences of the Management API's clouds (Enterprise, GCC, GCC High, DoD); any other
# management_url (a proxy, the sandbox) asks for the Enterprise audience.
_MANAGEMENT_AUDIENCES = (
    "manage.office.com",
    "manage-gcc.office.com",
    "manage.office365.us",
    "manage.protection.apps.mil",
)

# --- audit logs ---
ACTIVITY_PAGE_SIZE = 1000  # documented maximum $top of /auditLogs/signIns
GRAPH_ACTIVITY_SOURCES = {  # source -> (path, the time property $filter works on)
    "signIns": ("/auditLogs/signIns", "createdDateTime"),
    "directoryAudits": ("/auditLogs/directoryAudits", "activityDateTime"),
}
# Content types of the Management Activity API (documented list).
MANAGEMENT_CONTENT_TYPES = frozenset(
    {"Audit.AzureActiveDirectory", "Audit.Exchange", "Audit.SharePoint", "Audit.General", "DLP.All"}
)
GRAPH_LOG_RETENTION = timedelta(days=30)  # Entra ID P1/P2 keeps sign-ins and audits 30 days
MANAGEMENT_RETENTION = timedelta(days=7)  # content listing refuses startTime older than 7 days
MANAGEMENT_WINDOW = timedelta(hours=24)  # startTime/endTime at most 24 hours apart
_SUBSCRIPTION_ALREADY_ENABLED = "AF20024"
_MANAGEMENT_PERMISSION_MISSING = "AF10001"  # 401: the token lacks ActivityFeed.Read
_NO_SUBSCRIPTION = "AF20022"  # listing a content type without (or after losing) a subscription
# Roles that are administrator roles whatever their display name says (a tenant can see
# renamed or localized names; the legacy name of Global Administrator was
# "Company Administrator"): Global Administrator, Privileged Role Administrator, Privileged
# Authentication Administrator. Template ids from the Entra ID built-in roles reference.
ADMIN_ROLE_TEMPLATES = frozenset(
    {
        "62e90394-69f5-4237-9190-012177145e10",
        "e8611ab8-c189-46e8-94e1-60213ab1f814",
        "7be44c8a-adaf-4e2a-84d6-ab2649e08a13",
    }
)


class ServiceError(VendorError):
    """An error answer carrying the service's own error code (Graph's or the Management
    API's ``{"error": {"code": ...}}``), for callers that act on particular codes."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, status)
        self.code = code


@dataclass(frozen=True)
class _Api:
    """One of the two APIs: where its URLs live and which token they get."""

    label: str  # for messages: "Graph", "Management API"
    prefix: str  # every URL of this API starts with it; its token goes nowhere else
    scope: str


class _Retryable(Exception):
    """A transient failure: throttling, a 5xx, a dropped connection or a garbled page."""

    def __init__(self, message: str, retry_after: float | None = None, what: str = "") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.what = what or message  # short, for the log line of each wait: "429", "ReadTimeout"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: integer, fractional ("2.128") or HTTP-date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def batch_count(body: Any) -> int | None:
    """A $count answered inside $batch: a number, its text, or its text base64-encoded
    (Graph encodes inner bodies that are not JSON). Base64 of digits never reads as digits:
    a digit-only text decodes to a first byte above 0xBF, so the two cannot be confused."""
    if isinstance(body, bool):
        return None
    if isinstance(body, int):
        return body
    if not isinstance(body, str):
        return None
    text = body.strip()
    with contextlib.suppress(ValueError, binascii.Error):
        decoded = base64.b64decode(text, validate=True).decode("ascii").strip()
        if decoded.isdigit():
            return int(decoded)
    return int(text) if text.isdigit() else None


def graph_scope(graph_url: str) -> str:
    host = urlsplit(graph_url).hostname or ""
    if host in _GRAPH_AUDIENCES:
        return f"https://{host}/.default"
    return "https://graph.microsoft.com/.default"


def management_scope(management_url: str) -> str:
    host = urlsplit(management_url).hostname or ""
    if host in _MANAGEMENT_AUDIENCES:
        return f"https://{host}/.default"
    return "https://manage.office.com/.default"


def is_admin_role(role: dict[str, Any]) -> bool:
    """Whether an activated directory role is an administrator role: its display name ends
    with "Administrator" (every built-in admin role's does, readers' and others' do not), or
    its template is one of ADMIN_ROLE_TEMPLATES."""
    name = role.get("displayName")
    if isinstance(name, str) and name.strip().casefold().endswith("administrator"):
        return True
    template = role.get("roleTemplateId")
    return isinstance(template, str) and template.strip().lower() in ADMIN_ROLE_TEMPLATES


def graph_time(moment: datetime) -> str:
    """A UTC time as Graph's $filter takes it: 2026-11-27T04:00:00Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def management_time(moment: datetime) -> str:
    """A UTC time as the Management API documents startTime/endTime: YYYY-MM-DDTHH:MM:SS."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _utc(moment: datetime) -> datetime:
    # The interface says both bounds are UTC; a naive one is taken as such.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def group_kind(group: dict[str, Any]) -> str:
    if "Unified" in (group.get("groupTypes") or []):
        return "microsoft365"
    security, mail = bool(group.get("securityEnabled")), bool(group.get("mailEnabled"))
    if security and mail:
        return "mail-enabled security"
    if security:
        return "security"
    return "distribution" if mail else "other"


def account_from_user(obj: dict[str, Any]) -> Account:
    """One Graph user object as an Account. office365_members.sql reads members by the same
    rules: a value of another JSON type than documented reads as None."""
    upn = _text(obj.get("userPrincipalName"))
    user_type = _text(obj.get("userType"))
    enabled = obj.get("accountEnabled")
    return Account(
        account_id=obj["id"],
        email=_text(obj.get("mail")) or upn,
        display_name=_text(obj.get("displayName")),
        user_principal_name=upn,
        user_type=user_type,
        # Guests, and external people invited as members (their UPN carries #EXT#).
        is_external=user_type == "Guest" or "#EXT#" in (upn or "").upper(),
        enabled=enabled if isinstance(enabled, bool) else None,
    )


def _people(items: Iterable[Any]) -> Iterator[Account]:
    """The users among member objects (nested groups and other members left out)."""
    for obj in items:
        if isinstance(obj, dict) and _text(obj.get("id")) and _member_type(obj) == "user":
            yield account_from_user(obj)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _group_change(obj: Any) -> tuple[GroupChange, int]:
    """One value item of a groups/delta page, and how many of its member entries had no id."""
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
        raise VendorError("Graph GET /groups/delta: a changed group has no id (malformed answer)")
    reason: str | None = None
    if obj.get("@removed") is not None:
        raw = obj["@removed"].get("reason") if isinstance(obj["@removed"], dict) else None
        reason = raw if isinstance(raw, str) and raw else "unknown"
    entries = obj.get("members@delta")
    invalid = 0
    if not isinstance(entries, list):
        invalid = 0 if entries is None else 1
        entries = []
    added: list[MemberRef] = []
    removed: list[MemberRef] = []
    for entry in entries:
        member_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(member_id, str) or not member_id:
            invalid += 1
            continue
        ref = MemberRef(member_id, _member_type(entry))
        (removed if entry.get("@removed") is not None else added).append(ref)
    group_types = obj.get("groupTypes")
    group_types = group_types if isinstance(group_types, list) else []
    # The kind needs all three properties (or "Unified"); later pages may repeat only the id.
    knows_kind = "Unified" in group_types or obj.keys() >= _KIND_PROPERTIES
    change = GroupChange(
        remote_id=obj["id"],
        name=_text(obj.get("displayName")),
        description=_text(obj.get("description")),
        mail=_text(obj.get("mail")),
        kind=group_kind({**obj, "groupTypes": group_types}) if knows_kind else None,
        removed=reason,
        members_added=added,
        members_removed=removed,
        # Present with null: cleared in the app (absent: not carried, i.e. unchanged).
        cleared=frozenset(
            field for field, key in _CLEARABLE.items() if key in obj and obj[key] is None
        ),
    )
    return change, invalid


def _inner_error(status: int, body: Any) -> str:
    """An inner $batch answer's status, Graph error code and message."""
    error = body.get("error") if isinstance(body, dict) else None
    text = f"HTTP {status}"
    if isinstance(error, dict):
        if error.get("code"):
            text += f": {str(error['code'])[:100]}"
        if error.get("message"):
            text += f" - {str(error['message'])[:300]}"
    return text


def _segment(value: str) -> str:
    """An id as one URL path segment, whatever characters it holds."""
    return quote(value, safe="")


def _inner_status(status: int, body: Any) -> str:
    """An inner answer's status and Graph error code only (what a run's metadata may show:
    the message can quote the request)."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, str) or not code.strip():
        return f"HTTP {status}"
    # The code is the service's text: one short printable token, whatever it sent.
    clean = "".join(c if c.isprintable() and not c.isspace() else "?" for c in code.strip())
    return f"HTTP {status} {clean[:64]}"


def _member_type(obj: dict[str, Any]) -> str:
    odata_type = obj.get("@odata.type")
    if isinstance(odata_type, str) and odata_type:
        return odata_type.rsplit(".", 1)[-1]
    # Some answers omit @odata.type; only users carry a userPrincipalName.
    return "user" if "userPrincipalName" in obj else "unknown"


class GraphConnector:
    """Reads groups and their members from one Microsoft 365 tenant."""

    app = "office365"
    member_rows_sql = MEMBER_ROWS_SQL

    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        authority_host: str = "https://login.microsoftonline.com",
        graph_url: str = "https://graph.microsoft.com/v1.0",
        management_url: str = "https://manage.office.com",
        ca_bundle: str | None = None,
        timeout: float = 60.0,
        max_attempts: int = 8,
        max_retry_wait: float = 300.0,
        backoff_initial: float = 1.0,
        on_page: ProgressCallback | None = None,
        log: Callable[[str], None] | None = None,
        publisher_identifier: str | None = None,
    ) -> None:
        """``log`` gets one line per retry wait (status, seconds, attempt); it may be called
        from the connector's fetching threads. ``publisher_identifier``: sent as
        PublisherIdentifier on every Management API request (default: ``tenant_id``)."""
        self.graph_url = graph_url.rstrip("/")
        self._origin = "{0.scheme}://{0.netloc}".format(urlsplit(self.graph_url))
        # The Office 365 Management Activity API root (without /api/v1.0).
        self.management_url = management_url.rstrip("/")
        self._tenant_id = tenant_id
        # Microsoft counts Management API throttling per PublisherIdentifier; requests without
        # one share a common quota.
        self._publisher = publisher_identifier or tenant_id
        self._authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = graph_scope(self.graph_url)
        self._graph_api = _Api("Graph", self._origin + "/", self._scope)
        self._management_api = _Api(
            "Management API", self.management_url + "/", management_scope(self.management_url)
        )
        if self._management_api.prefix == self._graph_api.prefix:
            raise ValueError("management_url must not be the Graph host's root: tokens would mix")
        # Content types whose Management API subscription this connector has started.
        self._subscribed: set[str] = set()
        # Audit events dropped for want of an id or a readable time, since this connector
        # was made (all sources): they cannot be stored or deduplicated.
        self.skipped_activities = 0
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        )
        self._http = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            headers={"User-Agent": "groupsync/0.1"},
            follow_redirects=False,
        )
        self._msal: msal.ConfidentialClientApplication | None = None
        self._max_attempts = max_attempts
        self._max_retry_wait = max_retry_wait
        self._backoff_initial = backoff_initial
        self.on_page = on_page
        self._log = log
        # Pages are fetched on a background thread: the token and msal's set-up are shared.
        self._token_lock = threading.Lock()

    def __repr__(self) -> str:  # never show the secret
        return (
            f"GraphConnector(authority={self._authority!r}, graph_url={self.graph_url!r}, "
            f"management_url={self.management_url!r})"
        )

    def __enter__(self) -> GraphConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- authentication -------------------------------------------------------------------

    def _token(self, force_refresh: bool = False, scope: str | None = None) -> str:
        """An app-only token for ``scope`` (Graph's by default); msal caches one per scope."""
        with self._token_lock:
            return self._token_locked(force_refresh, scope or self._scope)

    def _token_locked(self, force_refresh: bool, scope: str) -> str:
        if self._msal is None:
            try:
                # The constructor fetches the openid-configuration, so it can fail on network.
                self._msal = msal.ConfidentialClientApplication(
                    self._client_id,
                    client_credential=self._client_secret,
                    authority=self._authority,
                    instance_discovery=False,
                    http_client=self._http,
                )
            except (ValueError, httpx.HTTPError, json.JSONDecodeError) as exc:
                raise AuthenticationError(
                    f"cannot use the identity platform at {self._authority}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        if force_refresh:
            self._forget_token(scope)
        try:
            result = self._msal.acquire_token_for_client(scopes=[scope])
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthenticationError(
                f"token request to {self._authority} failed: {type(exc).__name__}: {exc}"
            ) from None
        if "access_token" not in result:
            description = str(result.get("error_description") or "").splitlines()
            raise AuthenticationError(
                f"token request to {self._authority} refused: {result.get('error')}: "
                f"{description[0] if description else 'no description'}"
            )
        return result["access_token"]

    def _forget_token(self, scope: str) -> None:
        """Drop the cached token of this scope only: the other API's token is still good."""
        assert self._msal is not None
        cache = self._msal.token_cache
        found = [
            entry
            for entry in cache.search(
                msal.TokenCache.CredentialType.ACCESS_TOKEN,
                query={"client_id": self._client_id, "home_account_id": None},
            )
            if scope.casefold() in str(entry.get("target", "")).casefold().split()
        ]
        for entry in found:
            cache.remove_at(entry)
        if not found:  # stored under another target spelling: drop all rather than reuse it
            self._msal.remove_tokens_for_client()

    # --- HTTP with retries ------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        """The service's Retry-After when it gave one, else exponential backoff with jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        backoff = self._backoff_initial * 2 ** (state.attempt_number - 1)
        return min(30.0, backoff) + random.uniform(0, self._backoff_initial)

    def _report_wait(
        self, api: _Api, what: str, url: str, seconds: float, next_attempt: int
    ) -> None:
        """Tell the caller's log about a retry wait: a throttled run is not a silent one."""
        if self._log is not None:
            self._log(
                f"{api.label} {what} on {self._api_path(url, api)}: waiting {seconds:.1f} s "
                f"(attempt {next_attempt} of {self._max_attempts})"
            )

    def _api_path(self, url: str, api: _Api) -> str:
        """The URL's path below the API's root (no query: it can hold long state tokens)."""
        root = urlsplit(self.graph_url if api is self._graph_api else self.management_url).path
        path = self._path(url)
        return path[len(root) :] if root and path.startswith(root + "/") else path

    def _request_json(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        cancel: threading.Event | None = None,
    ) -> Any:
        """Send one Graph request, retrying transient failures; return the parsed body."""
        return self._request(
            method,
            url,
            api=self._graph_api,
            params=params,
            headers=headers,
            json_body=json_body,
            cancel=cancel,
        )[0]

    def _request(
        self,
        method: str,
        url: str,
        *,
        api: _Api,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        cancel: threading.Event | None = None,
    ) -> tuple[Any, httpx.Headers]:
        """Send one request to ``api`` (with its token), retrying transient failures; return
        the parsed body and the response headers.

        Retries stop after ``max_attempts``, before a wait would pass ``max_retry_wait`` in
        all, or as soon as ``cancel`` is set (its waits are interruptible). A URL outside the
        API's own prefix is refused before anything is sent: the token would go along.
        """
        if not self._belongs(url, api):
            raise ConnectorError(
                f"refusing to send the {api.label} token to {url:.100}: it is not under "
                f"{api.prefix}"
            )
        cancel = cancel or threading.Event()

        def report_wait(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            what = exc.what if isinstance(exc, _Retryable) else "error"
            self._report_wait(api, what, url, state.upcoming_sleep, state.attempt_number + 1)

        retrying = Retrying(
            retry=retry_if_exception_type(_Retryable),
            wait=self._wait,
            before_sleep=report_wait,
            stop=(
                stop_after_attempt(self._max_attempts)
                | stop_before_delay(self._max_retry_wait)
                | stop_when_event_set(cancel)
            ),
            sleep=cancel.wait,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._send_once(api, method, url, params, headers, json_body)
        except _Retryable as exc:
            raise VendorError(
                f"{api.label} {method} {self._path(url)} still failing after "
                f"{retrying.statistics.get('attempt_number', '?')} attempts: {exc}"
            ) from None
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    def _send_once(
        self,
        api: _Api,
        method: str,
        url: str,
        params: dict[str, str] | None,
        headers: dict[str, str] | None,
        json_body: Any,
    ) -> tuple[Any, httpx.Headers]:
        response = None
        for refreshed in (False, True):  # a 401 refreshes the token once
            token = self._token(force_refresh=refreshed, scope=api.scope)
            request_headers = {"Authorization": f"Bearer {token}"}
            request_headers.update(headers or {})
            try:
                response = self._http.request(
                    method, url, params=params, headers=request_headers, json=json_body
                )
                body = response.content  # read fully: a truncated body raises here
            except httpx.TransportError as exc:
                raise _Retryable(
                    f"{type(exc).__name__}: {exc or 'connection problem'}",
                    what=type(exc).__name__,
                ) from None
            if response.status_code != 401:
                break
        assert response is not None
        status = response.status_code
        where = f"{api.label} {method} {self._path(url)}"
        if status in RETRY_STATUSES:
            raise _Retryable(
                self._describe(response),
                parse_retry_after(response.headers.get("Retry-After")),
                str(status),
            )
        if self._sync_reset(url, response):
            location = response.headers.get("Location")
            raise DeltaExpiredError(
                f"{where}: Graph no longer accepts the saved delta state "
                f"({self._describe(response)}"
                + (f"; restart at {location:.100}" if location else "")
                + "): discard it and run a full resync"
            )
        if status == 401 and self._error_code(response) == _MANAGEMENT_PERMISSION_MISSING:
            # The Management API answers a missing permission with 401 (after the refresh,
            # which would have picked up a permission granted since the last token).
            raise PermissionDeniedError(
                f"{where} denied: the app registration needs the application permission "
                f"{_MANAGEMENT_PERMISSION} (with admin consent). {self._describe(response)}"
            )
        if status == 401:
            raise AuthenticationError(
                f"{where}: the token was refused twice: {self._describe(response)}"
            )
        if status == 403:
            described = self._describe(response)
            if "NonPremiumTenant" in described:  # signIns without an Entra ID P1/P2 licence
                raise PermissionDeniedError(
                    f"{where} denied: sign-in logs need a Microsoft Entra ID P1 or P2 licence "
                    f"in the tenant. {described}"
                )
            raise PermissionDeniedError(
                f"{where} denied: the app registration needs the application permission "
                f"{self._permission_for(url, api)} (with admin consent). {described}"
            )
        if 300 <= status < 400:  # never followed: the bearer token would go along
            location = response.headers.get("Location", "no Location")
            raise VendorError(f"{where}: unexpected redirect HTTP {status} to {location}", status)
        if status >= 400:
            raise ServiceError(
                f"{where}: {self._describe(response)}", status, self._error_code(response)
            )
        if response.headers.get("content-type", "").startswith("text/plain"):
            return body.decode("utf-8", "replace"), response.headers
        try:
            return json_text.parse(body), response.headers
        except ValueError:
            problem = (
                f"HTTP {status} with a body that is not JSON "
                f"({response.headers.get('content-type', 'no content type')}): "
                f"{body[:80].decode('utf-8', 'replace')!r}"
            )
            if status == 200:  # a proxy's error page or a cut answer: worth another try
                raise _Retryable(problem, what="HTTP 200 not JSON") from None
            raise VendorError(f"{where}: {problem}", status) from None

    def _path(self, url: str) -> str:
        return urlsplit(url).path

    def _on_graph_host(self, url: str) -> bool:
        # The bearer token goes with every request: only ever to the configured Graph host
        # (and never under the Management API's root, should both share a host).
        return self._belongs(url, self._graph_api)

    def _belongs(self, url: str, api: _Api) -> bool:
        """Whether ``url`` is one of ``api``'s: only then may it carry that API's token."""
        if not url.startswith(api.prefix):
            return False
        other = self._management_api if api is self._graph_api else self._graph_api
        # The longer prefix wins when one API lives under the other's host (the sandbox).
        return not (len(other.prefix) > len(api.prefix) and url.startswith(other.prefix))

    def _sync_reset(self, url: str, response: httpx.Response) -> bool:
        """Whether a delta query's answer says its state expired or is invalid (full resync)."""
        status = response.status_code
        if not 400 <= status < 500 or not self._path(url).rstrip("/").lower().endswith("/delta"):
            return False
        if status == 410:  # Gone: with or without a Location for a fresh start
            return True
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            return False
        code = error.get("code") if isinstance(error, dict) else None
        return isinstance(code, str) and code.lower() in _SYNC_RESET_CODES

    def _permission_for(self, url: str, api: _Api | None = None) -> str:
        if api is self._management_api:
            return _MANAGEMENT_PERMISSION
        path = self._path(url).removeprefix(urlsplit(self.graph_url).path)
        for prefix, permission in _PERMISSIONS:
            if path.startswith(prefix):
                return permission
        return "Directory.Read.All"

    @staticmethod
    def _error_code(response: httpx.Response) -> str | None:
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            return None
        code = error.get("code") if isinstance(error, dict) else None
        return str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None

    @staticmethod
    def _describe(response: httpx.Response) -> str:
        """Status, the vendor's error code and message, and the request id for support."""
        code = message = request_id = None
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            inner = error.get("innerError") or error.get("innererror")
            if isinstance(inner, dict):
                request_id = inner.get("request-id")
        request_id = request_id or response.headers.get("request-id")
        text = f"HTTP {response.status_code}"
        if code:
            text += f": {str(code)[:100]}"
        details = [str(message)[:300]] if message else []
        if request_id:
            details.append(f"request-id {str(request_id)[:100]}")
        return text + (" - " + "; ".join(details) if details else "")

    def _pages(
        self, path: str, params: dict[str, str] | None, *, delta: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Follow @odata.nextLink as given until the last page.

        ``path`` is under graph_url, or an absolute URL already checked to be on its host.
        With ``delta``, the last page must carry @odata.deltaLink; it is made absolute (and
        checked like nextLinks) in place, and dropped from any page that has a nextLink.

        A background thread fetches ahead (at most PREFETCH_PAGES pages held) so parsing and
        storing overlap the service's time to answer. When the caller stops early, the thread
        is told to stop; its retry waits end at once.
        """
        ahead: queue.Queue[tuple[dict[str, Any] | None, BaseException | None]] = queue.Queue(
            maxsize=PREFETCH_PAGES
        )
        stop = threading.Event()

        def hand_over(item: tuple[dict[str, Any] | None, BaseException | None]) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ahead.put(item, timeout=0.1)
                    return True
            return False

        def fetch() -> None:
            url: str | None = path if "://" in path else f"{self.graph_url}{path}"
            query: dict[str, str] | None = params
            try:
                while url:
                    page = self._request_json("GET", url, params=query, cancel=stop)
                    if (
                        delta
                        and isinstance(page, dict)
                        and page.get("value") is None
                        and isinstance(page.get("@odata.deltaLink"), str)
                    ):
                        page["value"] = []  # $deltatoken=latest may answer with the link alone
                    if not isinstance(page, dict) or not isinstance(page.get("value"), list):
                        raise VendorError(
                            f"Graph GET {self._path(url)}: answer has no 'value' list"
                        )
                    next_link = page.get("@odata.nextLink")
                    if next_link is not None and not isinstance(next_link, str):
                        raise VendorError(f"Graph GET {self._path(url)}: nextLink is not a URL")
                    if delta:
                        self._resolve_delta_link(url, page)
                    url, query = (urljoin(url, next_link) if next_link else None), None
                    if url and not self._on_graph_host(url):
                        raise VendorError(f"Graph returned a nextLink to another host: {url:.100}")
                    if not hand_over((page, None)):
                        return
                hand_over((None, None))
            except BaseException as exc:  # whatever ends this thread is raised in the caller's
                hand_over((None, exc))

        fetcher = threading.Thread(target=fetch, name="graph-pages", daemon=True)
        fetcher.start()
        try:
            while True:
                page, error = ahead.get()
                if error is not None:
                    raise error
                if page is None:
                    return
                yield page
        finally:
            stop.set()
            # A request in flight ends at its timeout at worst; the thread is a daemon.
            fetcher.join(timeout=1.0)

    def _resolve_delta_link(self, url: str, page: dict[str, Any]) -> None:
        if page.get("@odata.nextLink"):
            page.pop("@odata.deltaLink", None)  # only the final page's link is the new state
            return
        link = page.get("@odata.deltaLink")
        if not isinstance(link, str) or not link:
            raise VendorError(
                f"Graph GET {self._path(url)}: a delta page has neither a nextLink nor a "
                "deltaLink (malformed answer)"
            )
        link = urljoin(url, link)
        # Refused now rather than saved and refused at the next sync.
        if not self._on_graph_host(link):
            raise VendorError(f"Graph returned a deltaLink to another host: {link:.100}")
        page["@odata.deltaLink"] = link

    def _batch_get(
        self, urls: list[str], headers: dict[str, str] | None = None
    ) -> list[tuple[int, Any]]:
        """GET up to BATCH_SIZE relative URLs in one $batch: (status, body) for each, in order.

        Inner throttling and 5xx (and items Graph left unanswered) are retried within the same
        budget as any request, honouring the inner Retry-After; what still fails at the end is
        returned with its last status (0: never answered). An inner 401/403 stops the retries:
        the caller names the permission.
        """
        results: list[tuple[int, Any]] = [(0, None)] * len(urls)
        pending = list(range(len(urls)))
        deadline = time.monotonic() + self._max_retry_wait
        for attempt in range(1, self._max_attempts + 1):
            requests: list[dict[str, Any]] = [
                {"id": str(i), "method": "GET", "url": urls[i]} for i in pending
            ]
            for request in requests if headers else ():
                request["headers"] = headers
            answer = self._request_json(
                "POST", f"{self.graph_url}/$batch", json_body={"requests": requests}
            )
            responses = answer.get("responses") if isinstance(answer, dict) else None
            if not isinstance(responses, list):
                raise VendorError("Graph POST /$batch: answer has no 'responses' list")
            by_id = {str(i): i for i in pending}
            answered: set[int] = set()
            backoff = self._backoff_initial * 2 ** (attempt - 1)
            wait = 0.0
            for item in responses:
                index = by_id.get(str(item.get("id"))) if isinstance(item, dict) else None
                if index is None:
                    continue
                status = item.get("status")
                status = status if isinstance(status, int) else 0
                results[index] = (status, item.get("body"))
                answered.add(index)
                if status in RETRY_STATUSES:
                    inner = item.get("headers")
                    inner = (
                        {str(k).lower(): v for k, v in inner.items()}
                        if isinstance(inner, dict)
                        else {}
                    )
                    after = parse_retry_after(str(inner.get("retry-after") or ""))
                    wait = max(wait, after if after is not None else backoff)
            retry = [i for i in pending if i not in answered or results[i][0] in RETRY_STATUSES]
            if any(i not in answered for i in retry):
                wait = max(wait, backoff)
            denied = any(results[i][0] in (401, 403) for i in pending)
            if not retry or denied or attempt == self._max_attempts:
                break
            if time.monotonic() + wait > deadline:
                break
            statuses = sorted({results[i][0] for i in retry if i in answered})
            what = "/".join(map(str, statuses)) if statuses else "no answer"
            self._report_wait(
                self._graph_api,
                f"{what} for {len(retry)} of {len(pending)} requests",
                f"{self.graph_url}/$batch",
                wait,
                attempt + 1,
            )
            time.sleep(wait)
            pending = retry
        return results

    # --- groups -----------------------------------------------------------------------------

    def group_catalog(self) -> Iterator[RemoteGroup]:
        """Every group in the tenant, with its number of people, in pages of 999."""
        for page in self._pages("/groups", {"$select": GROUP_SELECT, "$top": str(PAGE_SIZE)}):
            groups = [g for g in page["value"] if isinstance(g, dict) and g.get("id")]
            counts = self._member_counts([g["id"] for g in groups])
            for group in groups:
                yield self._remote_group(group, counts.get(group["id"]))

    def _remote_group(self, group: dict[str, Any], count: int | None) -> RemoteGroup:
        return RemoteGroup(
            remote_id=group["id"],
            name=group.get("displayName") or group["id"],
            description=group.get("description"),
            mail=group.get("mail"),
            kind=group_kind(group),
            member_count=count,
        )

    def member_count(self, remote_id: str) -> int:
        """People in the group, nested groups flattened, as Graph counts them."""
        text = self._request_json(
            "GET",
            f"{self.graph_url}/groups/{_segment(remote_id)}/transitiveMembers/microsoft.graph.user"
            "/$count",
            headers={"ConsistencyLevel": "eventual"},
        )
        count = batch_count(text)
        if count is None:
            raise VendorError(f"Graph $count for group {remote_id} is not a number: {text!r:.40}")
        return count

    def _member_counts(self, group_ids: list[str]) -> dict[str, int]:
        """Counts for many groups in $batch calls of 20.

        Inner throttling is retried within the same budget as any request; an inner 401/403
        fails like a top-level one; a group whose count cannot be had (deleted meanwhile,
        still throttled at the end) is left out and its count stays unknown.
        """
        counts: dict[str, int] = {}
        for start in range(0, len(group_ids), BATCH_SIZE):
            chunk = group_ids[start : start + BATCH_SIZE]
            urls = [
                f"/groups/{_segment(gid)}/transitiveMembers/microsoft.graph.user/$count"
                for gid in chunk
            ]
            answers = self._batch_get(urls, {"ConsistencyLevel": "eventual"})
            for gid, (status, body) in zip(chunk, answers, strict=True):
                if status in (401, 403):
                    raise PermissionDeniedError(
                        f"Graph denied counting the members of group {gid} (HTTP {status} "
                        f"inside $batch): the app registration needs the application "
                        f"permission GroupMember.Read.All (with admin consent)."
                    )
                count = batch_count(body) if status == 200 else None
                if count is not None:
                    counts[gid] = count
        return counts

    def find_group(self, reference: str) -> RemoteGroup:
        """A group by id or exact display name; otherwise an error listing close matches."""
        reference = reference.strip()
        if not reference:
            raise GroupNotFoundError("no group given: name a group id or its exact display name")
        by_id = self._group_by_id(reference)
        if by_id is not None:
            return self._remote_group(by_id, self.member_count(by_id["id"]))
        literal = reference.replace("'", "''")  # OData string literal escaping
        # Graph compares display names without regard to case; an import wants the exact name.
        found = [
            group
            for page in self._pages(
                "/groups", {"$filter": f"displayName eq '{literal}'", "$select": GROUP_SELECT}
            )
            for group in page["value"]
            if isinstance(group, dict) and group.get("displayName") == reference and group.get("id")
        ]
        if len(found) == 1:
            return self._remote_group(found[0], self.member_count(found[0]["id"]))
        if len(found) > 1:
            ids = ", ".join(g["id"] for g in found)
            raise GroupNotFoundError(
                f"{len(found)} groups are named '{reference}'; give the group id: {ids}"
            )
        names = {
            f"{g.get('displayName')} ({g['id']})": str(g.get("displayName") or "")
            for page in self._pages("/groups", {"$select": "id,displayName", "$top": "999"})
            for g in page["value"]
            if isinstance(g, dict) and g.get("id")
        }
        matches = close_matches(reference, names)
        hint = f"; close matches: {'; '.join(matches)}" if matches else ""
        raise GroupNotFoundError(
            f"no group has the id or the exact name '{reference}' in this tenant{hint}"
        )

    def _group_by_id(self, reference: str) -> dict[str, Any] | None:
        """The group whose id is ``reference``, whatever the reference's shape; None when
        Graph's answer says it is no group id (404; 400 "Invalid object identifier"; any
        client error about the path, as a name such as "$count" or "HR (EU)" can get)."""
        if reference in (".", ".."):  # a dot segment would change the URL's path
            return None
        try:
            group = self._request_json(
                "GET",
                f"{self.graph_url}/groups/{_segment(reference)}",
                params={"$select": GROUP_SELECT},
            )
        except ServiceError as exc:  # 401/403 are other errors; 429/5xx were retried
            if exc.status is not None and 400 <= exc.status < 500:
                return None
            raise
        # A name such as "delta" or "$count" reaches another function of /groups: only an
        # answer that is this very group counts.
        if (
            isinstance(group, dict)
            and isinstance(group.get("id"), str)
            and group["id"].casefold() == reference.casefold()
        ):
            return group
        return None

    def group_members(self, remote_id: str) -> Iterator[MemberPage]:
        """The group's members, nested groups flattened, page by page (bounded memory), as
        Graph lists them: ``member_rows_sql`` reads the items."""
        members = 0
        params = {"$select": MEMBER_SELECT, "$top": str(PAGE_SIZE)}
        path = f"/groups/{_segment(remote_id)}/transitiveMembers"
        for pages, page in enumerate(self._pages(path, params), start=1):
            members += len(page["value"])
            if self.on_page:
                self.on_page(pages, members)
            yield MemberPage(items=page["value"])

    # --- change tracking (delta query) ------------------------------------------------------

    def group_delta(self, delta_link: str | None = None) -> Iterator[DeltaPage]:
        """Changes to groups and their direct members, page by page (bounded memory).

        Without ``delta_link``: every group with all its members (the first round of change
        tracking). With the link a previous round ended with: what changed since. Follows
        @odata.nextLink until the page carrying @odata.deltaLink; that final DeltaPage's
        ``delta_link`` is the state to save for the next call.

        Changes are not merged: Graph splits a large group's members over several objects
        with the same id, on one page or on later ones, and a group can change again later
        in the round. Apply them in the order they come. Members are direct (nested groups
        arrive as members of type "group"); users deleted for good may never show as removed.

        Raises DeltaExpiredError when Graph no longer accepts ``delta_link`` (full resync),
        and ConnectorError for a link that is not on the configured Graph host (never
        followed: the token would go along). ``on_page`` gets (pages, member changes so far).
        """
        if delta_link is None:
            start, params = "/groups/delta", {"$select": DELTA_SELECT}
        elif isinstance(delta_link, str) and self._on_graph_host(delta_link):
            start, params = delta_link, None
        else:
            raise ConnectorError(
                f"refusing the saved delta link {str(delta_link):.100}: it is not on the "
                f"configured Graph host {self._origin}; discard it and run a full resync"
            )
        members = 0
        for pages, page in enumerate(self._pages(start, params, delta=True), start=1):
            result = DeltaPage(changes=[], delta_link=page.get("@odata.deltaLink"))
            for obj in page["value"]:
                change, invalid = _group_change(obj)
                result.changes.append(change)
                result.invalid_members += invalid
                members += len(change.members_added) + len(change.members_removed)
            if self.on_page:
                self.on_page(pages, members)
            yield result

    def latest_delta_link(self) -> str:
        """A delta link meaning "from now on", read without listing the tenant.

        For starting change tracking after a full import made another way; changes made
        between that import and this call are missed, so take the link first.
        """
        link: str | None = None
        params = {"$deltatoken": "latest", "$select": DELTA_SELECT}
        for page in self._pages("/groups/delta", params, delta=True):
            link = page.get("@odata.deltaLink") or link
        if not link:  # _pages ensures the last page has one; kept for the type checker
            raise VendorError("Graph GET /groups/delta: no deltaLink in the answer")
        return link

    def users_by_id(self, user_ids: Iterable[str]) -> Iterator[Account | UnreadableAccount]:
        """Account details for these user ids (e.g. members a delta added), 20 per $batch.

        Yielded in the order asked; repeated ids are asked once; ids of users no longer in
        the tenant (inner 404) are skipped. A user Graph answers for with another client error
        (400, 409, ...) or with something that is not a user is yielded as an
        UnreadableAccount with the status and Graph's error code: one person must not stop
        the others. Inner throttling and 5xx are retried within the usual budget; still
        failing after it is a VendorError, and an inner 401/403 is a PermissionDeniedError.
        """
        seen: set[str] = set()
        chunk: list[str] = []
        for user_id in user_ids:
            if not isinstance(user_id, str) or not user_id or user_id in seen:
                continue
            seen.add(user_id)
            chunk.append(user_id)
            if len(chunk) == BATCH_SIZE:
                yield from self._users_batch(chunk)
                chunk = []
        if chunk:
            yield from self._users_batch(chunk)

    def _users_batch(self, user_ids: list[str]) -> Iterator[Account | UnreadableAccount]:
        # Quoted: an id (or a UPN with #EXT#) must stay one path segment of the inner URL.
        urls = [f"/users/{quote(uid, safe='')}?$select={MEMBER_SELECT}" for uid in user_ids]
        for user_id, (status, body) in zip(user_ids, self._batch_get(urls), strict=True):
            if status == 404:  # deleted since it was seen as a member
                continue
            if status in (401, 403):
                raise PermissionDeniedError(
                    f"Graph denied reading user {user_id} (HTTP {status} inside $batch): the "
                    "app registration needs the application permission User.Read.All (with "
                    "admin consent)."
                )
            if status == 200 and isinstance(body, dict) and isinstance(body.get("id"), str):
                yield account_from_user(body)
            elif status == 200:
                yield UnreadableAccount(user_id, "HTTP 200: an answer that is not a user")
            elif status in RETRY_STATUSES:
                raise VendorError(
                    f"Graph GET /users/{user_id:.60} inside $batch: still failing after "
                    f"retries ({_inner_error(status, body)})",
                    status,
                )
            elif 400 <= status < 500:  # this person only: the others are still read
                yield UnreadableAccount(user_id, _inner_status(status, body))
            else:
                problem = (
                    "no answer with a status for it, even after retries"
                    if status == 0
                    else _inner_error(status, body)
                )
                raise VendorError(
                    f"Graph GET /users/{user_id:.60} inside $batch: {problem}", status
                )

    # --- actors of audit events, by sign-in name --------------------------------------------

    def users_by_sign_in_name(self, names: Iterable[str]) -> DirectoryLookup:
        """Directory accounts for the sign-in names or email addresses audit events name their
        actors by (file events carry no directory id), one filtered /users read per name, 20
        per $batch.

        Each name is asked as ``userPrincipalName eq '<name>' or mail eq '<name>'`` (guests'
        UPNs carry #EXT#, in any case). A name without "@" is neither: absent without asking.
        A name Graph refuses (an inner 4xx) or keeps failing on after the retries is in
        ``failed``; the others are still answered. An inner 401/403 is a
        PermissionDeniedError naming User.Read.All.
        """
        lookup = DirectoryLookup()
        seen: set[str] = set()
        chunk: list[str] = []
        for name in names:
            if not isinstance(name, str) or not name.strip() or name in seen:
                continue
            seen.add(name)
            if "@" not in name:
                lookup.absent.add(name)
                continue
            chunk.append(name)
            if len(chunk) == BATCH_SIZE:
                self._sign_in_names_batch(chunk, lookup)
                chunk = []
        if chunk:
            self._sign_in_names_batch(chunk, lookup)
        return lookup

    def _sign_in_names_batch(self, names: list[str], lookup: DirectoryLookup) -> None:
        # Percent-encoded whole: "#" would start the URL's fragment, "+" would read as a space.
        urls = [
            f"/users?$filter={quote(sign_in_name_filter(name), safe='')}&$select={MEMBER_SELECT}"
            for name in names
        ]
        for name, (status, body) in zip(names, self._batch_get(urls), strict=True):
            if status in (401, 403):
                raise PermissionDeniedError(
                    f"Graph denied looking up users by sign-in name (HTTP {status} inside "
                    "$batch): the app registration needs the application permission "
                    "User.Read.All (with admin consent)."
                )
            users = body.get("value") if isinstance(body, dict) else None
            if status == 200 and isinstance(users, list):
                user = pick_directory_user(name, users)
                if user is None:
                    lookup.absent.add(name)
                else:
                    lookup.found[name] = account_from_user(user)
            elif status == 200:
                lookup.failed[name] = "an answer that is not a list of users"
            elif status == 0:
                lookup.failed[name] = "no answer with a status for it, even after retries"
            else:
                lookup.failed[name] = _inner_error(status, body)

    # --- administrators and domains ---------------------------------------------------------

    def administrators(self) -> Iterator[Account]:
        """People holding an administrator role now (see ``is_admin_role``), each once.

        Only activated roles are listed (Graph's /directoryRoles): a role nobody was ever
        assigned has no members anyway. Groups holding a role (role-assignable groups) are
        expanded to their people, nested groups flattened; service principals, devices and
        other non-person members are skipped. Members come without $select (the endpoint
        takes no OData parameters), so ``user_type``/``enabled`` may be None; guests are
        still external by their #EXT# user principal name. Needs RoleManagement.Read.Directory
        (and GroupMember.Read.All for groups).
        """
        seen: set[str] = set()
        roles = [
            role
            for page in self._pages("/directoryRoles", None)
            for role in page["value"]
            if isinstance(role, dict) and isinstance(role.get("id"), str) and role["id"]
        ]
        for role in roles:
            if not is_admin_role(role):
                continue
            members = f"/directoryRoles/{quote(role['id'], safe='')}/members"
            for page in self._pages(members, None):
                for obj in page["value"]:
                    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                        continue
                    kind = _member_type(obj)
                    if kind == "user":
                        accounts: Iterable[Account] = [account_from_user(obj)]
                    elif kind == "group":
                        accounts = (
                            account
                            for member_page in self.group_members(obj["id"])
                            for account in _people(member_page.items)
                        )
                    else:  # servicePrincipal, device, ...: not a person
                        continue
                    for account in accounts:
                        if account.account_id not in seen:
                            seen.add(account.account_id)
                            yield account

    def verified_domains(self) -> list[str]:
        """The tenant's verified domain names, lower case (Domain.Read.All)."""
        found: dict[str, None] = {}  # ordered set
        for page in self._pages("/domains", None):
            for domain in page["value"]:
                if (
                    isinstance(domain, dict)
                    and domain.get("isVerified") is True
                    and isinstance(domain.get("id"), str)
                    and domain["id"].strip()
                ):
                    found[domain["id"].strip().lower()] = None
        return list(found)

    # --- audit logs -------------------------------------------------------------------------

    def activity_sources(self) -> list[ActivitySource]:
        return [
            ActivitySource("signIns", GRAPH_LOG_RETENTION),
            ActivitySource("directoryAudits", GRAPH_LOG_RETENTION),
            ActivitySource("Audit.SharePoint", MANAGEMENT_RETENTION),
            ActivitySource("Audit.General", MANAGEMENT_RETENTION),
        ]

    def activities(self, source: str, start: datetime, end: datetime) -> Iterator[list[Activity]]:
        """The source's events made available in [start, end), a page at a time.

        Graph logs (signIns, directoryAudits): events whose own time is in [start, end).
        Management API content types (Audit.*, DLP.All): every record of the content blobs
        the API lists for [start, end) (by the blob's contentCreated, not the record's
        CreationTime, which can be hours earlier); windows over 24 hours are split. Events
        without an id or a readable time are dropped and counted in ``skipped_activities``.
        """
        start, end = _utc(start), _utc(end)
        if start >= end:
            return
        if source in GRAPH_ACTIVITY_SOURCES:
            yield from self._graph_activities(source, start, end)
        elif source in MANAGEMENT_CONTENT_TYPES:
            yield from self._management_activities(source, start, end)
        else:
            known = sorted(GRAPH_ACTIVITY_SOURCES) + sorted(MANAGEMENT_CONTENT_TYPES)
            raise ConnectorError(f"unknown activity source {source!r}; known: {', '.join(known)}")

    def _graph_activities(
        self, source: str, start: datetime, end: datetime
    ) -> Iterator[list[Activity]]:
        path, time_property = GRAPH_ACTIVITY_SOURCES[source]
        normalize = signin_activity if source == "signIns" else directory_audit_activity
        # Whole seconds in the filter: round the end up, the exact bounds are applied below.
        upper = end if not end.microsecond else end.replace(microsecond=0) + timedelta(seconds=1)
        params = {
            "$filter": (
                f"{time_property} ge {graph_time(start.replace(microsecond=0))} "
                f"and {time_property} le {graph_time(upper)}"
            ),
            "$top": str(ACTIVITY_PAGE_SIZE),
        }
        for page in self._pages(path, params):
            activities: list[Activity] = []
            for event in page["value"]:
                activity = normalize(event, source)
                if activity is None:
                    self.skipped_activities += 1
                elif start <= activity.occurred_at < end:  # the window's end is exclusive
                    activities.append(activity)
            if activities:
                yield activities

    def _management_base(self) -> str:
        return f"{self.management_url}/api/v1.0/{quote(self._tenant_id, safe='')}/activity/feed"

    def _management(
        self,
        method: str,
        url: str,
        params: dict[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[Any, httpx.Headers]:
        """One Management API request, with the PublisherIdentifier Microsoft asks for on
        every request (unless the URL, e.g. a NextPageUri, already carries one)."""
        target = httpx.URL(url)
        if "publisheridentifier" not in {key.casefold() for key in target.params}:
            if params is None:  # merged into the URL's own query (params= would replace it)
                url = str(target.copy_merge_params({"PublisherIdentifier": self._publisher}))
            else:
                params = {**params, "PublisherIdentifier": self._publisher}
        return self._request(method, url, api=self._management_api, params=params, cancel=cancel)

    def _start_subscription(self, content_type: str) -> None:
        """Start the content type's subscription, once per connector ("already enabled" is
        the usual answer after the first run, and fine)."""
        if content_type in self._subscribed:
            return
        try:
            self._management(
                "POST",
                f"{self._management_base()}/subscriptions/start",
                {"contentType": content_type},
            )
        except ServiceError as exc:
            if exc.code != _SUBSCRIPTION_ALREADY_ENABLED:
                raise VendorError(
                    f"cannot start the Office 365 Management API subscription for "
                    f"{content_type} (is unified audit logging on for the tenant?): {exc}",
                    exc.status,
                ) from None
        self._subscribed.add(content_type)

    def _management_activities(
        self, content_type: str, start: datetime, end: datetime
    ) -> Iterator[list[Activity]]:
        self._start_subscription(content_type)
        listed: set[str] = set()  # a blob listed in two sub-windows is read once
        window_start = start
        while window_start < end:
            window_end = min(end, window_start + MANAGEMENT_WINDOW)
            uris: list[str] = []
            for blob in self._content_blobs(content_type, window_start, window_end):
                content_id = blob.get("contentId")
                key = content_id if isinstance(content_id, str) else blob["contentUri"]
                if key not in listed:
                    listed.add(key)
                    uris.append(blob["contentUri"])
            for records in self._fetch_blobs(uris):
                activities = self._blob_activities(content_type, records)
                if activities:
                    yield activities
            window_start = window_end

    def _fetch_blobs(self, uris: list[str]) -> Iterator[list[Any]]:
        """The blobs' records, in order. A day holds a few hundred small blobs: up to
        PREFETCH_PAGES are fetched at once (bounded memory); when the caller stops early,
        pending fetches are dropped and retry waits of running ones end at once."""
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=PREFETCH_PAGES, thread_name_prefix="o365-blobs")
        ahead: deque[Future[list[Any]]] = deque()
        try:
            for uri in uris:
                ahead.append(pool.submit(self._fetch_blob, uri, stop))
                if len(ahead) >= PREFETCH_PAGES:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _content_blobs(
        self, content_type: str, start: datetime, end: datetime
    ) -> Iterator[dict[str, Any]]:
        """The content blobs listed for [start, end) (at most 24 hours), following the
        NextPageUri header as given."""
        url: str | None = f"{self._management_base()}/subscriptions/content"
        params: dict[str, str] | None = {
            "contentType": content_type,
            "startTime": management_time(start),
            "endTime": management_time(end),
        }
        resubscribed = False
        while url:
            try:
                listing, headers = self._management("GET", url, params)
            except ServiceError as exc:
                if exc.code == _NO_SUBSCRIPTION and not resubscribed:
                    # The subscription was stopped since it was started: start it again.
                    resubscribed = True
                    self._subscribed.discard(content_type)
                    self._start_subscription(content_type)
                    continue
                if exc.status == 400:
                    raise VendorError(
                        f"the Office 365 Management API refused to list {content_type} content "
                        f"for {management_time(start)} to {management_time(end)} UTC (it lists "
                        f"at most 24 hours at a time, starting at most 7 days ago): {exc}",
                        exc.status,
                    ) from None
                raise
            if not isinstance(listing, list):
                raise VendorError(
                    f"Management API GET {self._path(url)}: the content listing is not a list"
                )
            for blob in listing:
                uri = blob.get("contentUri") if isinstance(blob, dict) else None
                if not isinstance(uri, str) or not uri:
                    raise VendorError(
                        f"Management API GET {self._path(url)}: a listed blob has no contentUri"
                    )
                if not self._belongs(uri, self._management_api):
                    raise VendorError(
                        f"the Management API listed a contentUri on another host: {uri:.100}"
                    )
                yield blob
            next_page = headers.get("NextPageUri")
            url, params = (urljoin(url, next_page.strip()) if next_page else None), None
            if url and not self._belongs(url, self._management_api):
                raise VendorError(
                    f"the Management API returned a NextPageUri to another host: {url:.100}"
                )

    def _fetch_blob(self, uri: str, cancel: threading.Event) -> list[Any]:
        records, _ = self._management("GET", uri, cancel=cancel)
        if not isinstance(records, list):
            raise VendorError(
                f"Management API GET {self._path(uri)}: the content blob is not a list of records"
            )
        return records

    def _blob_activities(self, content_type: str, records: list[Any]) -> list[Activity]:
        # In the caller's thread: skipped_activities is not shared with the fetching threads.
        activities: list[Activity] = []
        for record in records:
            activity = management_activity(record, content_type)
            if activity is None:
                self.skipped_activities += 1
            else:
                activities.append(activity)
        return activities
