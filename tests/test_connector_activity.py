"""Audit logs, administrators and domains of the Office 365 connector.

Unit tests of the normalizers on the vendors' documented examples (copied here, and checked
against the vendor files in tests/data/vendor/graph), then the connector over
real HTTPS: against a contract-only fake on two hosts (token isolation), and against the
sandbox tenant's Graph auditLogs/directoryRoles and Management Activity API.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus

import httpx
import pytest

from groupsync_pipeline.connectors.base import (
    Activity,
    ConnectorError,
    PermissionDeniedError,
    VendorError,
)
from groupsync_pipeline.connectors.office365 import (
    GraphConnector,
    is_admin_role,
    management_scope,
    management_time,
)
from groupsync_pipeline.connectors.office365_activity import (
    client_ip,
    directory_audit_activity,
    management_activity,
    parse_time,
    raw_json,
    signin_activity,
)
from groupsync_pipeline.sandbox.graph import GraphSandbox

from .conftest import VENDOR_EXAMPLES, make_connector

API_REFERENCE = VENDOR_EXAMPLES / "graph"
HOSTILE = 'Ops "Night" O\'Brien & <Co> — ünïcødé 🚀'

# --- vendor examples (copied from tests/data/vendor/graph/auditlogs.json) -------------------

SIGN_IN = {
    "id": "66ea54eb-6301-4ee5-be62-ff5a759b0100",
    "createdDateTime": "2020-03-13T19:15:41.6195833Z",
    "userDisplayName": "Test Contoso",
    "userPrincipalName": "testaccount1@contoso.com",
    "userId": "26be570a-ae82-4189-b4e2-a37c6808512d",
    "appId": "de8bc8b5-d9f9-48b1-a8ad-b748da725064",
    "appDisplayName": "Graph explorer",
    "ipAddress": "131.107.159.37",
    "clientAppUsed": "Browser",
    "correlationId": "d79f5bee-5860-4832-928f-3133e22ae912",
    "conditionalAccessStatus": "notApplied",
    "isInteractive": True,
    "riskDetail": "none",
    "riskLevelAggregated": "none",
    "riskLevelDuringSignIn": "none",
    "riskState": "none",
    "riskEventTypes": [],
    "resourceDisplayName": "Microsoft Graph",
    "resourceId": "00000003-0000-0000-c000-000000000000",
    "status": {"errorCode": 0, "failureReason": None, "additionalDetails": None},
    "deviceDetail": {
        "deviceId": "",
        "displayName": None,
        "operatingSystem": "Windows 10",
        "browser": "Edge 80.0.361",
        "isCompliant": None,
        "isManaged": None,
        "trustType": None,
    },
    "location": {
        "city": "Redmond",
        "state": "Washington",
        "countryOrRegion": "US",
        "geoCoordinates": {
            "altitude": None,
            "latitude": 47.68050003051758,
            "longitude": -122.12094116210938,
        },
    },
    "appliedConditionalAccessPolicies": [
        {
            "id": "de7e60eb-ed89-4d73-8205-2227def6b7c9",
            "displayName": "SharePoint limited access for guest workers",
            "enforcedGrantControls": [],
            "enforcedSessionControls": [],
            "result": "notEnabled",
        }
    ],
}

DIRECTORY_AUDIT = {
    "id": "id",
    "category": "UserManagement",
    "correlationId": "da159bfb-54fa-4092-8a38-6e1fa7870e30",
    "result": "success",
    "resultReason": "Successfully added member to group",
    "activityDisplayName": "Add member to group",
    "activityDateTime": "2018-01-09T21:20:02.7215374Z",
    "loggedByService": "Core Directory",
    "initiatedBy": {
        "user": {
            "id": "728309ae-1a37-4937-9afe-e35d964db09b",
            "displayName": "Audry Oliver",
            "userPrincipalName": "bob@wingtiptoysonline.com",
            "ipAddress": "127.0.0.1",
        },
        "app": None,
    },
    "targetResources": [
        {
            "id": "ef7e527d-6c92-4234-8c6d-cf6fdfb57f95",
            "displayName": "Example.com",
            "Type": "Group",
            "modifiedProperties": [
                {"displayName": "Action Client Name", "oldValue": None, "newValue": "DirectorySync"}
            ],
            "groupType": "unifiedGroups",
        },
        {
            "id": "1f0e98f5-3161-4c6b-9b50-d488572f2bb7",
            "displayName": None,
            "Type": "User",
            "modifiedProperties": [],
            "userPrincipalName": "bob@contoso.com",
        },
    ],
    "additionalDetails": [{"key": "Additional Detail Name", "value": "Additional Detail Value"}],
}

# A record in the Management Activity API's common schema (SharePoint file operation), shaped
# like the schema reference's: CreationTime without a zone, ClientIP, ObjectId a file URL.
SHAREPOINT_RECORD = {
    "CreationTime": "2026-11-26T10:15:00",
    "Id": "4c8a7f1e-4a13-4a3a-9f36-5b2f5b8c1d20",
    "Operation": "FileAccessed",
    "OrganizationId": "41463f53-8812-40f4-890f-865bf6e35190",
    "RecordType": 6,
    "UserKey": "i:0h.f|membership|1003bffd9a1b6e6c@live.com",
    "UserType": 0,
    "Version": 1,
    "Workload": "SharePoint",
    "ClientIP": "203.0.113.7:51234",
    "ObjectId": "https://contoso.sharepoint.com/sites/hr/Shared Documents/Salaries 2026.xlsx",
    "UserId": "adele@contoso.com",
    "ResultStatus": "Succeeded",
    "UserAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
    "SiteUrl": "https://contoso.sharepoint.com/sites/hr/",
    "SourceFileName": "Salaries 2026.xlsx",
    "SourceRelativeUrl": "Shared Documents",
    "ItemType": "File",
}


def test_sign_in_example_normalizes() -> None:
    activity = signin_activity(SIGN_IN)
    assert activity == Activity(
        source="signIns",
        event_id="66ea54eb-6301-4ee5-be62-ff5a759b0100",
        occurred_at=datetime(2020, 3, 13, 19, 15, 41, 619583, tzinfo=UTC),
        actor_account_id="26be570a-ae82-4189-b4e2-a37c6808512d",
        actor_email="testaccount1@contoso.com",
        action="Sign-in",
        object_name="Graph explorer",
        object_id="de8bc8b5-d9f9-48b1-a8ad-b748da725064",
        ip_address="131.107.159.37",
        country="US",
        city="Redmond",
        user_agent="Edge 80.0.361 (Windows 10)",
        success=True,
        raw=json.dumps(SIGN_IN, separators=(",", ":"), ensure_ascii=False),
        actor_type="user",
    )
    assert json.loads(activity.raw) == SIGN_IN


def test_failed_sign_in_with_nulls_everywhere() -> None:
    event = {
        "id": "s-2",
        "createdDateTime": "2026-11-27T04:00:00Z",
        "userId": None,
        "userPrincipalName": None,
        "appDisplayName": "",
        "ipAddress": None,
        "status": {"errorCode": 50126, "failureReason": "Invalid username or password"},
        "deviceDetail": None,
        "location": {"countryOrRegion": "", "city": None},
        "someFutureField": {"nested": [1, None]},
    }
    activity = signin_activity(event)
    assert activity is not None
    assert activity.success is False
    assert activity.actor_email is activity.actor_account_id is None
    assert activity.object_name is None and activity.ip_address is None
    assert activity.country is activity.city is activity.user_agent is None
    # No status at all, or a code that is not a number: the event does not say.
    assert signin_activity({**event, "status": None}).success is None  # type: ignore[union-attr]
    bad_code = {**event, "status": {"errorCode": "0"}}
    assert signin_activity(bad_code).success is None  # type: ignore[union-attr]
    lower = {**event, "location": {"countryOrRegion": "gb"}, "deviceDetail": {"browser": "Safari"}}
    normalized = signin_activity(lower)
    assert normalized is not None
    assert normalized.country == "GB" and normalized.user_agent == "Safari"
    # Not an ISO code: dropped from the column, kept in raw.
    named = signin_activity({**event, "location": {"countryOrRegion": "United States"}})
    assert named is not None and named.country is None and "United States" in named.raw


def test_directory_audit_example_normalizes() -> None:
    activity = directory_audit_activity(DIRECTORY_AUDIT)
    assert activity is not None
    assert activity.source == "directoryAudits" and activity.event_id == "id"
    assert activity.occurred_at == datetime(2018, 1, 9, 21, 20, 2, 721537, tzinfo=UTC)
    assert activity.action == "Add member to group"
    assert activity.actor_account_id == "728309ae-1a37-4937-9afe-e35d964db09b"
    assert activity.actor_email == "bob@wingtiptoysonline.com"
    assert activity.ip_address == "127.0.0.1"
    assert (activity.object_name, activity.object_id) == (
        "Example.com",
        "ef7e527d-6c92-4234-8c6d-cf6fdfb57f95",
    )
    assert activity.success is True
    assert activity.country is activity.city is activity.user_agent is None


def test_app_initiated_audit_keeps_the_app_only_in_raw() -> None:
    event = {
        **DIRECTORY_AUDIT,
        "id": "app-1",
        "result": "failure",
        "initiatedBy": {
            "user": None,
            "app": {"appId": "a-1", "displayName": "Sync Robot", "servicePrincipalId": "sp-1"},
        },
        "targetResources": [{"id": "u-1", "displayName": None, "userPrincipalName": "x@y.com"}],
    }
    activity = directory_audit_activity(event)
    assert activity is not None
    assert activity.actor_email is None and activity.actor_account_id is None
    assert "Sync Robot" not in repr(activity._replace(raw="")) and "Sync Robot" in activity.raw
    assert activity.object_name == "x@y.com" and activity.object_id == "u-1"
    assert activity.success is False


@pytest.mark.parametrize(
    ("result", "success"),
    [("success", True), ("failure", False), ("timeout", False), ("unknownFutureValue", None),
     (None, None), ("", None), (7, None)],
)  # fmt: skip
def test_directory_audit_result(result: object, success: bool | None) -> None:
    activity = directory_audit_activity({**DIRECTORY_AUDIT, "result": result})
    assert activity is not None and activity.success is success


def test_directory_audit_without_targets_or_initiator() -> None:
    event = {"id": "d-9", "activityDateTime": "2026-11-27T04:00:00.1Z", "targetResources": None}
    activity = directory_audit_activity(event)
    assert activity is not None
    assert activity.action == "unknown"
    assert activity.object_name is activity.object_id is activity.actor_email is None
    assert directory_audit_activity({**event, "targetResources": []}) is not None
    assert directory_audit_activity({**event, "targetResources": [None]}) is not None


def test_management_record_normalizes() -> None:
    activity = management_activity(SHAREPOINT_RECORD, "Audit.SharePoint")
    assert activity == Activity(
        source="Audit.SharePoint",
        event_id="4c8a7f1e-4a13-4a3a-9f36-5b2f5b8c1d20",
        occurred_at=datetime(2026, 11, 26, 10, 15, tzinfo=UTC),
        actor_account_id=None,
        actor_email="adele@contoso.com",
        action="FileAccessed",
        object_name="Salaries 2026.xlsx",
        object_id="https://contoso.sharepoint.com/sites/hr/Shared Documents/Salaries 2026.xlsx",
        ip_address="203.0.113.7",
        country=None,
        city=None,
        user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
        success=True,
        raw=json.dumps(SHAREPOINT_RECORD, separators=(",", ":"), ensure_ascii=False),
        actor_type="user",
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"UserType": 0}, "user"),
        ({"UserType": 2}, "user"),  # an admin acting as themselves
        ({"UserType": 5}, "application"),
        ({"UserType": 6}, "application"),
        ({"UserType": 3}, "system"),  # a Microsoft datacenter operator
        ({"UserType": 8}, "system"),  # a system policy
        ({"UserType": None}, None),
        ({"UserType": 42}, None),  # a value the schema does not list: unknown, not guessed
        ({"UserType": True}, None),
        # Some exports carry UserType as text: its number or its member name.
        ({"UserType": "4"}, "system"),
        ({"UserType": " 0 "}, "user"),
        ({"UserType": "Regular"}, "user"),
        ({"UserType": "ServicePrincipal"}, "application"),
        ({"UserType": "dcadmin"}, "system"),
        ({"UserType": "Unheard-of"}, None),
        ({"UserType": "²"}, None),
        ({"UserType": 0, "UserId": "urn:spo:anon#a1b2c3"}, "anonymous"),
        ({"UserType": 0, "UserKey": "urn:spo:anon#a1b2c3"}, "anonymous"),
    ],
)
def test_management_actor_types(fields: dict, expected: str | None) -> None:
    activity = management_activity({**SHAREPOINT_RECORD, **fields}, "Audit.SharePoint")
    assert activity is not None and activity.actor_type == expected


# Service identities of the common schema's UserId: whatever UserType says (SharePoint records
# carry 0, "Regular", for them), they are an application or the system, never a person.
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"UserId": "app@sharepoint", "UserType": 0}, "application"),
        ({"UserId": "App@SharePoint", "UserType": 4}, "application"),
        (
            {
                "UserId": "app@sharepoint",
                "UserKey": "i:0i.t|00000003-0000-0ff1-ce00-000000000000|app@sharepoint",
                "UserType": None,
            },
            "application",
        ),
        ({"UserId": "SHAREPOINT\\system", "UserType": 0}, "system"),
        ({"UserId": "NT AUTHORITY\\SYSTEM (Microsoft.Exchange.ServiceHost)", "UserType": 2},
         "system"),
        ({"UserId": "nt authority\\system (w3wp)", "UserType": "Admin"}, "system"),
        ({"UserId": "ServicePrincipal_9a2b5c0e-3f1d-4c7a-8e6b-2d4f0a1c3e5b"}, "application"),
        # An app-only claim in UserKey names an application even beside a person-like UserId.
        ({"UserId": "crawler@contoso.com", "UserKey": "i:0i.t|ms.sp.ext|a1@b2", "UserType": 0},
         "application"),
        # A person whatever the case of the name; no UserId at all is still the UserType's word.
        ({"UserId": "Adele.Vance@CONTOSO.com", "UserType": 0}, "user"),
        ({"UserId": None, "UserType": 0}, "user"),
        ({"UserId": None, "UserKey": None, "UserType": None}, None),
    ],
)  # fmt: skip
def test_service_identities_are_not_people(fields: dict, expected: str | None) -> None:
    activity = management_activity({**SHAREPOINT_RECORD, **fields}, "Audit.SharePoint")
    assert activity is not None and activity.actor_type == expected
    assert activity.actor_account_id is None


@pytest.mark.parametrize(
    "nil", ["00000000-0000-0000-0000-000000000000", "{00000000-0000-0000-0000-000000000000}"]
)
def test_directory_audit_initiated_by_the_nil_id_is_the_system(nil: str) -> None:
    # Entra ID records its own actions with the all-zero id as the initiating "user".
    event = {
        "id": "d-0",
        "activityDateTime": "2026-11-27T04:00:00Z",
        "activityDisplayName": "Update StsRefreshTokenValidFrom Timestamp",
        "initiatedBy": {
            "user": {"id": nil, "displayName": None, "userPrincipalName": None, "ipAddress": ""},
            "app": None,
        },
    }
    activity = directory_audit_activity(event)
    assert activity is not None
    assert activity.actor_type == "system"
    assert activity.actor_account_id is None and activity.actor_email is None
    # Nobody at all named as initiator: the app did not say.
    unnamed = directory_audit_activity({**event, "initiatedBy": {"user": None, "app": None}})
    assert unnamed is not None and unnamed.actor_type is None


def test_a_sign_in_by_the_nil_id_names_no_account() -> None:
    event = {**SIGN_IN, "userId": "00000000-0000-0000-0000-000000000000"}
    activity = signin_activity(event)
    assert activity is not None
    assert activity.actor_account_id is None and activity.actor_type == "system"


def test_directory_audit_by_an_app_has_an_application_actor() -> None:
    event = {
        "id": "d-1",
        "activityDateTime": "2026-11-27T04:00:00Z",
        "initiatedBy": {"user": None, "app": {"displayName": "HR Sync Connector"}},
        "result": "success",
    }
    activity = directory_audit_activity(event)
    assert activity is not None and activity.actor_type == "application"
    assert activity.actor_email is None


def test_management_record_variants() -> None:
    record = {
        "Id": "g-1",
        "CreationTime": "2026-11-26T10:15:00.1234567+02:00",
        "Operation": "MemberAdded",
        "ObjectId": "https://contoso.sharepoint.com/sites/hr/",  # trailing slash
        "ClientIP": "[2001:db8::1]:443",
        "ResultStatus": "Failed",
        "UserId": HOSTILE,
    }
    activity = management_activity(record, "Audit.General")
    assert activity is not None
    assert activity.occurred_at == datetime(2026, 11, 26, 8, 15, 0, 123456, tzinfo=UTC)
    assert activity.object_name == "hr"  # no SourceFileName: the ObjectId's last segment
    assert activity.ip_address == "2001:db8::1"
    assert activity.success is False and activity.actor_email == HOSTILE
    assert activity.source == "Audit.General" and json.loads(activity.raw)["UserId"] == HOSTILE
    # Exchange names the address ClientIPAddress; a plain object id is its own last segment.
    exchange = {**record, "ClientIP": None, "ClientIPAddress": "198.51.100.4", "ObjectId": "x"}
    normalized = management_activity(exchange, "Audit.Exchange")
    assert normalized is not None
    assert normalized.ip_address == "198.51.100.4" and normalized.object_name == "x"


@pytest.mark.parametrize(
    ("status", "success"),
    [("Succeeded", True), ("Success", True), ("True", True), ("succeeded", True),
     ("Failed", False), ("False", False), (True, True), (False, False),
     ("PartiallySucceeded", None), ("", None), (None, None), (3, None)],
)  # fmt: skip
def test_management_result_status(status: object, success: bool | None) -> None:
    activity = management_activity({**SHAREPOINT_RECORD, "ResultStatus": status}, "Audit.General")
    assert activity is not None and activity.success is success


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2020-03-13T19:15:41.6195833Z", datetime(2020, 3, 13, 19, 15, 41, 619583, tzinfo=UTC)),
        ("2015-06-29T20:03:19", datetime(2015, 6, 29, 20, 3, 19, tzinfo=UTC)),
        ("2015-06-29T20:03:19.5", datetime(2015, 6, 29, 20, 3, 19, 500000, tzinfo=UTC)),
        ("2015-06-29T20:03:19z", datetime(2015, 6, 29, 20, 3, 19, tzinfo=UTC)),
        ("2015-06-29T22:03:19+02:00", datetime(2015, 6, 29, 20, 3, 19, tzinfo=UTC)),
        (
            "2015-06-29T17:03:19.123456789-0300",
            datetime(2015, 6, 29, 20, 3, 19, 123456, tzinfo=UTC),
        ),
        ("2015-06-29 20:03", datetime(2015, 6, 29, 20, 3, tzinfo=UTC)),
        (" 2015-06-29T20:03:19Z ", datetime(2015, 6, 29, 20, 3, 19, tzinfo=UTC)),
        ("2015-13-29T20:03:19Z", None),
        ("2015-06-29", None),
        ("yesterday", None),
        ("", None),
        (None, None),
        (1435608199, None),
    ],
)
def test_time_parsing(text: object, expected: datetime | None) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped: the IPv4 address
        (" 10.0.0.0 ", "10.0.0.0"),
        ("", None),
        (None, None),
        ("<script>", None),
        ("host.example.com:80", None),
        ("1.2.3.999", None),
        (12345, None),
    ],
)
def test_client_ip(text: object, expected: str | None) -> None:
    assert client_ip(text) == expected


@pytest.mark.parametrize(
    "event",
    [
        {"createdDateTime": "2026-11-27T04:00:00Z"},  # no id
        {"id": "", "createdDateTime": "2026-11-27T04:00:00Z"},
        {"id": "x"},  # no time
        {"id": "x", "createdDateTime": "not a time"},
        {"id": None, "createdDateTime": None},
        None,
        "a string",
        [1, 2],
    ],
)
def test_events_without_id_or_time_are_refused(event: object) -> None:
    assert signin_activity(event) is None
    audit = event if not isinstance(event, dict) else {
        "id": event.get("id"), "activityDateTime": event.get("createdDateTime")
    }  # fmt: skip
    assert directory_audit_activity(audit) is None
    record = event if not isinstance(event, dict) else {
        "Id": event.get("id"), "CreationTime": event.get("createdDateTime")
    }  # fmt: skip
    assert management_activity(record, "Audit.General") is None


def test_hostile_strings_are_kept_and_storable() -> None:
    event = {**SIGN_IN, "appDisplayName": HOSTILE + "\ud800", "userPrincipalName": "\x00a@b"}
    activity = signin_activity(event)
    assert activity is not None
    assert activity.object_name is not None and activity.object_name.startswith(HOSTILE)
    for value in activity:
        if isinstance(value, str):
            value.encode("utf-8")  # a lone surrogate would fail here
    assert json.loads(activity.raw) == event  # still the same JSON value
    assert raw_json({"a": "é"}) == '{"a":"é"}'


def test_admin_role_rule() -> None:
    assert is_admin_role({"displayName": "Global Administrator", "roleTemplateId": "x"})
    assert is_admin_role({"displayName": "Helpdesk Administrator"})
    assert is_admin_role({"displayName": "Company Administrator"})  # the legacy name
    assert is_admin_role({"displayName": "Global Reader"}) is False
    assert is_admin_role({"displayName": "Directory Readers"}) is False
    assert is_admin_role({"displayName": None}) is False
    # Renamed or localized, but the Global Administrator template.
    assert is_admin_role(
        {"displayName": "Globaler Admin", "roleTemplateId": "62E90394-69F5-4237-9190-012177145E10"}
    )


def test_management_scopes_and_times() -> None:
    assert management_scope("https://manage.office.com") == "https://manage.office.com/.default"
    assert management_scope("https://manage.office365.us") == "https://manage.office365.us/.default"
    assert management_scope("https://127.0.0.1:8443/office-management") == (
        "https://manage.office.com/.default"
    )
    moment = datetime(2026, 11, 27, 5, 0, tzinfo=UTC) + timedelta(hours=1)
    assert management_time(moment) == "2026-11-27T06:00:00"


def test_reference_examples_match_the_copies() -> None:
    logs = json.loads((API_REFERENCE / "auditlogs.json").read_text())
    (sign_in,) = logs["GET_/v1.0/auditLogs/signIns"]["value"]
    normalized = signin_activity(sign_in)
    assert normalized is not None and json.loads(normalized.raw) == sign_in
    assert normalized._replace(raw="") == signin_activity(SIGN_IN)._replace(raw="")  # type: ignore[union-attr]
    (audit,) = logs["GET_/v1.0/auditLogs/directoryAudits"]["value"]
    assert directory_audit_activity(audit) == directory_audit_activity(DIRECTORY_AUDIT)
    key = "GET_/v1.0/auditLogs/directoryAudits?$filter=initiatedBy/user/id eq '00000000-0000-0000-0000-000000000000'"  # noqa: E501
    (second,) = logs[key]["value"]
    activity = directory_audit_activity(second)
    assert activity is not None
    assert activity.actor_email is None and activity.ip_address == "10.0.0.0"
    assert activity.object_name is None and activity.success is True


# --- the connector against a contract-only fake on the vendors' own hosts ------------------
#
# Graph and the Management API on different hosts, as in production: which token reaches
# which host is visible here (the sandbox serves both on one host). The fake answers only
# what the documentation describes.

GRAPH = "https://graph.microsoft.com/v1.0"
MANAGE = "https://manage.office.com"
LOGIN = "https://login.microsoftonline.com"
TENANT = "41463f53-8812-40f4-890f-865bf6e35190"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
MANAGE_SCOPE = "https://manage.office.com/.default"
FEED = f"{MANAGE}/api/v1.0/{TENANT}/activity/feed"
T0 = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)


def _af_error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class ContractFake:
    """Entra ID token endpoint, Graph auditLogs and the Management Activity API."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.tokens: dict[str, str] = {}  # access token -> scope it was issued for
        self.subscribed: set[str] = set()
        # content blobs: contentId -> (contentType, contentCreated, records)
        self.blobs: dict[str, tuple[str, datetime, list[Any]]] = {}
        self.listing_page = 2  # blobs per listing page (NextPageUri beyond)
        self.inclusive_end = False  # list blobs created exactly at endTime too (unconfirmed)
        self.sign_ins: list[dict[str, Any]] = []
        self.overrides: list[tuple[Callable[[httpx.Request], bool], httpx.Response]] = []

    def add_blob(self, content_id: str, created: datetime, records: list[Any]) -> None:
        self.blobs[content_id] = ("Audit.SharePoint", created, records)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for index, (matches, response) in enumerate(self.overrides):
            if matches(request):
                del self.overrides[index]
                return response
        url = str(request.url)
        if url.startswith(LOGIN):
            return self._identity(request)
        scope = self.tokens.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if url.startswith(GRAPH + "/"):
            if scope != GRAPH_SCOPE:
                return _af_error(401, "InvalidAuthenticationToken", "Invalid audience.")
            return self._graph(request)
        if url.startswith(MANAGE + "/"):
            if scope != MANAGE_SCOPE:
                return _af_error(401, "", "Authorization has been denied for this request.")
            return self._management(request)
        return httpx.Response(404)

    def _identity(self, request: httpx.Request) -> httpx.Response:
        root = f"{LOGIN}/{TENANT}"
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(
                200,
                json={
                    "token_endpoint": f"{root}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                    "issuer": f"{LOGIN}/{TENANT}/v2.0",
                },
            )
        form = parse_qs(request.content.decode())
        token = f"token-{len(self.tokens)}"
        self.tokens[token] = form["scope"][0]
        return httpx.Response(
            200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": token}
        )

    def _graph(self, request: httpx.Request) -> httpx.Response:
        query = dict(request.url.params)
        skip = int(query.get("$skiptoken", "0"))
        page = self.sign_ins[skip : skip + 2]
        body: dict[str, Any] = {"value": page}
        if skip + 2 < len(self.sign_ins):
            body["@odata.nextLink"] = f"{GRAPH}/auditLogs/signIns?$top=2&$skiptoken={skip + 2}"
        return httpx.Response(200, json=body)

    def _management(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        query = dict(request.url.params)
        content_type = query.get("contentType", "")
        if path.endswith("/subscriptions/start") and request.method == "POST":
            if content_type in self.subscribed:
                return _af_error(
                    400, "AF20024", "The subscription is already enabled. No property change."
                )
            self.subscribed.add(content_type)
            return httpx.Response(
                200, json={"contentType": content_type, "status": "enabled", "webhook": None}
            )
        if path.endswith("/subscriptions/content"):
            if content_type not in self.subscribed:
                return _af_error(400, "AF20022", "No subscription found for the content type.")
            start = datetime.fromisoformat(query["startTime"]).replace(tzinfo=UTC)
            end = datetime.fromisoformat(query["endTime"]).replace(tzinfo=UTC)
            if end - start > timedelta(hours=24) or end <= start:
                return _af_error(
                    400,
                    "AF20030",
                    "Start time and end time must both be specified (or both omitted) and "
                    "must be less than or equal to 24 hours apart.",
                )
            listed = [
                {
                    "contentType": kind,
                    "contentId": cid,
                    "contentUri": f"{FEED}/audit/{cid}",
                    "contentCreated": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "contentExpiration": (created + timedelta(days=7)).isoformat(),
                }
                for cid, (kind, created, _) in sorted(self.blobs.items(), key=lambda b: b[1][1])
                if kind == content_type
                and start <= created
                and (created < end or (self.inclusive_end and created == end))
            ]
            offset = int(query.get("nextPage", "0"))
            headers = {}
            if offset + self.listing_page < len(listed):
                headers["NextPageUri"] = (
                    f"{FEED}/subscriptions/content?contentType={content_type}"
                    f"&startTime={query['startTime']}&endTime={query['endTime']}"
                    f"&nextPage={offset + self.listing_page}"
                )
            return httpx.Response(
                200, json=listed[offset : offset + self.listing_page], headers=headers
            )
        if "/audit/" in path:
            return httpx.Response(200, json=self.blobs[path.rsplit("/", 1)[1]][2])
        return _af_error(404, "AF50000", "Not found")

    def scopes_seen(self, host_url: str) -> set[str | None]:
        return {
            self.tokens.get(r.headers.get("authorization", "").removeprefix("Bearer "))
            for r in self.requests
            if str(r.url).startswith(host_url)
        }

    def listings(self) -> list[tuple[str, str]]:
        return [
            (r.url.params["startTime"], r.url.params["endTime"])
            for r in self.requests
            if r.url.path.endswith("/subscriptions/content") and "nextPage" not in r.url.params
        ]


@pytest.fixture
def fake() -> ContractFake:
    return ContractFake()


@pytest.fixture
def vendor(fake: ContractFake) -> Iterator[GraphConnector]:
    graph = GraphConnector(
        tenant_id=TENANT, client_id="app", client_secret="secret", backoff_initial=0.01
    )
    graph._http.close()
    graph._http = httpx.Client(transport=httpx.MockTransport(fake.handle))
    with graph:
        yield graph


def record(event_id: str | None, at: str = "2026-11-25T01:00:00") -> dict[str, Any]:
    return {**SHAREPOINT_RECORD, "Id": event_id, "CreationTime": at}


def pages_of(connector: GraphConnector, source: str, start: datetime, end: datetime) -> list:
    return list(connector.activities(source, start, end))


def test_each_api_only_ever_gets_its_own_token(fake: ContractFake, vendor: GraphConnector) -> None:
    fake.sign_ins = [
        {**SIGN_IN, "id": f"s{i}", "createdDateTime": "2026-11-25T01:00:00Z"} for i in range(3)
    ]
    fake.add_blob("b1", T0 + timedelta(hours=1), [record("r1")])
    signins = pages_of(vendor, "signIns", T0, T0 + timedelta(hours=2))
    audits = pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))
    assert [a.event_id for page in signins for a in page] == ["s0", "s1", "s2"]
    assert [a.event_id for page in audits for a in page] == ["r1"]
    assert fake.scopes_seen(GRAPH) == {GRAPH_SCOPE}
    assert fake.scopes_seen(MANAGE) == {MANAGE_SCOPE}
    token_requests = [r for r in fake.requests if r.url.path.endswith("/token")]
    assert len(token_requests) == 2  # one per audience, each cached


