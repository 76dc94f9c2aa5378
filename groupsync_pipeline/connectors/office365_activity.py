"""Microsoft audit events (Graph auditLogs, Office 365 Management Activity API) → Activity.

Pure functions, no I/O. Liberal in what they accept: nulls anywhere, missing nested objects,
unknown extra fields and strings of any shape. An event without an id or a readable time
cannot be stored (nor deduplicated): the normalizers return None and the caller counts it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import UTC, datetime
from typing import Any

from groupsync_pipeline.connectors.base import Activity

SIGN_IN_ACTION = "Sign-in"
UNKNOWN_ACTION = "unknown"  # Activity.action is required; used when the event names none

# ISO 8601 as the services send it: Graph "2020-03-13T19:15:41.6195833Z" (7 fractional digits),
# the Management API "2015-06-29T20:03:19" (no zone: UTC by its docs) or with a fraction/offset.
_ISO_TIME = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d+))?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE,
)
_COUNTRY = re.compile(r"^[A-Z]{2}$")
# Management API ResultStatus values (compared lower case); workloads differ in wording.
_RESULT_TRUE = frozenset({"succeeded", "success", "true"})
_RESULT_FALSE = frozenset({"failed", "false"})


def parse_time(value: Any) -> datetime | None:
    """An aware UTC datetime from the services' ISO 8601 texts, or None if unreadable.

    Any number of fractional digits (Graph sends 7; datetime keeps 6), "Z", an offset, or no
    zone at all (taken as UTC, as the Management API documents its times).
    """
    if not isinstance(value, str):
        return None
    match = _ISO_TIME.match(value.strip())
    if not match:
        return None
    day, clock, fraction, zone = match.groups()
    text = f"{day}T{clock}"
    if fraction:
        text += "." + fraction[:6].ljust(6, "0")
    if zone and zone.upper() != "Z":
        text += zone if ":" in zone else f"{zone[:3]}:{zone[3:]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:  # e.g. month 13
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 and the like
        return None


def client_ip(value: Any) -> str | None:
    """The client address without a port: "1.2.3.4:5678", "[2001:db8::1]:443", bare IPv6.

    Anything that is not an IP address (a host name, garbage) gives None; raw keeps it.
    """
    text = _text(value)
    if text is None:
        return None
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # IPv4:port (IPv6 always has two colons or more)
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # An IPv4 client seen through a dual-stack listener: the IPv4 address is the client's.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def raw_json(event: Any) -> str:
    """The event as compact JSON text. A lone surrogate (hostile "\\ud800" in the answer)
    cannot be stored as UTF-8: then it stays escaped, which is still the same JSON value."""
    text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=True)
    return text


def signin_activity(event: Any, source: str = "signIns") -> Activity | None:
    """A Graph signIn (GET /auditLogs/signIns item), or None without an id or time."""
    if not isinstance(event, dict):
        return None
    event_id, occurred = _identifier(event.get("id")), parse_time(event.get("createdDateTime"))
    if event_id is None or occurred is None:
        return None
    location = _object(event.get("location"))
    status = _object(event.get("status"))
    error_code = status.get("errorCode")
    user_id = _text(event.get("userId"))
    return Activity(
        source=source,
        event_id=event_id,
        occurred_at=occurred,
        actor_account_id=None if is_nil_id(user_id) else user_id,
        actor_email=_text(event.get("userPrincipalName")),
        action=SIGN_IN_ACTION,
        object_name=_text(event.get("appDisplayName")),
        object_id=_text(event.get("appId")),
        ip_address=client_ip(event.get("ipAddress")),
        country=_country(location.get("countryOrRegion")),
        city=_text(location.get("city")),
        user_agent=_device_agent(_object(event.get("deviceDetail"))),
        # errorCode 0 is success; any other code is a failed or interrupted sign-in.
        success=(error_code == 0) if _is_int(error_code) else None,
        raw=raw_json(event),
        actor_type=ACTOR_SYSTEM if is_nil_id(user_id) else ACTOR_USER,
    )


def directory_audit_activity(event: Any, source: str = "directoryAudits") -> Activity | None:
    """A Graph directoryAudit (GET /auditLogs/directoryAudits item), or None without an id
    or time. App-initiated events have no person as actor: actor fields stay None and the
    app's name is only in raw. Entra ID's own actions name the all-zero id as the initiating
    user: the system, no account."""
    if not isinstance(event, dict):
        return None
    event_id, occurred = _identifier(event.get("id")), parse_time(event.get("activityDateTime"))
    if event_id is None or occurred is None:
        return None
    initiated = _object(event.get("initiatedBy"))
    user = _object(initiated.get("user"))
    user_id = _text(user.get("id"))
    if is_nil_id(user_id):
        actor_type: str | None = ACTOR_SYSTEM
    elif user_id or _text(user.get("userPrincipalName")):
        actor_type = ACTOR_USER
    else:  # an app acted, or the record names nobody (the app did not say)
        actor_type = ACTOR_APPLICATION if _object(initiated.get("app")) else None
    targets = event.get("targetResources")
    target = _object(targets[0]) if isinstance(targets, list) and targets else {}
    result = _text(event.get("result"))
    result = result.lower() if result else None
    return Activity(
        source=source,
        event_id=event_id,
        occurred_at=occurred,
        actor_account_id=None if actor_type == ACTOR_SYSTEM else user_id,
        actor_email=_text(user.get("userPrincipalName")),
        action=_text(event.get("activityDisplayName")) or UNKNOWN_ACTION,
        object_name=_text(target.get("displayName")) or _text(target.get("userPrincipalName")),
        object_id=_text(target.get("id")),
        ip_address=client_ip(user.get("ipAddress")),
        country=None,
        city=None,
        user_agent=None,
        # Documented values: success, failure, timeout, unknownFutureValue.
        success=True
        if result == "success"
        else False
        if result in ("failure", "timeout")
        else None,
        raw=raw_json(event),
        actor_type=actor_type,
    )


# Activity.actor_type values.
ACTOR_USER = "user"
ACTOR_ANONYMOUS = "anonymous"
ACTOR_APPLICATION = "application"
ACTOR_SYSTEM = "system"
# The common schema's UserType: 0 Regular, 1 Reserved, 2 Admin, 3 DcAdmin (a Microsoft
# datacenter operator), 4 System, 5 Application, 6 ServicePrincipal, 7 CustomPolicy,
# 8 SystemPolicy. Documented as an integer; some exports give the number or the member name
# as text, so both are read (member names compared lower case).
_USER_TYPES = {
    0: ACTOR_USER,
    1: ACTOR_USER,
    2: ACTOR_USER,
    3: ACTOR_SYSTEM,
    4: ACTOR_SYSTEM,
    5: ACTOR_APPLICATION,
    6: ACTOR_APPLICATION,
    7: ACTOR_SYSTEM,
    8: ACTOR_SYSTEM,
}
_USER_TYPE_NAMES = {
    "regular": 0,
    "reserved": 1,
    "admin": 2,
    "dcadmin": 3,
    "system": 4,
    "application": 5,
    "serviceprincipal": 6,
    "custompolicy": 7,
    "systempolicy": 8,
}
# Service identities in UserId (compared lower case). The schema documents app@sharepoint (an
# app with SharePoint-wide permissions: "the user was an application"), SHAREPOINT\system and
# NT AUTHORITY\SYSTEM (...) (system accounts); Entra ID records name an acting app
# "ServicePrincipal_<id>". SharePoint records carry UserType 0 for them, so the name decides.
_APPLICATION_IDS = frozenset({"app@sharepoint"})
_APPLICATION_ID_PREFIXES = ("serviceprincipal_",)
_SYSTEM_IDS = frozenset({"sharepoint\\system"})
_SYSTEM_ID_PREFIXES = ("nt authority\\",)
# SharePoint claims in UserKey: "i:0i.t|<issuer>|<app>" is an app-only (application) identity.
_APPLICATION_KEY_PREFIXES = ("i:0i.t|",)
NIL_ID = "00000000-0000-0000-0000-000000000000"


def is_nil_id(value: str | None) -> bool:
    """The all-zero GUID (with or without braces): Entra ID's id for its own actions."""
    return value is not None and value.strip().strip("{}") == NIL_ID


