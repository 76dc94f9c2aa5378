"""Audit activity of the sandbox over real HTTPS: Graph directoryRoles and auditLogs, and the
Office 365 Management Activity API (served under ``/office-management``)."""

from __future__ import annotations

import datetime as dt
import json
import re
import ssl
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from groupsync_pipeline.sandbox.activity_stream import (
    ABROAD_COUNTRIES,
    HR_FILES,
    ActivityStream,
)
from groupsync_pipeline.sandbox.graph import (
    DEFAULT_PERMISSIONS,
    GRAPH_SCOPE,
    MANAGEMENT_SCOPE,
    GraphSandbox,
)
from groupsync_pipeline.sandbox.seed import GLOBAL_ADMIN_TEMPLATE, DirectoryRole

from .conftest import VENDOR_EXAMPLES

REFERENCE = VENDOR_EXAMPLES / "graph"
# A Wednesday noon (UTC): work hours, so every kind of event is about.
NOON = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC).timestamp()
GRAPH_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")
RECORD_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")


class Clock:
    """A settable sandbox clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reference(name: str) -> dict[str, Any]:
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))


def iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_graph_time(text: str) -> float:
    return dt.datetime.fromisoformat(text[:26].replace("Z", "") + "+00:00").timestamp()


def token(sandbox: GraphSandbox, http: httpx.Client, scope: str = GRAPH_SCOPE) -> str:
    resp = http.post(
        sandbox.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.client_id,
            "client_secret": sandbox.client_secret,
            "scope": scope,
        },
    )
    resp.raise_for_status()
    return resp.json()["access_token"]


class Tenant:
    """A started sandbox with a Graph client and a Management API client."""

    def __init__(self, sandbox: GraphSandbox, clock: Clock) -> None:
        self.sandbox, self.clock = sandbox, clock
        ctx = ssl.create_default_context(cafile=sandbox.ca_bundle)
        self.graph = httpx.Client(verify=ctx, timeout=30, base_url=sandbox.graph_url + "/")
        self.mgmt = httpx.Client(verify=ctx, timeout=30, base_url=sandbox.management_feed_url + "/")
        self.graph.headers["Authorization"] = f"Bearer {token(sandbox, self.graph)}"
        self.mgmt.headers["Authorization"] = f"Bearer {token(sandbox, self.mgmt, MANAGEMENT_SCOPE)}"

    def close(self) -> None:
        self.graph.close()
        self.mgmt.close()
        self.sandbox.stop()

    def all_pages(self, url: str, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        resp = self.graph.get(url, params=params)
        while True:
            assert resp.status_code == 200, resp.text
            body = resp.json()
            items += body["value"]
            if "@odata.nextLink" not in body:
                return items
            resp = self.graph.get(body["@odata.nextLink"])

    def content(self, content_type: str, start: float, end: float) -> list[dict[str, Any]]:
        blobs: list[dict[str, Any]] = []
        resp = self.mgmt.get(
            "subscriptions/content",
            params={
                "contentType": content_type,
                "startTime": iso(start)[:-1],
                "endTime": iso(end)[:-1],
            },
        )
        while True:
            assert resp.status_code == 200, resp.text
            blobs += resp.json()
            if "NextPageUri" not in resp.headers:
                return blobs
            resp = self.mgmt.get(resp.headers["NextPageUri"])

    def records(self, content_type: str, start: float, end: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for blob in self.content(content_type, start, end):
            resp = self.mgmt.get(blob["contentUri"])
            assert resp.status_code == 200, resp.text
            out += resp.json()
        return out


def open_tenant(now: float = NOON, **kwargs: Any) -> Tenant:
    clock = Clock(now)
    return Tenant(GraphSandbox(clock=clock, **kwargs).start(), clock)


@pytest.fixture(scope="module")
def tenant() -> Iterator[Tenant]:
    t = open_tenant()
    for content_type in ("Audit.SharePoint", "Audit.AzureActiveDirectory", "Audit.General"):
        assert t.mgmt.post("subscriptions/start", params={"contentType": content_type}).is_success
    yield t
    t.close()


@pytest.fixture(scope="module")
def quiet_day() -> Iterator[Tenant]:
    """A low background rate: the stories stand out and a whole day stays cheap."""
    t = open_tenant(NOON + 12 * 3600, activity_rate=60, management_page_size=7)
    for content_type in ("Audit.SharePoint", "Audit.AzureActiveDirectory"):
        assert t.mgmt.post("subscriptions/start", params={"contentType": content_type}).is_success
    yield t
    t.close()


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("tenant", "quiet_day"):
        if name in request.fixturenames:
            t: Tenant = request.getfixturevalue(name)
            t.sandbox.faults.clear()
            t.sandbox.permissions = set(DEFAULT_PERMISSIONS)


# -- directory roles ---------------------------------------------------------------------------
def test_directory_roles_and_members(tenant: Tenant) -> None:
    org = tenant.sandbox.org
    body = tenant.graph.get("directoryRoles").json()
    assert body["@odata.context"].endswith("$metadata#directoryRoles")
    roles = {r["roleTemplateId"]: r for r in body["value"]}
    assert set(reference("roles.json")["GET_/v1.0/directoryRoles"]["value"][0]) <= set(
        roles[GLOBAL_ADMIN_TEMPLATE]
    )
    assert roles[GLOBAL_ADMIN_TEMPLATE]["displayName"] == "Global Administrator"
    assert {"Reports Reader", "Exchange Administrator", "SharePoint Administrator"} <= {
        r["displayName"] for r in roles.values()
    }
    by_id = tenant.graph.get(f"directoryRoles/{roles[GLOBAL_ADMIN_TEMPLATE]['id']}/members")
    by_template = tenant.graph.get(f"directoryRoles/roleTemplateId={GLOBAL_ADMIN_TEMPLATE}/members")
    assert by_id.status_code == by_template.status_code == 200
    assert by_id.json()["value"] == by_template.json()["value"]
    for member in by_id.json()["value"]:
        assert member["@odata.type"] == "#microsoft.graph.user"
        assert {"id", "displayName", "userPrincipalName", "mail", "userType"} <= set(member)
    # Every member type: users, the role-assignable group, a service principal.
    types = Counter()
    for role in roles.values():
        for member in tenant.all_pages(f"directoryRoles/{role['id']}/members"):
            types[member["@odata.type"]] += 1
    assert types["#microsoft.graph.group"] == 1 and types["#microsoft.graph.servicePrincipal"] == 2
    group = next(g for g in org.groups.values() if g.id in org.role_assignable_group_ids())
    listed = tenant.graph.get(f"groups/{group.id}").json()
    assert listed["isAssignableToRole"] is True
    # Admins, transitively: the named holders plus everyone in the role-assignable group.
    admins = set(org.admin_user_ids())
    assert set(org.direct_admin_user_ids()) < admins
    assert set(org.transitive_user_ids(group.id)) <= admins


def test_directory_roles_errors_and_permissions(tenant: Tenant) -> None:
    assert tenant.graph.get("directoryRoles", params={"$top": "5"}).status_code == 400
    missing = tenant.graph.get("directoryRoles/roleTemplateId=00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert tenant.graph.get("directoryRoles/not-a-guid").status_code == 400
    tenant.sandbox.permissions -= {"RoleManagement.Read.Directory", "Directory.Read.All"}
    denied = tenant.graph.get("directoryRoles")
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "Authorization_RequestDenied"
    tenant.sandbox.permissions.add("RoleManagement.Read.Directory")
    assert tenant.graph.get("directoryRoles").status_code == 200


def test_directory_role_members_page_with_next_link() -> None:
    t = open_tenant(activity_rate=0)
    try:
        org = t.sandbox.org
        members = list(org.users)[:250]
        org.roles.append(
            DirectoryRole(
                "6a1f0d43-4f43-4c36-9a2e-6cd2e5a3c001",
                "f2ef992c-3afb-46b9-b7cf-a126ee74c451",
                "Global Reader",
                "Reads everything.",
                False,
                members,
            )
        )
        first = t.graph.get("directoryRoles/6a1f0d43-4f43-4c36-9a2e-6cd2e5a3c001/members").json()
        assert len(first["value"]) == 100 and "$skiptoken=" in first["@odata.nextLink"]
        listed = t.all_pages("directoryRoles/6a1f0d43-4f43-4c36-9a2e-6cd2e5a3c001/members")
        assert [m["id"] for m in listed] == members
    finally:
        t.close()


# -- auditLogs/signIns ---------------------------------------------------------------------------
def key_shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    return None


def test_sign_ins_shape_matches_the_docs(tenant: Tenant) -> None:
    example = reference("auditlogs.json")["GET_/v1.0/auditLogs/signIns"]
    body = tenant.graph.get("auditLogs/signIns", params={"$top": "200"}).json()
    assert body["@odata.context"].endswith("$metadata#auditLogs/signIns")
    expected = key_shape(example["value"][0])
    statuses = Counter()
    for item in body["value"]:
        assert set(item) == set(expected)
        for key in ("status", "deviceDetail", "location"):
            assert set(item[key]) == set(expected[key])
        assert GRAPH_TIME.match(item["createdDateTime"])
        statuses[item["status"]["errorCode"] == 0] += 1
    assert statuses[True] > statuses[False] > 0  # mostly successes, some failures


def test_sign_ins_newest_first_paging_and_filters(tenant: Tenant) -> None:
    start, end = NOON - 2 * 3600, NOON - 3600
    flt = f"createdDateTime ge {iso(start)} and createdDateTime le {iso(end)}"
    first = tenant.graph.get("auditLogs/signIns", params={"$filter": flt, "$top": "100"}).json()
    link = first["@odata.nextLink"]
    assert link.startswith(tenant.sandbox.graph_url + "/auditLogs/signIns?")
    assert "$skiptoken=" in link and "$top=100" in link
    paged = tenant.all_pages("auditLogs/signIns", **{"$filter": flt, "$top": "100"})
    whole = tenant.all_pages("auditLogs/signIns", **{"$filter": flt})
    assert [s["id"] for s in paged] == [s["id"] for s in whole]
    assert len({s["id"] for s in paged}) == len(paged) > 300
    times = [parse_graph_time(s["createdDateTime"]) for s in paged]
    assert times == sorted(times, reverse=True)
    assert start <= min(times) and max(times) <= end + 1e-3
    # lt/gt are exclusive bounds; a window of the first ten minutes is a subset.
    flt2 = f"createdDateTime gt {iso(start)} and createdDateTime lt {iso(start + 600)}"
    subset = tenant.all_pages("auditLogs/signIns", **{"$filter": flt2})
    assert subset and {s["id"] for s in subset} < {s["id"] for s in paged}
    one = paged[5]
    by_user = tenant.all_pages(
        "auditLogs/signIns", **{"$filter": f"{flt} and userId eq '{one['userId']}'"}
    )
    assert one["id"] in {s["id"] for s in by_user}
    assert {s["userId"] for s in by_user} == {one["userId"]}


def test_sign_ins_limits_and_errors(tenant: Tenant) -> None:
    get = tenant.graph.get
    assert len(get("auditLogs/signIns").json()["value"]) == 1000  # default page
    for top in ("0", "1001", "x"):
        assert get("auditLogs/signIns", params={"$top": top}).status_code == 400
    assert get("auditLogs/signIns", params={"$top": "1000"}).status_code == 200
    for params in (
        {"$skip": "10"},
        {"$select": "id"},
        {"$filter": "createdDateTime ge '2026-11-25T00:00:00Z'"},
        {"$filter": "startswith(appDisplayName,'Graph')"},
        {"$filter": "createdDateTime ge yesterday"},
        {"$skiptoken": "forged"},
        {"$orderby": "createdDateTime asc"},
    ):
        resp = get("auditLogs/signIns", params=params)
        assert resp.status_code == 400, params
        assert resp.json()["error"]["code"] in (
            "BadRequest",
            "Request_BadRequest",
            "Request_UnsupportedQuery",
        )
    assert get("auditLogs/somethingElse").status_code == 400
    tenant.sandbox.permissions.discard("AuditLog.Read.All")
    denied = get("auditLogs/signIns")
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "Authorization_RequestDenied"


def test_guests_sign_in_with_their_ext_upn(quiet_day: Tenant) -> None:
    org = quiet_day.sandbox.org
    day = quiet_day.all_pages(
        "auditLogs/signIns",
        **{
            "$filter": f"createdDateTime ge {iso(NOON - 12 * 3600)} and "
            f"createdDateTime lt {iso(NOON + 12 * 3600)}"
        },
    )
    guests = [s for s in day if org.users[s["userId"]].user_type == "Guest"]
    assert len(guests) >= 8
    assert all("#EXT#@" in s["userPrincipalName"] for s in guests)
    failed = [s for s in day if s["status"]["errorCode"] != 0]
    assert failed and all(s["status"]["failureReason"] for s in failed)
    # Failed attempts often come from unresolved places: null city, country still known.
    assert any(s["location"]["city"] is None for s in failed)


# -- auditLogs/directoryAudits -----------------------------------------------------------------
def test_directory_audits_shape_filters_and_permissions(tenant: Tenant) -> None:
    example = reference("auditlogs.json")[
        "GET_/v1.0/auditLogs/directoryAudits?$filter=initiatedBy/user/id eq "
        "'00000000-0000-0000-0000-000000000000'"
    ]["value"][0]
    flt = f"activityDateTime ge {iso(NOON - 6 * 3600)} and activityDateTime le {iso(NOON)}"
    audits = tenant.all_pages("auditLogs/directoryAudits", **{"$filter": flt, "$top": "20"})
    assert len(audits) > 40
    by_app = [a for a in audits if a["initiatedBy"]["user"] is None]
    by_user = [a for a in audits if a["initiatedBy"]["user"] is not None]
    assert by_app and by_user
    for audit in audits:
        assert set(audit) == set(example)
        assert set(audit["initiatedBy"]) == {"user", "app"}
        assert GRAPH_TIME.match(audit["activityDateTime"])
        for target in audit["targetResources"]:
            assert set(target) == set(example["targetResources"][0])
    assert all(a["initiatedBy"]["app"]["displayName"] for a in by_app)
    user = by_user[0]["initiatedBy"]["user"]
    assert set(user) == set(example["initiatedBy"]["user"])
    admins = set(tenant.sandbox.org.admin_user_ids())
    assert {a["initiatedBy"]["user"]["id"] for a in by_user} <= admins
    activities = {a["activityDisplayName"] for a in audits}
    assert {"Add member to group", "Reset user password", "Update user"} & activities
    mine = tenant.all_pages(
        "auditLogs/directoryAudits",
        **{"$filter": f"{flt} and initiatedBy/user/id eq '{user['id']}'"},
    )
    assert mine and {a["initiatedBy"]["user"]["id"] for a in mine} == {user["id"]}
    assert (
        tenant.graph.get(
            "auditLogs/directoryAudits", params={"$filter": f"createdDateTime ge {iso(NOON)}"}
        ).status_code
        == 400
    )
    tenant.sandbox.permissions.discard("Directory.Read.All")
    assert tenant.graph.get("auditLogs/directoryAudits").status_code == 403
    assert tenant.graph.get("auditLogs/signIns", params={"$top": "1"}).status_code == 200


# -- tokens: one audience each ---------------------------------------------------------------
def test_graph_and_management_refuse_each_others_tokens(tenant: Tenant) -> None:
    graph_token = tenant.graph.headers["Authorization"]
    mgmt_token = tenant.mgmt.headers["Authorization"]
    wrong = tenant.graph.get("auditLogs/signIns", headers={"Authorization": mgmt_token})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "InvalidAuthenticationToken"
    wrong = tenant.mgmt.get("subscriptions/list", headers={"Authorization": graph_token})
    assert wrong.status_code == 401 and "WWW-Authenticate" in wrong.headers
    mixed = tenant.graph.post(
        tenant.sandbox.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": tenant.sandbox.client_id,
            "client_secret": tenant.sandbox.client_secret,
            "scope": f"{GRAPH_SCOPE} {MANAGEMENT_SCOPE}",
        },
    )
    assert mixed.status_code == 400 and mixed.json()["error"] == "invalid_scope"
    settings = tenant.sandbox.connection_settings()
    assert settings["management_url"] == tenant.sandbox.management_url
    assert settings["management_url"].endswith("/office-management")


def test_management_needs_activity_feed_read(tenant: Tenant) -> None:
    tenant.sandbox.permissions.discard("ActivityFeed.Read")
    resp = tenant.mgmt.get("subscriptions/list")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "AF10001"


# -- Management Activity API ---------------------------------------------------------------------
def test_subscription_lifecycle() -> None:
    t = open_tenant(activity_rate=0)
    try:
        m = t.mgmt
        assert m.get("subscriptions/list").json() == []
        started = m.post("subscriptions/start", params={"contentType": "Audit.SharePoint"})
        assert started.status_code == 200
        assert started.json() == {
            "contentType": "Audit.SharePoint",
            "status": "enabled",
            "webhook": None,
        }
        again = m.post("subscriptions/start", params={"contentType": "Audit.SharePoint"})
        assert again.status_code == 400
        assert again.json() == {
            "error": {
                "code": "AF20024",
                "message": "The subscription is already enabled. No property change.",
            }
        }
        for content_type in ("Audit.General", "Audit.Exchange", "DLP.All"):
            assert m.post("subscriptions/start", params={"contentType": content_type}).is_success
        bad = m.post("subscriptions/start", params={"contentType": "Audit.Everything"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "AF20020"
        none = m.get("subscriptions/content", params={"contentType": "Audit.AzureActiveDirectory"})
        assert none.status_code == 400 and none.json()["error"]["code"] == "AF20022"
        assert m.post("subscriptions/stop", params={"contentType": "Audit.General"}).is_success
        listed = {s["contentType"]: s["status"] for s in m.get("subscriptions/list").json()}
        assert listed == {
            "Audit.SharePoint": "enabled",
            "Audit.General": "disabled",
            "Audit.Exchange": "enabled",
            "DLP.All": "enabled",
        }
        stopped = m.get("subscriptions/content", params={"contentType": "Audit.General"})
        assert stopped.json()["error"]["code"] == "AF20022"
        assert m.post("subscriptions/start", params={"contentType": "Audit.General"}).is_success
        assert m.get("subscriptions/list").status_code == 200
        assert m.get("subscriptions/start").status_code == 405
        other = m.get(
            t.sandbox.management_url + "/api/v1.0/11111111-2222-3333-4444-555555555555/activity"
            "/feed/subscriptions/list"
        )
        assert other.status_code == 401 and other.json()["error"]["code"] == "AF20010"
    finally:
        t.close()


def test_content_window_rules(tenant: Tenant) -> None:
    def content(**params: str) -> httpx.Response:
        return tenant.mgmt.get(
            "subscriptions/content", params={"contentType": "Audit.SharePoint", **params}
        )

    day = dt.datetime.fromtimestamp(NOON, dt.UTC)
    for params in (
        {"startTime": iso(NOON - 3600)},  # one without the other
        {"endTime": iso(NOON)},
        {"startTime": iso(NOON - 25 * 3600), "endTime": iso(NOON)},  # > 24 h apart
        {"startTime": iso(NOON - 8 * 86400), "endTime": iso(NOON - 8 * 86400 + 3600)},  # > 7 d
    ):
        resp = content(**params)
        assert resp.status_code == 400, params
        assert resp.json()["error"]["code"] == "AF20030"
    # The documented formats: YYYY-MM-DD, YYYY-MM-DDTHH:MM, YYYY-MM-DDTHH:MM:SS.
    ok = content(startTime=f"{day:%Y-%m-%d}", endTime=f"{day:%Y-%m-%dT%H:%M}")
    assert ok.status_code == 200 and ok.json()
    assert content(startTime="yesterday", endTime="today").status_code == 400
    assert (
        content(nextPage="garbage", startTime=iso(NOON - 3600), endTime=iso(NOON)).json()["error"][
            "code"
        ]
        == "AF20031"
    )
    default = content()  # neither: the last 24 hours
    assert default.status_code == 200
    created = [b["contentCreated"] for b in default.json()]
    assert created and min(created) >= iso(NOON - 86400)[:-1] and max(created) <= iso(NOON)


def test_content_listing_pages_and_blobs(tenant: Tenant) -> None:
    start, end = NOON - 3 * 3600, NOON - 3600
    blobs = tenant.content("Audit.SharePoint", start, end)
    assert len(blobs) >= 8  # 5-15 minute blobs
    for blob in blobs:
        assert set(blob) == {
            "contentType",
            "contentId",
            "contentUri",
            "contentCreated",
            "contentExpiration",
        }
        assert iso(start)[:-1] <= blob["contentCreated"][:19] < iso(end)[:-1]
        created = dt.datetime.fromisoformat(blob["contentCreated"].replace("Z", "+00:00"))
        expires = dt.datetime.fromisoformat(blob["contentExpiration"].replace("Z", "+00:00"))
        assert expires - created == dt.timedelta(days=7)
        assert blob["contentUri"].startswith(tenant.sandbox.management_feed_url + "/audit/")
    assert [b["contentCreated"] for b in blobs] == sorted(b["contentCreated"] for b in blobs)
    records = tenant.mgmt.get(blobs[0]["contentUri"]).json()
    assert records
    late = 0
    for blob in blobs[:4]:
        window_start = min(b["contentCreated"] for b in blobs)
        for record in tenant.mgmt.get(blob["contentUri"]).json():
            assert RECORD_TIME.match(record["CreationTime"])
            assert re.fullmatch(r"[0-9a-f-]{36}", record["Id"])
            assert (
                record["RecordType"] == 6 and record["OrganizationId"] == tenant.sandbox.tenant_id
            )
            for key in (
                "Operation",
                "UserKey",
                "UserType",
                "Workload",
                "ResultStatus",
                "ObjectId",
                "UserId",
                "ClientIP",
                "SiteUrl",
                "SourceFileName",
                "SourceRelativeUrl",
                "SourceFileExtension",
                "UserAgent",
                "ItemType",
                "EventSource",
            ):
                assert key in record, key
            assert record["Workload"] in ("SharePoint", "OneDrive")
            assert record["ObjectId"].startswith(record["SiteUrl"])
            late += record["CreationTime"] < window_start[:19]
    assert late > 0  # events happen before the blob that carries them


def test_content_next_page_uri(quiet_day: Tenant) -> None:
    start, end = NOON, NOON + 12 * 3600
    first = quiet_day.mgmt.get(
        "subscriptions/content",
        params={
            "contentType": "Audit.SharePoint",
            "startTime": iso(start)[:-1],
            "endTime": iso(end)[:-1],
        },
    )
    assert len(first.json()) == 7
    next_uri = first.headers["NextPageUri"]
    query = parse_qs(urlsplit(next_uri).query)
    assert next_uri.startswith(quiet_day.sandbox.management_feed_url + "/subscriptions/content?")
    assert query["startTime"] == [iso(start)[:-1]] and query["endTime"] == [iso(end)[:-1]]
    assert query["nextPage"]
    blobs = quiet_day.content("Audit.SharePoint", start, end)
    assert len(blobs) > 7
    assert len({b["contentId"] for b in blobs}) == len(blobs)
    assert blobs[:7] == first.json()


def test_audit_aad_records_and_faults(tenant: Tenant) -> None:
    blobs = tenant.content("Audit.AzureActiveDirectory", NOON - 3600, NOON)
    records = [r for b in blobs[:3] for r in tenant.mgmt.get(b["contentUri"]).json()]
    operations = Counter(r["Operation"] for r in records)
    assert operations["UserLoggedIn"] > 0
    assert all(r["Workload"] == "AzureActiveDirectory" for r in records)
    tenant.sandbox.faults.add("throttle", path="/office-management/.*/content", retry_after="3")
    throttled = tenant.mgmt.get(
        "subscriptions/content", params={"contentType": "Audit.AzureActiveDirectory"}
    )
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
    assert throttled.json()["error"]["code"] == "AF429"
    tenant.sandbox.faults.add("error", path="/office-management/", status=503)
    assert tenant.mgmt.get("subscriptions/list").status_code == 503
    assert tenant.mgmt.get("subscriptions/list").status_code == 200


def test_blob_expiry_and_bad_ids() -> None:
    t = open_tenant(activity_rate=200)
    try:
        assert t.mgmt.post("subscriptions/start", params={"contentType": "Audit.Exchange"})
        blob = t.content("Audit.Exchange", NOON - 3600, NOON)[0]
        assert t.mgmt.get(blob["contentUri"]).status_code == 200
        bad = t.mgmt.get("audit/" + blob["contentId"][:-3] + "abc")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "AF20052"
        t.clock.now += 7 * 86400 + 60
        expired = t.mgmt.get(blob["contentUri"])
        assert expired.status_code == 400
        assert expired.json()["error"]["code"] == "AF20051"
        assert "has already expired" in expired.json()["error"]["message"]
    finally:
        t.close()


# -- determinism, injection, rate -------------------------------------------------------------
def test_two_sandboxes_agree() -> None:
    a, b = open_tenant(), open_tenant()
    try:
        flt = {"$filter": f"createdDateTime ge {iso(NOON - 1800)}", "$top": "300"}
        assert (
            a.graph.get("auditLogs/signIns", params=flt).json()["value"]
            == b.graph.get("auditLogs/signIns", params=flt).json()["value"]
        )
        for t in (a, b):
            t.mgmt.post("subscriptions/start", params={"contentType": "Audit.SharePoint"})
        blobs_a = a.content("Audit.SharePoint", NOON - 3600, NOON)
        blobs_b = b.content("Audit.SharePoint", NOON - 3600, NOON)
        assert [x["contentId"] for x in blobs_a] == [x["contentId"] for x in blobs_b]
        assert (
            a.mgmt.get(blobs_a[2]["contentUri"]).json()
            == b.mgmt.get(blobs_b[2]["contentUri"]).json()
        )
        # A skiptoken of one process is good in the other (same tenant, same key).
        link = a.graph.get("auditLogs/signIns", params=flt).json()["@odata.nextLink"]
        moved = link.replace(a.sandbox.graph_url, b.sandbox.graph_url)
        assert b.graph.get(moved).json()["value"] == a.graph.get(link).json()["value"]
    finally:
        a.close()
        b.close()


def test_injected_events_appear_only_once_visible() -> None:
    t = open_tenant(activity_rate=0)
    try:
        org, activity = t.sandbox.org, t.sandbox.activity
        admin = org.direct_admin_user_ids()[0]
        t.mgmt.post("subscriptions/start", params={"contentType": "Audit.AzureActiveDirectory"})
        t.mgmt.post("subscriptions/start", params={"contentType": "Audit.SharePoint"})
        assert t.graph.get("auditLogs/signIns").json()["value"] == []  # rate 0: silence
        at = NOON - 1200
        sign_in = activity.add_sign_in(
            admin, at, country="NG", city="Lagos", ip="105.112.4.20", visible_at=NOON + 600
        )
        on_time = activity.add_sign_in(admin, at + 5, country="US", visible_at=NOON - 900)
        file_id = activity.add_file_event(
            "someone@partner.example",
            at,
            "FileDownloaded",
            "Salary bands 2026.xlsx",
            "/sites/HR",
            ip="[2001:db8::1]:51234",
            visible_at=NOON - 600,
        )
        audit = activity.add_directory_audit(
            admin,
            at + 10,
            "Reset user password",
            target_user=list(org.users)[9],
            ip="105.112.4.20",
            visible_at=NOON + 600,
        )
        seen = [s["id"] for s in t.graph.get("auditLogs/signIns").json()["value"]]
        assert seen == [on_time]
        assert t.graph.get("auditLogs/directoryAudits").json()["value"] == []
        t.clock.now = NOON + 601  # the late events arrive
        signed = t.graph.get("auditLogs/signIns").json()["value"]
        assert [s["id"] for s in signed] == [on_time, sign_in]  # newest first by time
        late = signed[1]
        assert late["location"]["countryOrRegion"] == "NG" and late["location"]["city"] == "Lagos"
        assert late["ipAddress"] == "105.112.4.20" and late["userId"] == admin
        audits = t.graph.get("auditLogs/directoryAudits").json()["value"]
        assert [a["id"] for a in audits] == [audit]
        assert audits[0]["initiatedBy"]["user"]["ipAddress"] == "105.112.4.20"
        assert audits[0]["activityDisplayName"] == "Reset user password"
        # Management: an event sits in the blob of when it became visible, listed once that
        # blob is complete (at the end of its 5-15 minute slot).
        aad = t.records("Audit.AzureActiveDirectory", NOON - 3600, NOON + 3600)
        assert on_time in {r["Id"] for r in aad} and sign_in not in {r["Id"] for r in aad}
        t.clock.now = NOON + 3600
        records = t.records("Audit.SharePoint", NOON - 3600, NOON + 3600)
        assert [r["Id"] for r in records] == [file_id]
        assert records[0]["UserId"] == "someone@partner.example"
        assert records[0]["ClientIP"] == "[2001:db8::1]:51234"
        assert records[0]["SiteUrl"].endswith("/sites/HR/")
        assert records[0]["CreationTime"] == iso(at)[:-1]
        aad = t.records("Audit.AzureActiveDirectory", NOON - 3600, NOON + 3600)
        assert {r["Id"] for r in aad} >= {sign_in, on_time}
        assert "Reset user password." in {r["Operation"] for r in aad}
    finally:
        t.close()


def test_app_initiated_audit_injection() -> None:
    t = open_tenant(activity_rate=0)
    try:
        event_id = t.sandbox.activity.add_directory_audit(None, NOON - 60, "Update user")
        audit = t.graph.get("auditLogs/directoryAudits").json()["value"][0]
        assert audit["id"] == event_id
        assert audit["initiatedBy"]["user"] is None
        assert audit["initiatedBy"]["app"]["displayName"] == "HR Sync Connector"
    finally:
        t.close()


def test_rate_bounds_the_events_of_an_hour() -> None:
    # How fast an hour is generated is a benchmark's question (bench/), not a test's.
    stream = ActivityStream(GraphSandbox(activity_rate=3000).org)
    hour = int(NOON // 3600) + 500  # not generated before
    events = stream.hour(hour)
    assert 2000 < len(events) < 4500
    assert ActivityStream(stream.org, rate=0).hour(hour) == []
    night = stream.hour(int(NOON // 3600) + 500 - 10)  # 02:00 on a weekday: quiet
    assert len(night) < len(events) / 4


# -- stories ---------------------------------------------------------------------------------
SERVICES = ("app@sharepoint", "SHAREPOINT\\system")
NIL_ID = "00000000-0000-0000-0000-000000000000"


def test_a_day_names_actors_in_every_documented_way(quiet_day: Tenant) -> None:
    org, stream = quiet_day.sandbox.org, quiet_day.sandbox.activity
    start, end = NOON - 12 * 3600, NOON + 12 * 3600 - 1
    files = quiet_day.records("Audit.SharePoint", start, end)
    signed_in = {
        s["userId"]
        for s in quiet_day.all_pages(
            "auditLogs/signIns",
            **{"$filter": f"createdDateTime ge {iso(start)} and createdDateTime le {iso(end)}"},
        )
    }
    by_actor: dict[str, list[dict[str, Any]]] = {}
    for record in files:
        by_actor.setdefault(record["UserId"], []).append(record)
    # Service identities, with the UserType SharePoint gives them (0, Regular): only the name
    # tells they are not people.
    crawler, system = by_actor["app@sharepoint"], by_actor["SHAREPOINT\\system"]
    assert len(crawler) >= 5 and system
    assert all(r["UserType"] == 0 for r in [*crawler, *system])
    assert all(r["UserKey"].startswith("i:0i.t|") for r in crawler)
    # A guest who only ever opens files: named by a lower-case "#ext#" UPN, never signing in.
    (guest_id,) = stream.pools()["quiet_guests"]
    guest = org.users[guest_id]
    assert guest.user_type == "Guest" and guest_id not in signed_in
    assert by_actor[guest.user_principal_name.lower()]
    assert "#ext#" in guest.user_principal_name.lower() != guest.user_principal_name
    # A member who never signs in, in no group a test imports (neither HR nor Executives,
    # nor an administrator).
    (member_id,) = stream.pools()["quiet_members"]
    member = org.users[member_id]
    assert member.user_type == "Member" and member_id not in signed_in
    assert member.department not in ("HR", "Executives")
    assert member_id not in org.admin_user_ids()
    assert by_actor[member.user_principal_name.lower()]
    # Entra ID acting by itself: the all-zero id as the initiating user.
    audits = quiet_day.all_pages(
        "auditLogs/directoryAudits",
        **{"$filter": f"activityDateTime ge {iso(start)} and activityDateTime le {iso(end)}"},
    )
    by_system = [a for a in audits if (a["initiatedBy"]["user"] or {}).get("id") == NIL_ID]
    assert by_system
    assert all(a["initiatedBy"]["user"]["userPrincipalName"] is None for a in by_system)


def test_injected_service_identity_and_system_events_keep_their_shape() -> None:
    t = open_tenant(activity_rate=0)
    try:
        t.mgmt.post("subscriptions/start", params={"contentType": "Audit.SharePoint"})
        activity = t.sandbox.activity
        crawler = activity.add_file_event("app@sharepoint", NOON - 600, "FileAccessed")
        system = activity.add_file_event("SHAREPOINT\\system", NOON - 500, "FileModified")
        audit = activity.add_directory_audit(None, NOON - 400, "Update user", system=True)
        t.clock.now = NOON + 3600
        records = {r["Id"]: r for r in t.records("Audit.SharePoint", NOON - 3600, NOON + 3600)}
        assert records[crawler]["UserId"] == "app@sharepoint"
        assert records[system]["UserId"] == "SHAREPOINT\\system"
        assert records[system]["UserKey"] == "SHAREPOINT\\system"
        (found,) = t.graph.get("auditLogs/directoryAudits").json()["value"]
        assert found["id"] == audit
        assert found["initiatedBy"]["user"]["id"] == NIL_ID and found["initiatedBy"]["app"] is None
    finally:
        t.close()


def test_stories_in_a_simulated_day(quiet_day: Tenant) -> None:
    org = quiet_day.sandbox.org
    by_upn = {u.user_principal_name.lower(): u for u in org.users.values()}
    start, end = NOON - 12 * 3600, NOON + 12 * 3600 - 1
    files = quiet_day.records("Audit.SharePoint", start, end)
    # HR members reading HR documents, several times a day.
    hr_reads = [
        r
        for r in files
        if "/sites/HR/" in r["SiteUrl"]
        and r["SourceFileName"] in HR_FILES
        and by_upn.get(r["UserId"]) is not None
        and by_upn[r["UserId"]].department == "HR"
    ]
    assert len({r["CreationTime"][:13] for r in hr_reads}) >= 4
    # An executive with dozens of downloads within an hour.
    downloads = Counter(
        (r["UserId"], r["CreationTime"][:13]) for r in files if r["Operation"] == "FileDownloaded"
    )
    (upn, _), count = downloads.most_common(1)[0]
    assert count >= 20 and by_upn[upn].department == "Executives"
    # External people: guests (#ext#) and plain outside addresses open shared files.
    outside = [
        r
        for r in files
        if not r["UserId"].endswith("contoso-sandbox.example") and r["UserId"] not in SERVICES
    ]
    assert any("#ext#" in r["UserId"] for r in outside)
    assert any(r["UserId"].endswith("@partner.example") for r in outside)
    assert {r["Operation"] for r in outside} <= {"FileAccessed", "FilePreviewed"}
    # Administrators signing in from abroad, then changing the directory from there.
    admins = set(org.admin_user_ids())
    sign_ins = quiet_day.all_pages(
        "auditLogs/signIns",
        **{"$filter": f"createdDateTime ge {iso(start)} and createdDateTime le {iso(end)}"},
    )
    abroad = [
        s
        for s in sign_ins
        if s["userId"] in admins and s["location"]["countryOrRegion"] in ABROAD_COUNTRIES
    ]
    assert len(abroad) >= 5 and len({s["location"]["countryOrRegion"] for s in abroad}) >= 2
    # ... one in every hour with hour % 4 == 1, found with a one-hour filter.
    hour = dt.datetime.fromtimestamp(start, dt.UTC).replace(hour=13, minute=0)
    in_hour = quiet_day.all_pages(
        "auditLogs/signIns",
        **{
            "$filter": f"createdDateTime ge {iso(hour.timestamp())} and "
            f"createdDateTime lt {iso(hour.timestamp() + 3600)}"
        },
    )
    assert any(s["userId"] in admins and s["location"]["countryOrRegion"] != "US" for s in in_hour)
    audits = quiet_day.all_pages(
        "auditLogs/directoryAudits",
        **{"$filter": f"activityDateTime ge {iso(start)} and activityDateTime le {iso(end)}"},
    )
    abroad_ips = {s["ipAddress"] for s in abroad}
    assert (
        sum(
            1
            for a in audits
            if a["initiatedBy"]["user"] and a["initiatedBy"]["user"]["ipAddress"] in abroad_ips
        )
        >= 5
    )
    # Most ordinary sign-ins come from the US.
    regular = [s for s in sign_ins if s["userId"] not in admins]
    us = sum(1 for s in regular if s["location"]["countryOrRegion"] == "US")
    assert us / len(regular) > 0.75