def test_a_401_from_one_api_refreshes_only_its_token(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    fake.add_blob("b1", T0 + timedelta(hours=1), [record("r1")])
    pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))
    fake.sign_ins = [{**SIGN_IN, "createdDateTime": "2026-11-25T01:00:00Z"}]
    pages_of(vendor, "signIns", T0, T0 + timedelta(hours=2))
    graph_token = next(t for t, s in fake.tokens.items() if s == GRAPH_SCOPE)
    fake.overrides.append(
        (lambda r: "/subscriptions/content" in r.url.path, _af_error(401, "AF10001", "expired"))
    )
    assert len(pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))) == 1
    assert sorted(fake.tokens.values()).count(MANAGE_SCOPE) == 2  # refreshed
    pages_of(vendor, "signIns", T0, T0 + timedelta(hours=2))
    last_graph = [r for r in fake.requests if str(r.url).startswith(GRAPH)][-1]
    assert last_graph.headers["authorization"] == f"Bearer {graph_token}"  # still cached


def test_long_window_is_split_into_days_and_blobs_read_once(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    fake.listing_page = 1
    for hour in (1, 23, 24, 30, 49):
        fake.add_blob(f"b{hour}", T0 + timedelta(hours=hour), [record(f"r{hour}")])
    fake.add_blob("late", T0 + timedelta(hours=60), [record("too-late")])
    start, end = T0 + timedelta(minutes=30), T0 + timedelta(hours=50, minutes=30)
    pages = pages_of(vendor, "Audit.SharePoint", start, end)
    # In the listing's order, though blobs are fetched several at a time.
    assert [a.event_id for page in pages for a in page] == ["r1", "r23", "r24", "r30", "r49"]
    assert fake.listings() == [
        ("2026-11-25T00:30:00", "2026-11-26T00:30:00"),
        ("2026-11-26T00:30:00", "2026-11-27T00:30:00"),
        ("2026-11-27T00:30:00", "2026-11-27T02:30:00"),
    ]
    # Records are not filtered by CreationTime: the blob's listing decides.
    assert {a.occurred_at for page in pages for a in page} == {
        datetime(2026, 11, 25, 1, tzinfo=UTC)
    }


def test_stopping_early_does_not_wait_for_throttled_blobs(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    for n in range(6):
        fake.add_blob(f"b{n}", T0 + timedelta(minutes=10 * n), [record(f"r{n}")])
    throttled = httpx.Response(
        429, json={"error": {"code": "AF429", "message": "Too many requests."}},
        headers={"Retry-After": "30"},
    )  # fmt: skip
    fake.overrides += [(lambda r: r.url.path.endswith(("/b2", "/b3")), throttled)] * 4
    started = time.monotonic()
    pages = vendor.activities("Audit.SharePoint", T0, T0 + timedelta(hours=2))
    assert [a.event_id for a in next(pages)] == ["r0"]
    pages.close()
    assert time.monotonic() - started < 5


def test_blob_listed_in_two_windows_is_read_once(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    fake.inclusive_end = True
    fake.add_blob("edge", T0 + timedelta(hours=24), [record("r-edge")])
    pages = pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=30))
    assert [a.event_id for page in pages for a in page] == ["r-edge"]
    assert len(fake.listings()) == 2
    assert sum(1 for r in fake.requests if "/audit/edge" in r.url.path) == 1


def test_a_url_outside_the_api_never_gets_its_token(vendor: GraphConnector) -> None:
    for url in (f"{MANAGE}/api/v1.0/x", "https://graph.microsoft.com.evil.example/v1.0/x"):
        with pytest.raises(ConnectorError, match="refusing to send the Graph token"):
            vendor._request("GET", url, api=vendor._graph_api)
    with pytest.raises(ConnectorError, match="refusing to send the Management API token"):
        vendor._request("GET", f"{GRAPH}/auditLogs/signIns", api=vendor._management_api)


def test_subscription_started_once_and_already_enabled_is_fine(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    fake.subscribed.add("Audit.SharePoint")  # enabled by an earlier run
    fake.add_blob("b1", T0 + timedelta(hours=1), [record("r1")])
    assert len(pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))) == 1
    pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))
    starts = [r for r in fake.requests if r.url.path.endswith("/subscriptions/start")]
    assert len(starts) == 1 and starts[0].method == "POST"
    assert starts[0].url.params["contentType"] == "Audit.SharePoint"