def management_actor_type(event: dict[str, Any]) -> str | None:
    """Who acted in a Management API record: a person, a sharing link, an app or the system.

    Sharing links and service identities are recognised by UserId/UserKey whatever UserType
    says; otherwise UserType decides (None when absent or not a value the schema lists).
    """
    user_id = (_text(event.get("UserId")) or "").lower()
    user_key = (_text(event.get("UserKey")) or "").lower()
    if user_id.startswith("urn:spo:anon") or user_key.startswith("urn:spo:anon"):
        return ACTOR_ANONYMOUS  # someone who opened an "anyone with the link" link
    if (
        user_id in _APPLICATION_IDS
        or user_id.startswith(_APPLICATION_ID_PREFIXES)
        or user_key.startswith(_APPLICATION_KEY_PREFIXES)
    ):
        return ACTOR_APPLICATION
    if user_id in _SYSTEM_IDS or user_id.startswith(_SYSTEM_ID_PREFIXES) or is_nil_id(user_id):
        return ACTOR_SYSTEM
    return _USER_TYPES.get(_user_type_number(event.get("UserType")))


def _user_type_number(value: Any) -> int:
    """UserType as its number: an int, its digits as text, or its member name; else -1."""
    if _is_int(value):
        return int(value)
    text = _text(value)
    if text is None:
        return -1
    if text.isascii() and text.isdigit():
        return int(text)
    return _USER_TYPE_NAMES.get(text.lower(), -1)


