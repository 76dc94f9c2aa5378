"""A fake of the Office 365 Management Activity API (``https://manage.office.com``).

Served by :class:`~groupsync_pipeline.sandbox.graph.GraphSandbox` under the path prefix
``/office-management``: the API root is ``{base_url}/office-management/api/v1.0/{tenant_id}``.
Behaviour copied from Microsoft's "Office 365 Management Activity API reference":

* ``POST /activity/feed/subscriptions/start?contentType=X`` -> 200 ``{contentType, status,
  webhook}``; again while enabled -> 400 ``AF20024`` (seen on the wire, not in the docs);
* ``POST .../subscriptions/stop``, ``GET .../subscriptions/list``;
* ``GET .../subscriptions/content?contentType=X[&startTime=..&endTime=..]`` -> JSON array of
  blobs with ``contentCreated`` in [startTime, endTime); both times or neither (last 24 h),
  at most 24 h apart, startTime at most 7 days back (else 400 ``AF20030``); at most
  ``page_size`` blobs per answer, the rest via the ``NextPageUri`` header;
* ``GET {contentUri}`` -> JSON array of records in the common schema; expired (7 days) ->
  400 ``AF20051``.
* ``PublisherIdentifier`` on any request is recorded (``publisher_identifiers``);
  ``require_publisher_identifier`` refuses requests without it. ``NextPageUri`` does not carry
  it (the documented example does not): clients add it again.

Blobs: for each content type every hour is cut into deterministic slots of 5-15 minutes; a
slot's blob holds the events that became *visible* in it and is created (``contentCreated``)
when the slot ends, so late events land in later blobs than their ``CreationTime``.
Content of stopped periods is not served, as documented.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as dt
import hashlib
import hmac
import json
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode

from groupsync_pipeline.sandbox.activity_stream import CONTENT_TYPES, HOUR

if TYPE_CHECKING:
    from groupsync_pipeline.sandbox.graph import GraphSandbox

__all__ = [
    "BLOB_LIFETIME",
    "MANAGEMENT_APP_ID",
    "MANAGEMENT_AUDIENCE",
    "MANAGEMENT_PREFIX",
    "ManagementActivityApi",
    "ManagementError",
]

MANAGEMENT_PREFIX = "office-management"  # first path segment on the sandbox
MANAGEMENT_AUDIENCE = "https://manage.office.com"
MANAGEMENT_APP_ID = "c5393580-f805-4401-95e8-94b7a6ef2fc2"  # Office 365 Management APIs
PERMISSION = "ActivityFeed.Read"
BLOB_LIFETIME = 7 * 24 * 3600.0  # docs: "Content older than 7 days cannot be retrieved"
MAX_WINDOW = 24 * 3600.0
MAX_LOOKBACK = 7 * 24 * 3600.0
DEFAULT_PAGE_SIZE = 200
JSON_TYPE = "application/json; charset=utf-8"
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_TIME_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f")
_WINDOW_MESSAGE = (
    "Start time and end time must both be specified (or both omitted) and must be less than "
    "or equal to 24 hours apart, with the start time no more than 7 days in the past."
)


_DENIED = "Authorization has been denied for this request."


class ManagementError(Exception):
    """Becomes ``{"error": {"code": "AF...", "message": ...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        raw: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.raw = raw  # a body of another shape (the framework's own 401/405 answers)

    def body(self) -> dict[str, Any]:
        if self.raw is not None:
            return self.raw
        return {"error": {"code": self.code, "message": self.message}}


@dataclass
class ManagementResponse:
    status: int
    payload: Any  # JSON-able; None for an empty body
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        if self.payload is None:
            return b""
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class _Subscription:
    enabled: bool
    # (stopped at, restarted at or None): content made available meanwhile is never served.
    gaps: list[tuple[float, float | None]] = field(default_factory=list)

    def served(self, created: float) -> bool:
        return all(not (stop <= created < (start or float("inf"))) for stop, start in self.gaps)


def _parse_time(raw: str) -> float | None:
    text = raw.strip()
    if text.endswith("Z"):
        text = text[:-1]
    for fmt in _TIME_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC).timestamp()
        except ValueError:
            continue
    return None


def _iso_blob(moment: float) -> str:
    # contentCreated/contentExpiration as in the docs' sample: "2015-05-23T17:35:00.000Z".
    stamp = dt.datetime.fromtimestamp(moment, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _stamp(moment: float) -> str:
    # contentId parts: yyyyMMddHHmmss + 7 fraction digits + 3 digits, like the docs' ids.
    stamp = dt.datetime.fromtimestamp(int(moment), dt.UTC).strftime("%Y%m%d%H%M%S")
    return f"{stamp}0000000000"


class ManagementActivityApi:
    """Request handling of the Management Activity API for one sandbox tenant."""

    def __init__(
        self,
        sandbox: GraphSandbox,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        slot_seconds: int | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        if slot_seconds is not None and not (
            1 <= slot_seconds <= 3600 and 3600 % slot_seconds == 0
        ):
            raise ValueError("slot_seconds must divide an hour (1 to 3600)")
        self.sandbox = sandbox
        self.page_size = page_size
        # Fixed blob slots instead of 5-15 minutes: tests need file events listed in seconds.
        self.slot_seconds = slot_seconds
        self.subscriptions: dict[str, _Subscription] = {}
        # (operation, PublisherIdentifier or None) of every authorized request, in order.
        # Microsoft asks for the parameter on every request (throttling is counted by it) but
        # serves requests without it; with require_publisher_identifier they are refused.
        self.publisher_identifiers: list[tuple[str, str | None]] = []
        self.require_publisher_identifier = False
        key = f"groupsync-sandbox-management:{sandbox.tenant_id}:{sandbox.org.seed}"
        self._key = hashlib.sha256(key.encode()).digest()

    # -- addresses ---------------------------------------------------------------------------
    def root(self, tenant: str | None = None) -> str:
        return (
            f"{self.sandbox.base_url}/{MANAGEMENT_PREFIX}/api/v1.0/"
            f"{tenant or self.sandbox.tenant_id}/activity/feed"
        )

    # -- dispatch ----------------------------------------------------------------------------
    def handle(
        self, method: str, segments: list[str], query: str, headers: dict[str, str]
    ) -> ManagementResponse:
        """``segments``: the path after ``/office-management``."""
        try:
            return self._route(method, segments, query, headers)
        except ManagementError as err:
            return ManagementResponse(err.status, err.body(), err.headers)

    def _route(
        self, method: str, segments: list[str], query: str, headers: dict[str, str]
    ) -> ManagementResponse:
        lowered = [s.lower() for s in segments]
        if len(lowered) < 5 or lowered[0] != "api" or lowered[1] not in ("v1.0", "v1"):
            raise ManagementError(
                404, "AF20050", f"The specified content ({'/'.join(segments)}) does not exist."
            )
        tenant = segments[2]
        self._authorize(headers, tenant)
        if lowered[3:5] != ["activity", "feed"]:
            raise ManagementError(404, "AF20050", "The specified content does not exist.")
        rest = lowered[5:]
        params = {k.lower(): v for k, v in parse_qsl(query, keep_blank_values=True)}
        operation = "content blob" if rest[:1] == ["audit"] else "/".join(rest)
        publisher = params.get("publisheridentifier") or None
        self.publisher_identifiers.append((operation, publisher))
        if publisher is None and self.require_publisher_identifier:
            raise ManagementError(400, "AF20001", "Missing parameter: PublisherIdentifier.")
        if len(rest) == 2 and rest[0] == "subscriptions":
            op = rest[1]
            routes = {"start": "POST", "stop": "POST", "list": "GET", "content": "GET"}
            if op not in routes:
                raise ManagementError(
                    404, "AF20050", f"The specified content ({op}) does not exist."
                )
            if method != routes[op]:
                return ManagementResponse(
                    405,
                    {"Message": f"The requested resource does not support http method '{method}'."},
                )
            if op == "list":
                return self._list()
            content_type = self._content_type(params)
            if op == "start":
                return self._start(content_type)
            if op == "stop":
                return self._stop(content_type)
            return self._content(tenant, content_type, params, query)
        if len(rest) == 2 and rest[0] == "audit":
            if method != "GET":
                return ManagementResponse(
                    405,
                    {"Message": f"The requested resource does not support http method '{method}'."},
                )
            return self._blob(segments[6])
        raise ManagementError(404, "AF20050", "The specified content does not exist.")

    def _authorize(self, headers: dict[str, str], tenant: str) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        info = self.sandbox._token_info(token.strip()) if scheme.lower() == "bearer" else None
        # manage.office.com is ASP.NET Web API: a missing, expired or foreign-audience token
        # gets its stock 401 body.
        if info is None or info[1] != MANAGEMENT_AUDIENCE:
            raise ManagementError(
                401,
                "",
                _DENIED,
                {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'},
                raw={"Message": _DENIED},
            )
        if not _GUID_RE.match(tenant):
            raise ManagementError(
                400, "AF20013", f"The tenant ID passed in the URL ({tenant}) is not a valid GUID."
            )
        if tenant.lower() != self.sandbox.tenant_id.lower():
            raise ManagementError(
                401,
                "AF20010",
                f"The tenant ID passed in the URL ({tenant}) does not match the tenant ID passed "
                f"in the access token ({self.sandbox.tenant_id}).",
            )
        if PERMISSION not in self.sandbox.permissions:
            granted = ",".join(sorted(p for p in self.sandbox.permissions if "ActivityFeed" in p))
            raise ManagementError(
                401,
                "AF10001",
                f"The permission set ({granted}) sent in the request did not include the "
                f"expected permission {PERMISSION}.",
            )

    @staticmethod
    def _content_type(params: dict[str, str]) -> str:
        raw = params.get("contenttype")
        if not raw:
            raise ManagementError(400, "AF20001", "Missing parameter: contentType.")
        for known in CONTENT_TYPES:
            if raw.lower() == known.lower():
                return known
        raise ManagementError(400, "AF20020", "The specified content type is not valid.")

    # -- subscriptions -----------------------------------------------------------------------
    def _start(self, content_type: str) -> ManagementResponse:
        now = self.sandbox.clock()
        sub = self.subscriptions.get(content_type)
        if sub is not None and sub.enabled:
            raise ManagementError(
                400, "AF20024", "The subscription is already enabled. No property change."
            )
        if sub is None:
            self.subscriptions[content_type] = _Subscription(True)
        else:
            sub.enabled = True
            stop, _ = sub.gaps[-1]
            sub.gaps[-1] = (stop, now)
        return ManagementResponse(
            200, {"contentType": content_type, "status": "enabled", "webhook": None}
        )

    def _stop(self, content_type: str) -> ManagementResponse:
        sub = self.subscriptions.get(content_type)
        if sub is None or not sub.enabled:
            raise ManagementError(
                400, "AF20022", "No subscription found for the specified content type."
            )
        sub.enabled = False
        sub.gaps.append((self.sandbox.clock(), None))
        return ManagementResponse(200, None)

    def _list(self) -> ManagementResponse:
        return ManagementResponse(
            200,
            [
                {
                    "contentType": ct,
                    "status": "enabled" if sub.enabled else "disabled",
                    "webhook": None,
                }
                for ct, sub in self.subscriptions.items()
            ],
        )

    def _require_subscription(self, content_type: str) -> _Subscription:
        sub = self.subscriptions.get(content_type)
        if sub is None or not sub.enabled:
            raise ManagementError(
                400, "AF20022", "No subscription found for the specified content type."
            )
        return sub

    # -- blobs -------------------------------------------------------------------------------
    def slots(self, content_type: str, hour_index: int) -> list[tuple[float, float]]:
        """The hour cut into 5-15 minute slots, a pure function of (seed, type, hour)."""
        if self.slot_seconds is not None:
            base, size = hour_index * HOUR, float(self.slot_seconds)
            return [
                (base + k * size, base + (k + 1) * size) for k in range(3600 // self.slot_seconds)
            ]
        rng = random.Random(f"{self.sandbox.org.seed}:blobs:{content_type}:{hour_index}")
        base = hour_index * HOUR
        edges, at = [], 0
        while at < 60:
            nxt = min(60, at + 5 + int(rng.random() * 11))
            if 60 - nxt < 5:
                nxt = 60  # no sliver at the end of the hour
            edges.append((base + at * 60.0, base + nxt * 60.0))
            at = nxt
        return edges

    def content_id(self, content_type: str, start: float, end: float) -> str:
        # Shaped like the real ids ("<start>$<end>$audit_sharepoint$Audit_SharePoint$na0014")
        # plus a short MAC: the sandbox can tell its own ids from made-up ones.
        slug = content_type.replace(".", "_")
        raw = f"{_stamp(start)}${_stamp(end)}${slug.lower()}${slug}$na0014"
        mac = hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()[:12]
        return f"{raw}{mac}"

    def _parse_content_id(self, content_id: str) -> tuple[str, float, float] | None:
        parts = content_id.split("$")
        if len(parts) != 5 or len(parts[4]) != 6 + 12:
            return None
        raw, mac = content_id[:-12], content_id[-12:]
        expected = hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()[:12]
        if not hmac.compare_digest(mac, expected):
            return None
        content_type = parts[3].replace("_", ".", 1)
        try:
            start = dt.datetime.strptime(parts[0][:14], "%Y%m%d%H%M%S")
            end = dt.datetime.strptime(parts[1][:14], "%Y%m%d%H%M%S")
        except ValueError:
            return None
        return (
            content_type,
            start.replace(tzinfo=dt.UTC).timestamp(),
            end.replace(tzinfo=dt.UTC).timestamp(),
        )

    def blobs(self, content_type: str, start: float, end: float, now: float) -> list[dict]:
        """Blobs with ``start <= contentCreated < end`` that exist at ``now``, oldest first."""
        stream = self.sandbox.activity
        out: list[dict[str, Any]] = []
        end = min(end, now + 1e-6)  # a blob exists once its slot has ended
        first, last = int((start - HOUR) // HOUR), int(end // HOUR)
        root = self.root()
        for h in range(first, last + 1):
            slots = [s for s in self.slots(content_type, h) if start <= s[1] < end]
            if not slots:
                continue
            visible = stream.visible_between(content_type, slots[0][0], slots[-1][1])
            times = [e.visible_at for e in visible]  # sorted by visible_at
            for slot_start, slot_end in slots:
                i = bisect.bisect_left(times, slot_start)
                if i == len(times) or times[i] >= slot_end:
                    continue  # no events, no blob
                content_id = self.content_id(content_type, slot_start, slot_end)
                out.append(
                    {
                        "contentType": content_type,
                        "contentId": content_id,
                        "contentUri": f"{root}/audit/{content_id}",
                        "contentCreated": _iso_blob(slot_end),
                        "contentExpiration": _iso_blob(slot_end + BLOB_LIFETIME),
                        "_created": slot_end,
                    }
                )
        return out

    def _content(
        self, tenant: str, content_type: str, params: dict[str, str], query: str
    ) -> ManagementResponse:
        sub = self._require_subscription(content_type)
        now = self.sandbox.clock()
        raw_start, raw_end = params.get("starttime"), params.get("endtime")
        if (raw_start is None) != (raw_end is None):
            raise ManagementError(400, "AF20030", _WINDOW_MESSAGE)
        if raw_start is None or raw_end is None:
            # Neither: the last 24 hours; a next page carries the resolved window.
            end = float(int(now))
            start = end - MAX_WINDOW
        else:
            parsed_start, parsed_end = _parse_time(raw_start), _parse_time(raw_end)
            if parsed_start is None or parsed_end is None:
                bad = raw_start if parsed_start is None else raw_end
                raise ManagementError(
                    400, "AF20002", f"Invalid parameter type: {bad}. Expected type: DateTime"
                )
            start, end = parsed_start, parsed_end
            if end < start or end - start > MAX_WINDOW or now - start > MAX_LOOKBACK:
                raise ManagementError(400, "AF20030", _WINDOW_MESSAGE)
        after: tuple[float, str] | None = None
        if "nextpage" in params:
            after = self._open_page(params["nextpage"], content_type, start, end)
        listed = [b for b in self.blobs(content_type, start, end, now) if sub.served(b["_created"])]
        if after is not None:
            listed = [b for b in listed if (b["_created"], b["contentId"]) > after]
        page = listed[: self.page_size]
        headers: dict[str, str] = {}
        if len(listed) > self.page_size:
            last = page[-1]
            token = self._seal_page(content_type, start, end, (last["_created"], last["contentId"]))
            pairs = [
                ("contentType", content_type),
                (
                    "startTime",
                    dt.datetime.fromtimestamp(start, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                ),
                ("endTime", dt.datetime.fromtimestamp(end, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")),
            ]
            # As documented: the window and the next page's id; no PublisherIdentifier.
            pairs.append(("nextPage", token))
            root = self.root(tenant)
            headers["NextPageUri"] = (
                f"{root}/subscriptions/content?{urlencode(pairs, quote_via=quote, safe=':')}"
            )
        body = [{k: v for k, v in b.items() if not k.startswith("_")} for b in page]
        return ManagementResponse(200, body, headers)

    def _seal_page(
        self, content_type: str, start: float, end: float, after: tuple[float, str]
    ) -> str:
        state = json.dumps([content_type, start, end, after[0], after[1]]).encode()
        mac = hmac.new(self._key, b"page:" + state, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(mac + state).rstrip(b"=").decode()

    def _open_page(
        self, token: str, content_type: str, start: float, end: float
    ) -> tuple[float, str]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, state = raw[:12], raw[12:]
            expected = hmac.new(self._key, b"page:" + state, hashlib.sha256).digest()[:12]
            if not hmac.compare_digest(mac, expected):
                raise ValueError("bad mac")
            ct, s, e, created, content_id = json.loads(state)
            if ct != content_type or abs(s - start) > 1 or abs(e - end) > 1:
                raise ValueError("another listing")
            return float(created), str(content_id)
        except (ValueError, TypeError, binascii.Error):
            raise ManagementError(400, "AF20031", f"Invalid nextPage Input: {token}.") from None

    def _blob(self, content_id: str) -> ManagementResponse:
        parsed = self._parse_content_id(content_id)
        if parsed is None:
            raise ManagementError(400, "AF20052", f"Content ID {content_id} in the URL is invalid.")
        content_type, start, end = parsed
        if content_type not in CONTENT_TYPES or (start, end) not in self.slots(
            content_type, int(start // HOUR)
        ):
            raise ManagementError(400, "AF20052", f"Content ID {content_id} in the URL is invalid.")
        sub = self._require_subscription(content_type)
        now = self.sandbox.clock()
        if end > now or not sub.served(end):
            raise ManagementError(
                404, "AF20050", f"The specified content ({content_id}) does not exist."
            )
        if now >= end + BLOB_LIFETIME:
            raise ManagementError(
                400,
                "AF20051",
                f"Content requested with the key {content_id} has already expired. Content "
                "older than 7 days cannot be retrieved.",
            )
        stream = self.sandbox.activity
        events = stream.visible_between(content_type, start, end)
        if not events:
            raise ManagementError(
                404, "AF20050", f"The specified content ({content_id}) does not exist."
            )
        return ManagementResponse(200, [stream.management_record(e) for e in events])