def test_lost_subscription_is_started_again(fake: ContractFake, vendor: GraphConnector) -> None:
    pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))
    fake.subscribed.clear()  # stopped by someone else meanwhile
    fake.add_blob("b1", T0 + timedelta(hours=1), [record("r1")])
    assert len(pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))) == 1


def test_missing_activity_feed_permission_names_it(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    denied = _af_error(
        401,
        "AF10001",
        "The permission set () sent in the request did not include ActivityFeed.Read.",
    )
    matches: Callable[[httpx.Request], bool] = lambda r: r.url.host == "manage.office.com"  # noqa: E731
    fake.overrides += [(matches, denied), (matches, denied)]
    with pytest.raises(PermissionDeniedError, match=r"ActivityFeed\.Read \(Office 365"):
        pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=1))
    assert sorted(fake.tokens.values()).count(MANAGE_SCOPE) == 2  # refreshed once, first


def test_subscription_refused_is_a_clear_error(fake: ContractFake, vendor: GraphConnector) -> None:
    fake.overrides.append(
        (
            lambda r: r.url.path.endswith("/subscriptions/start"),
            _af_error(400, "AF20023", "The subscription was disabled by an administrator."),
        )
    )
    with pytest.raises(VendorError, match="AF20023.*disabled by an administrator"):
        pages_of(vendor, "Audit.General", T0, T0 + timedelta(hours=1))