def management_activity(event: Any, content_type: str) -> Activity | None:
    """An Office 365 Management Activity API record (common schema), or None without an Id
    or CreationTime. The actor's account id is left to the pipeline (resolved from UserId)."""
    if not isinstance(event, dict):
        return None
    event_id, occurred = _identifier(event.get("Id")), parse_time(event.get("CreationTime"))
    if event_id is None or occurred is None:
        return None
    object_id = _text(event.get("ObjectId"))
    # Exchange records name the address ClientIPAddress, Entra ID ones ActorIpAddress.
    ip = next(
        (
            found
            for key in ("ClientIP", "ClientIPAddress", "ActorIpAddress")
            if (found := client_ip(event.get(key)))
        ),
        None,
    )
    return Activity(
        source=content_type,
        event_id=event_id,
        occurred_at=occurred,
        actor_account_id=None,
        actor_email=_text(event.get("UserId")),
        action=_text(event.get("Operation")) or UNKNOWN_ACTION,
        object_name=_text(event.get("SourceFileName")) or _last_segment(object_id),
        object_id=object_id,
        ip_address=ip,
        country=None,
        city=None,
        user_agent=_text(event.get("UserAgent")),
        success=_result_status(event.get("ResultStatus")),
        raw=raw_json(event),
        actor_type=management_actor_type(event),
    )


# --- actors named only by sign-in name -----------------------------------------------------


def sign_in_name_filter(name: str) -> str:
    """The Graph /users $filter for an account whose sign-in name or mail is ``name`` (Graph
    compares both without regard to case); a quote is doubled inside the OData literal."""
    literal = name.replace("'", "''")
    return f"userPrincipalName eq '{literal}' or mail eq '{literal}'"


def pick_directory_user(name: str, users: list[Any]) -> dict[str, Any] | None:
    """Of the users a sign-in-name filter returned, the one ``name`` names: a sign-in name
    match before a mail match (a mail can equal another account's UPN), then by id."""
    wanted = name.casefold()
    candidates = [
        u for u in users if isinstance(u, dict) and isinstance(u.get("id"), str) and u["id"]
    ]

    def rank(user: dict[str, Any]) -> tuple[int, str]:
        upn, mail = user.get("userPrincipalName"), user.get("mail")
        if isinstance(upn, str) and upn.casefold() == wanted:
            return 0, user["id"]
        if isinstance(mail, str) and mail.casefold() == wanted:
            return 1, user["id"]
        return 2, user["id"]  # Graph matched it by its own rules of case

    return min(candidates, key=rank, default=None)


# --- helpers ------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """A non-blank string, storable as UTF-8 (lone surrogates replaced), else None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _identifier(value: Any) -> str | None:
    if _is_int(value):  # not documented, but a number is still a usable id
        return str(value)
    return _text(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _country(value: Any) -> str | None:
    # Activity.country is ISO 3166-1 alpha-2; anything else (a name, garbage) is dropped.
    text = _text(value)
    code = text.upper() if text else None
    return code if code and _COUNTRY.match(code) else None


def _device_agent(device: dict[str, Any]) -> str | None:
    """Graph has no user agent string: "browser (operating system)", e.g. "Edge 80.0.361
    (Windows 10)", from what deviceDetail gives."""
    browser, system = _text(device.get("browser")), _text(device.get("operatingSystem"))
    if browser and system:
        return f"{browser} ({system})"
    return browser or system


def _last_segment(object_id: str | None) -> str | None:
    # SharePoint ObjectIds are URLs of the item: the last path segment is the file's name.
    if not object_id:
        return None
    return _text(object_id.rstrip("/").rsplit("/", 1)[-1])


def _result_status(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = _text(value)
    if text is None:
        return None
    lowered = text.lower()
    return True if lowered in _RESULT_TRUE else False if lowered in _RESULT_FALSE else None