def test_window_refused_by_the_vendor_is_a_clear_error(
    fake: ContractFake, vendor: GraphConnector
) -> None:
    fake.overrides.append(
        (
            lambda r: "/subscriptions/content" in r.url.path,
            _af_error(400, "AF20055", "Start time cannot be more than seven days in the past."),
        )
    )
    with pytest.raises(VendorError) as raised:
        pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=1))
    message = str(raised.value)
    assert "AF20055" in message and "7 days" in message and "2026-11-25T00:00:00" in message
    assert raised.value.status == 400


@pytest.mark.parametrize("where", ["next_page", "content_uri"])
def test_management_links_to_another_host_are_refused(
    fake: ContractFake, vendor: GraphConnector, where: str
) -> None:
    evil = "https://attacker.example/api/v1.0/x"
    fake.add_blob("b1", T0 + timedelta(hours=1), [record("r1")])
    listing: list[dict[str, Any]] = [{"contentId": "b1", "contentUri": f"{FEED}/audit/b1"}]
    headers = {"NextPageUri": evil}
    if where == "content_uri":
        listing, headers = [{"contentId": "x", "contentUri": evil}], {}
    fake.overrides.append(
        (
            lambda r: "/subscriptions/content" in r.url.path,
            httpx.Response(200, json=listing, headers=headers),
        )
    )
    with pytest.raises(VendorError, match="another host"):
        pages_of(vendor, "Audit.SharePoint", T0, T0 + timedelta(hours=2))
    assert not any("attacker" in str(r.url) for r in fake.requests)


def test_graph_filter_and_exclusive_end(fake: ContractFake, vendor: GraphConnector) -> None:
    times = ["2026-11-25T00:59:59.9999999Z", "2026-11-25T01:00:00Z", "2026-11-25T01:59:59.5Z",
             "2026-11-25T02:00:00Z", "garbage"]  # fmt: skip
    fake.sign_ins = [
        {**SIGN_IN, "id": f"s{i}", "createdDateTime": t} for i, t in enumerate(times)
    ] + [{**SIGN_IN, "id": None}]
    before = vendor.skipped_activities
    pages = pages_of(vendor, "signIns", T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    assert [a.event_id for page in pages for a in page] == ["s1", "s2"]
    assert vendor.skipped_activities - before == 2
    first = next(r for r in fake.requests if r.url.path.endswith("/auditLogs/signIns"))
    assert first.url.params["$filter"] == (
        "createdDateTime ge 2026-11-25T01:00:00Z and createdDateTime le 2026-11-25T02:00:00Z"
    )
    assert first.url.params["$top"] == "1000"


def test_unknown_source_and_empty_window(vendor: GraphConnector, fake: ContractFake) -> None:
    with pytest.raises(ConnectorError, match="unknown activity source 'Audit.Nope'"):
        pages_of(vendor, "Audit.Nope", T0, T0 + timedelta(hours=1))
    assert pages_of(vendor, "signIns", T0, T0) == []
    assert not fake.requests


def test_tokens_cannot_be_mixed_by_configuration() -> None:
    with pytest.raises(ValueError, match="tokens would mix"):
        GraphConnector(
            tenant_id=TENANT,
            client_id="a",
            client_secret="s",
            graph_url="https://proxy.example/v1.0",
            management_url="https://proxy.example/",
        )


# --- the connector over real HTTPS against the sandbox tenant -------------------------------


@pytest.fixture(scope="module")
def quiet() -> Iterator[GraphSandbox]:
    """A sandbox without synthetic traffic (only injected events), 2 blobs per listing page."""
    with GraphSandbox(activity_rate=0, management_page_size=2) as tenant:
        yield tenant


@pytest.fixture
def tenant(quiet: GraphSandbox) -> Iterator[GraphSandbox]:
    permissions = set(quiet.permissions)
    quiet.reset_log()
    yield quiet
    quiet.faults.clear()
    quiet.activity.clear_injected()
    quiet.permissions.clear()
    quiet.permissions.update(permissions)


def hour_ago(hours: float) -> datetime:
    return (datetime.now(UTC) - timedelta(hours=hours)).replace(second=0, microsecond=0)


def ids(pages: list[list[Activity]]) -> list[str]:
    return [a.event_id for page in pages for a in page]


def listings(tenant: GraphSandbox) -> list[tuple[datetime, datetime]]:
    found = []
    for request in tenant.requests:
        if request.path.endswith("/subscriptions/content") and "nextPage" not in request.query:
            query = dict(pair.split("=", 1) for pair in request.query.split("&"))
            found.append(
                tuple(
                    datetime.fromisoformat(unquote(query[k])).replace(tzinfo=UTC)
                    for k in ("startTime", "endTime")
                )
            )
    return found  # type: ignore[return-value]


def test_sign_ins_page_across_next_links_and_the_end_is_exclusive(tenant: GraphSandbox) -> None:
    user = next(u for u in tenant.org.users.values() if u.user_type == "Member")
    start, end = hour_ago(3), hour_ago(2)
    inside = [
        tenant.activity.add_sign_in(user.id, start + timedelta(seconds=3 * i)) for i in range(1003)
    ]
    tenant.activity.add_sign_in(user.id, end)  # at the end: the next window's
    tenant.activity.add_sign_in(user.id, start - timedelta(seconds=1))
    failed = tenant.activity.add_sign_in(
        user.id, start + timedelta(minutes=59), country="GB", ip="81.2.69.160", success=False
    )
    with make_connector(tenant) as graph:
        pages = pages_of(graph, "signIns", start, end)
    assert sorted(ids(pages)) == sorted([*inside, failed])
    requests = [r for r in tenant.requests if r.path == "/v1.0/auditLogs/signIns"]
    assert len(requests) >= 2  # 1004 events at $top=1000: a nextLink was followed
    assert "$top=1000" in unquote(requests[0].query)
    by_id = {a.event_id: a for page in pages for a in page}
    assert by_id[failed].success is False and by_id[failed].country == "GB"
    assert by_id[failed].ip_address == "81.2.69.160"
    assert by_id[failed].actor_account_id == user.id
    assert by_id[inside[0]].success is True and by_id[inside[0]].action == "Sign-in"


def test_directory_audits_by_people_and_by_apps(tenant: GraphSandbox) -> None:
    admin = tenant.org.users[tenant.org.direct_admin_user_ids()[0]]
    start, end = hour_ago(4), hour_ago(3)
    by_person = tenant.activity.add_directory_audit(
        admin.id, start + timedelta(minutes=5), "Update user", ip="10.1.2.3"
    )
    by_app = tenant.activity.add_directory_audit(
        None, start + timedelta(minutes=6), "Add user", app="HR Sync Connector"
    )
    with make_connector(tenant) as graph:
        pages = pages_of(graph, "directoryAudits", start, end)
    found = [a for page in pages for a in page]
    assert len(found) == 2
    # The sandbox answers Graph-shaped ids ("Directory_{id}_..."), not the id it returned.
    by_id = {key: next(a for a in found if key in a.event_id) for key in (by_person, by_app)}
    person = by_id[by_person]
    assert person.actor_account_id == admin.id and person.action == "Update user"
    assert person.actor_email == admin.user_principal_name and person.ip_address == "10.1.2.3"
    app = by_id[by_app]
    assert app.actor_email is None and app.actor_account_id is None
    assert "HR Sync Connector" in app.raw and app.action == "Add user"
    query = unquote_plus(next(r.query for r in tenant.requests if "directoryAudits" in r.path))
    assert "activityDateTime ge " in query and "activityDateTime le " in query


def test_management_pages_across_next_page_uri_despite_throttling(tenant: GraphSandbox) -> None:
    user = next(iter(tenant.org.users.values()))
    start, end = hour_ago(6), hour_ago(1)
    injected = [
        tenant.activity.add_file_event(
            user.user_principal_name,
            start + timedelta(minutes=20 * i + 1),
            file_name=f"{HOSTILE} {i}.docx",
            ip="[2001:db8::7]:443",
        )
        for i in range(12)
    ]
    tenant.faults.add("throttle", path="subscriptions/content", count=2, retry_after="0.3")
    started = time.monotonic()
    with make_connector(tenant) as graph:
        pages = pages_of(graph, "Audit.SharePoint", start, end)
        assert graph.skipped_activities == 0
    assert time.monotonic() - started >= 0.6
    assert tenant.faults.pending() == 0
    assert sorted(ids(pages)) == sorted(injected)
    pages_listed = [r for r in tenant.requests if r.path.endswith("/subscriptions/content")]
    assert any("nextPage" in r.query for r in pages_listed)  # NextPageUri followed
    activity = pages[0][0]
    assert activity.source == "Audit.SharePoint" and activity.action == "FileAccessed"
    assert activity.ip_address == "2001:db8::7" and activity.object_name.startswith(HOSTILE)  # type: ignore[union-attr]
    assert activity.actor_email == user.user_principal_name and activity.actor_account_id is None


def test_management_window_over_a_day_is_split(tenant: GraphSandbox) -> None:
    user = next(iter(tenant.org.users.values()))
    start, end = hour_ago(31), hour_ago(1)
    early = tenant.activity.add_file_event(user.id, start + timedelta(minutes=30))
    late = tenant.activity.add_file_event(user.id, end - timedelta(hours=2))
    with make_connector(tenant) as graph:
        pages = pages_of(graph, "Audit.SharePoint", start, end)
    assert sorted(ids(pages)) == sorted([early, late])
    windows = listings(tenant)
    assert len(windows) == 2 and all(e - s <= timedelta(hours=24) for s, e in windows)
    assert windows[0][0] == start and windows[-1][1] == end
    assert windows[0][1] == windows[1][0]  # contiguous


def test_subscription_already_enabled_is_success(tenant: GraphSandbox) -> None:
    with make_connector(tenant) as graph:
        pages_of(graph, "Audit.General", hour_ago(2), hour_ago(1))
    tenant.reset_log()
    with make_connector(tenant) as graph:  # a new connector: starts again, is told "enabled"
        pages_of(graph, "Audit.General", hour_ago(2), hour_ago(1))
        pages_of(graph, "Audit.General", hour_ago(2), hour_ago(1))
    starts = [r for r in tenant.requests if r.path.endswith("/subscriptions/start")]
    assert [r.status for r in starts] == [400]  # AF20024, once per connector
    assert all(r.status == 200 for r in tenant.requests if r.path.endswith("/content"))


def test_missing_audit_permission_is_named(tenant: GraphSandbox) -> None:
    tenant.permissions.discard("AuditLog.Read.All")
    with make_connector(tenant) as graph, pytest.raises(PermissionDeniedError) as raised:
        pages_of(graph, "signIns", hour_ago(2), hour_ago(1))
    assert "AuditLog.Read.All" in str(raised.value)
    assert tenant.request_count("/v1.0/auditLogs") == 1  # not retried


def test_missing_activity_feed_permission_is_named(tenant: GraphSandbox) -> None:
    tenant.permissions.discard("ActivityFeed.Read")
    with make_connector(tenant) as graph, pytest.raises(PermissionDeniedError) as raised:
        pages_of(graph, "Audit.SharePoint", hour_ago(2), hour_ago(1))
    assert "ActivityFeed.Read" in str(raised.value) and "AF10001" in str(raised.value)


def test_window_older_than_seven_days_is_refused_clearly(tenant: GraphSandbox) -> None:
    with make_connector(tenant) as graph, pytest.raises(VendorError) as raised:
        pages_of(graph, "Audit.SharePoint", hour_ago(24 * 8), hour_ago(24 * 8 - 2))
    assert "AF20030" in str(raised.value) and "7 days" in str(raised.value)


def _audience(authorization: str) -> str:
    payload = authorization.removeprefix("Bearer ").split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["aud"]


def test_management_host_never_receives_the_graph_token(tenant: GraphSandbox) -> None:
    seen: list[tuple[str, str]] = []
    user = next(iter(tenant.org.users.values()))
    tenant.activity.add_file_event(user.id, hour_ago(3))
    tenant.activity.add_sign_in(user.id, hour_ago(3))
    with make_connector(tenant) as graph:
        graph._http.event_hooks["request"].append(
            lambda r: seen.append((r.url.path, r.headers.get("authorization", "")))
        )
        assert ids(pages_of(graph, "signIns", hour_ago(4), hour_ago(2)))
        assert ids(pages_of(graph, "Audit.SharePoint", hour_ago(4), hour_ago(1)))
        tenant.expire_tokens()  # both refreshed after a 401, each with its own audience
        pages_of(graph, "Audit.SharePoint", hour_ago(4), hour_ago(1))
        pages_of(graph, "signIns", hour_ago(4), hour_ago(2))
    management = {auth for path, auth in seen if path.startswith("/office-management/")}
    graph_tokens = {auth for path, auth in seen if path.startswith("/v1.0/")}
    assert management and graph_tokens and not management & graph_tokens
    assert {_audience(a) for a in management} == {"https://manage.office.com"}
    assert {_audience(a) for a in graph_tokens} == {"https://graph.microsoft.com"}


def test_administrators_are_role_holders_with_groups_expanded(tenant: GraphSandbox) -> None:
    with make_connector(tenant) as graph:
        admins = list(graph.administrators())
    found = [a.account_id for a in admins]
    assert len(found) == len(set(found))  # each person once
    assert sorted(found) == sorted(tenant.org.admin_user_ids())
    through_group = set(tenant.org.admin_user_ids()) - set(tenant.org.direct_admin_user_ids())
    assert through_group  # the role-assignable group's people are included
    readers = {
        m
        for role in tenant.org.roles
        if not role.is_admin
        for m in role.members
        if m in tenant.org.users
    } - set(tenant.org.admin_user_ids())
    assert readers and not readers & set(found)
    directory_roles = [r for r in tenant.requests if r.path.startswith("/v1.0/directoryRoles")]
    assert all(not r.query for r in directory_roles)  # the endpoint takes no OData options


def test_missing_role_permission_is_named(tenant: GraphSandbox) -> None:
    tenant.permissions.discard("RoleManagement.Read.Directory")
    tenant.permissions.discard("Directory.Read.All")
    with make_connector(tenant) as graph, pytest.raises(PermissionDeniedError) as raised:
        list(graph.administrators())
    assert "RoleManagement.Read.Directory" in str(raised.value)


def test_verified_domains(tenant: GraphSandbox) -> None:
    with make_connector(tenant) as graph:
        domains = graph.verified_domains()
    expected = [d["id"].lower() for d in tenant.org.domains if d.get("isVerified")]
    assert domains == expected and all(d == d.lower() for d in domains)
    assert len(domains) < len(tenant.org.domains) or all(
        d.get("isVerified") for d in tenant.org.domains
    )
