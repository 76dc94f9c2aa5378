"""Contract tests for the Microsoft Graph sandbox (real HTTPS over loopback)."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import msal
import pytest

from groupsync_pipeline.sandbox.graph import DEFAULT_PERMISSIONS, GRAPH_SCOPE, GraphSandbox
from groupsync_pipeline.sandbox.seed import HOSTILE_GROUP_NAME, build_organisation

from .conftest import VENDOR_EXAMPLES

REFERENCE = VENDOR_EXAMPLES / "graph"


def reference(name: str) -> dict[str, Any]:
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))


def key_shape(value: Any) -> Any:
    """Nested key structure of a JSON value (values ignored)."""
    if isinstance(value, dict):
        return {k: key_shape(v) for k, v in value.items()}
    return None


@pytest.fixture(scope="module")
def sandbox() -> Iterator[GraphSandbox]:
    with GraphSandbox() as sb:
        yield sb


@pytest.fixture(autouse=True)
def _reset(sandbox: GraphSandbox) -> Iterator[None]:
    yield
    sandbox.faults.clear()
    sandbox.permissions = set(DEFAULT_PERMISSIONS)


@pytest.fixture(scope="module")
def ctx(sandbox: GraphSandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=sandbox.ca_bundle)


def get_token(sandbox: GraphSandbox, http: httpx.Client) -> str:
    resp = http.post(
        f"{sandbox.base_url}/{sandbox.tenant_id}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.client_id,
            "client_secret": sandbox.client_secret,
            "scope": GRAPH_SCOPE,
        },
    )
    resp.raise_for_status()
    return resp.json()["access_token"]


@pytest.fixture()
def client(sandbox: GraphSandbox, ctx: ssl.SSLContext) -> Iterator[httpx.Client]:
    with httpx.Client(verify=ctx, timeout=10) as http:
        token = get_token(sandbox, http)
        http.headers["Authorization"] = f"Bearer {token}"
        http.base_url = httpx.URL(sandbox.graph_url + "/")
        yield http


def gid(sandbox: GraphSandbox, name: str) -> str:
    return sandbox.org.group_by_name(name).id


# -- seed ------------------------------------------------------------------------------------
def test_seed_is_deterministic_and_shaped() -> None:
    a, b = build_organisation(), build_organisation()
    assert a == b
    assert list(a.users) == list(b.users) and list(a.groups) == list(b.groups)
    assert build_organisation(seed=8).users.keys() != a.users.keys()
    assert len(a.users) == 6000 and len(a.groups) == 40
    for name in ("HR", "Finance", "Executives", "Engineering", "IT admins", HOSTILE_GROUP_NAME):
        a.group_by_name(name)
    guests = [u for u in a.users.values() if u.user_type == "Guest"]
    assert 0.02 < len(guests) / len(a.users) < 0.04
    assert all("#EXT#@" in u.user_principal_name for u in guests)
    assert {u.user_principal_name.split("_")[-1].split("#")[0] for u in guests} >= {
        "fabrikam.example"
    }
    assert any(
        u.user_type == "Member" and "#EXT#" in u.user_principal_name for u in a.users.values()
    )
    assert any(u.mail is None for u in a.users.values())
    assert any(not u.account_enabled for u in a.users.values())
    assert len(a.group_by_name("All Company").members) == 5200
    assert a.group_by_name("Archived Project Zeus").members == []
    kinds = {o.odata_type for o in a.others.values()}
    assert len(kinds) == 3


def test_transitive_members_dedupe_nesting_and_cycles() -> None:
    org = build_organisation()
    staff = org.group_by_name("All Staff")
    flat = org.transitive_members(staff.id)
    assert len(flat) == len(set(flat))
    direct_users = [m for m in staff.members if m in org.users]
    assert direct_users and all(
        any(u in org.group_by_name(dept).members for dept in ("Engineering", "Sales"))
        for u in direct_users
    )
    assert set(org.transitive_user_ids(staff.id)) == set(org.users)  # every user has a dept
    emea = org.group_by_name("Region EMEA")
    london = org.group_by_name("London Office")
    assert set(london.members) <= set(org.transitive_user_ids(emea.id))
    # Cycle safety: make London contain EMEA.
    london.members.append(emea.id)
    org.invalidate_cache()
    cyc = org.transitive_members(emea.id)
    assert emea.id not in cyc and len(cyc) == len(set(cyc))


def test_benchmark_sized_org_builds_fast() -> None:
    start = time.perf_counter()
    org = build_organisation(users=100_500, extra_groups={"Bench 100k": 100_000})
    assert time.perf_counter() - start < 3.0
    assert len(org.transitive_user_ids(org.group_by_name("Bench 100k").id)) == 100_000


# -- identity platform -----------------------------------------------------------------------
def test_msal_client_credentials(sandbox: GraphSandbox, ctx: ssl.SSLContext) -> None:
    with httpx.Client(verify=ctx) as http:
        app = msal.ConfidentialClientApplication(
            sandbox.client_id,
            client_credential=sandbox.client_secret,
            authority=f"{sandbox.authority_host}/{sandbox.tenant_id}",
            instance_discovery=False,
            http_client=http,
        )
        result = app.acquire_token_for_client(scopes=[GRAPH_SCOPE])
        assert result.get("token_type") == "Bearer", result
        resp = http.get(
            f"{sandbox.graph_url}/groups?$top=1",
            headers={"Authorization": f"Bearer {result['access_token']}"},
        )
        assert resp.status_code == 200

        bad = msal.ConfidentialClientApplication(
            sandbox.client_id,
            client_credential="wrong",
            authority=f"{sandbox.authority_host}/{sandbox.tenant_id}",
            instance_discovery=False,
            http_client=http,
        )
        err = bad.acquire_token_for_client(scopes=[GRAPH_SCOPE])
        assert err["error"] == "invalid_client" and "AADSTS7000215" in err["error_description"]


def test_token_errors_match_reference(sandbox: GraphSandbox, ctx: ssl.SSLContext) -> None:
    example = reference("msal_token.json")["error_400"]
    good = {
        "grant_type": "client_credentials",
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
        "scope": GRAPH_SCOPE,
    }
    url = f"{sandbox.base_url}/{sandbox.tenant_id}/oauth2/v2.0/token"
    cases = [
        ({"scope": "https://foo.microsoft.com/.default"}, url, 400, "invalid_scope", 70011),
        ({"client_id": "nope"}, url, 400, "unauthorized_client", 700016),
        ({"client_secret": "nope"}, url, 401, "invalid_client", 7000215),
        ({}, url.replace(sandbox.tenant_id, "other-tenant"), 400, "invalid_request", 90002),
    ]
    with httpx.Client(verify=ctx) as http:
        for change, target, status, error, code in cases:
            resp = http.post(target, data={**good, **change})
            body = resp.json()
            assert resp.status_code == status, body
            assert body["error"] == error and body["error_codes"] == [code]
            assert set(example) <= set(body)
            assert "Trace ID:" in body["error_description"]
            assert "Correlation ID:" in body["error_description"]
        # Basic auth for the client and msal's reserved scopes are accepted.
        ok = http.post(
            url,
            data={"grant_type": "client_credentials", "scope": f"{GRAPH_SCOPE} offline_access"},
            auth=(sandbox.client_id, sandbox.client_secret),
        )
        assert ok.status_code == 200
        assert set(reference("msal_token.json")["success_200"]) <= set(ok.json())


# -- auth ------------------------------------------------------------------------------------
def test_401_without_token_and_after_expiry(sandbox: GraphSandbox, client: httpx.Client) -> None:
    anon = client.get("groups", headers={"Authorization": ""})
    assert anon.status_code == 401
    error = anon.json()["error"]
    assert error["code"] == "InvalidAuthenticationToken"
    assert error["message"] == "Access token is empty."
    assert set(error["innerError"]) == {"date", "request-id", "client-request-id"}
    echoed = client.get("groups", headers={"Authorization": "", "client-request-id": "abc"})
    assert echoed.json()["error"]["innerError"]["client-request-id"] == "abc"
    assert echoed.headers["client-request-id"] == "abc" and echoed.headers["request-id"]
    assert client.get("groups").status_code == 200
    sandbox.expire_tokens()
    expired = client.get("groups")
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]


def test_403_without_permission(sandbox: GraphSandbox, client: httpx.Client) -> None:
    # Directory.Read.All also grants group reads, so both must go.
    sandbox.permissions -= {"GroupMember.Read.All", "Directory.Read.All"}
    resp = client.get("groups")
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "Authorization_RequestDenied"
    assert client.get("users?$top=1").status_code == 200


# -- groups ----------------------------------------------------------------------------------
def test_group_shape_matches_reference(sandbox: GraphSandbox, client: httpx.Client) -> None:
    example = reference("groups_list.json")["example1_GET_/v1.0/groups"]
    body = client.get("groups").json()
    assert body["@odata.context"] == f"{sandbox.graph_url}/$metadata#groups"
    assert len(body["value"]) == 40 and "@odata.nextLink" not in body
    for group in body["value"]:
        assert set(example["value"][0]) <= set(group)
    one = client.get(f"groups/{gid(sandbox, 'HR')}?$select=displayName").json()
    assert one["displayName"] == "HR" and set(one) == {"@odata.context", "id", "displayName"}


def test_group_query_validation(sandbox: GraphSandbox, client: httpx.Client) -> None:
    assert client.get("groups?$top=1000").status_code == 400
    assert client.get("groups?$top=0").status_code == 400
    assert client.get("groups?$skip=5").status_code == 400
    bad_select = client.get("groups?$select=id,nope")
    assert bad_select.status_code == 400
    assert "'nope'" in bad_select.json()["error"]["message"]
    assert (
        client.get("groups", params={"$filter": "startswith(displayName,'H')"}).status_code == 400
    )
    missing = client.get("groups/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "Request_ResourceNotFound"
    unknown = client.get("widgets")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["message"] == "Resource not found for the segment 'widgets'."
    assert client.delete("groups").status_code == 405


def test_hostile_name_filter(sandbox: GraphSandbox, client: httpx.Client) -> None:
    literal = HOSTILE_GROUP_NAME.replace("'", "''")
    body = client.get("groups", params={"$filter": f"displayName eq '{literal}'"}).json()
    assert [g["displayName"] for g in body["value"]] == [HOSTILE_GROUP_NAME]
    by_id = client.get("groups", params={"$filter": f"id eq '{body['value'][0]['id']}'"}).json()
    assert len(by_id["value"]) == 1


def test_paging_transitive_members(sandbox: GraphSandbox, client: httpx.Client) -> None:
    group_id = gid(sandbox, "All Company")
    url: str | None = f"groups/{group_id}/transitiveMembers?$top=999&$select=id,userType"
    seen: list[str] = []
    pages = 0
    while url:
        body = client.get(url).json()
        seen += [m["id"] for m in body["value"]]
        assert all(m["@odata.type"] == "#microsoft.graph.user" for m in body["value"])
        assert all("userType" in m for m in body["value"])
        url = body.get("@odata.nextLink")
        pages += 1
    assert pages >= 6
    assert len(seen) == len(set(seen)) == len(sandbox.org.transitive_members(group_id))


def test_next_link_is_opaque(sandbox: GraphSandbox, client: httpx.Client) -> None:
    first = client.get(f"groups/{gid(sandbox, 'Engineering')}/members?$top=10").json()
    link = first["@odata.nextLink"]
    token = parse_qs(urlsplit(link).query)["$skiptoken"][0]
    assert not token.isdigit()
    assert client.get(link).status_code == 200
    tampered = link.replace(token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    resp = client.get(tampered)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "Request_BadRequest"
    # A token from one listing is not valid on another.
    other = link.replace(gid(sandbox, "Engineering"), gid(sandbox, "Sales"))
    assert client.get(other).status_code == 400


def test_members_types_and_casts(sandbox: GraphSandbox, client: httpx.Client) -> None:
    reference("group_members.json")
    mixed = gid(sandbox, "Mixed Bag")
    body = client.get(f"groups/{mixed}/members?$select=id,displayName,mail,appId").json()
    types = {m["@odata.type"] for m in body["value"]}
    assert types == {
        "#microsoft.graph.user",
        "#microsoft.graph.group",
        "#microsoft.graph.device",
        "#microsoft.graph.servicePrincipal",
        "#microsoft.graph.orgContact",
    }
    for member in body["value"]:
        if member["@odata.type"] != "#microsoft.graph.servicePrincipal":
            assert "appId" not in member
    users = client.get(f"groups/{mixed}/transitiveMembers/microsoft.graph.user").json()
    assert users["@odata.context"].endswith("#users")
    expected = sandbox.org.transitive_user_ids(mixed)
    assert len(users["value"]) == min(100, len(expected))
    default_user = users["value"][0]
    assert "userType" not in default_user and "userPrincipalName" in default_user


def test_count_requires_consistency_level(sandbox: GraphSandbox, client: httpx.Client) -> None:
    group_id = gid(sandbox, "All Staff")
    path = f"groups/{group_id}/transitiveMembers/microsoft.graph.user/$count"
    assert client.get(path).status_code == 400
    resp = client.get(path, headers={"ConsistencyLevel": "eventual"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert int(resp.text) == len(sandbox.org.transitive_user_ids(group_id))
    eventual = {"ConsistencyLevel": "eventual"}
    assert int(client.get("groups/$count", headers=eventual).text) == 40
    assert int(client.get("users/$count", headers=eventual).text) == 6000
    counted = client.get("groups?$count=true&$top=5", headers=eventual).json()
    assert counted["@odata.count"] == 40
    assert client.get("groups?$count=true").status_code == 400


# -- users, domains --------------------------------------------------------------------------
def test_users_and_domains(sandbox: GraphSandbox, client: httpx.Client) -> None:
    example = reference("domains_users.json")
    body = client.get("users?$top=5").json()
    assert set(example["GET_/v1.0/users"]["value"][0]) == set(body["value"][0])
    guests = client.get(
        "users",
        params={"$filter": "userType eq 'Guest'", "$select": "id,userType,userPrincipalName"},
    ).json()
    assert guests["value"] and all(u["userType"] == "Guest" for u in guests["value"])
    disabled = client.get(
        "users", params={"$filter": "accountEnabled eq false", "$select": "accountEnabled"}
    ).json()
    assert disabled["value"] and not any(u["accountEnabled"] for u in disabled["value"])
    domains = client.get("domains").json()["value"]
    assert set(example["GET_/v1.0/domains"]["value"][0]) <= set(domains[0])
    assert any(d["isDefault"] and d["isVerified"] for d in domains)


# -- $batch ----------------------------------------------------------------------------------
def test_batch(sandbox: GraphSandbox, client: httpx.Client) -> None:
    example = reference("batch.json")["response_200"]
    too_many = [{"id": str(i), "method": "GET", "url": "/groups"} for i in range(21)]
    assert client.post("$batch", json={"requests": too_many}).status_code == 400
    group_id = gid(sandbox, "Leadership")
    requests = [
        {
            "id": "1",
            "method": "GET",
            "url": f"/groups/{group_id}/transitiveMembers/microsoft.graph.user/$count",
            "headers": {"ConsistencyLevel": "eventual"},
        },
        {"id": "2", "method": "GET", "url": "/groups/00000000-0000-4000-8000-000000000000"},
        {"id": "3", "method": "GET", "url": f"groups/{group_id}/members?$top=2"},
    ]
    body = client.post("$batch", json={"requests": requests}).json()
    by_id = {r["id"]: r for r in body["responses"]}
    assert len(by_id) == 3
    assert set(example["responses"][0]) <= set(by_id["1"])
    assert by_id["1"]["status"] == 200
    assert by_id["1"]["body"] == len(sandbox.org.transitive_user_ids(group_id))
    assert by_id["2"]["status"] == 404
    assert key_shape(by_id["2"]["body"]) == key_shape(example["responses"][1]["body"])
    assert len(by_id["3"]["body"]["value"]) == 2
    # Inner throttling: only the matching inner request gets a 429.
    sandbox.faults.add("throttle", path="transitiveMembers", retry_after="3")
    body = client.post("$batch", json={"requests": requests}).json()
    statuses = {r["id"]: r["status"] for r in body["responses"]}
    assert statuses == {"1": 429, "2": 404, "3": 200}
    assert body["responses"][0]["headers"]["Retry-After"] == "3"


# -- faults ----------------------------------------------------------------------------------
def test_fault_throttle_and_error(sandbox: GraphSandbox, client: httpx.Client) -> None:
    example = reference("throttling_429.json")
    sandbox.faults.add("throttle", path="/groups", retry_after="0.2", count=2)
    assert sandbox.faults.pending() == 2
    first = client.get("groups")
    assert first.status_code == 429 and first.headers["Retry-After"] == "0.2"
    assert key_shape(first.json()) == key_shape(example["body"])
    assert client.get("users?$top=1").status_code == 200  # path does not match
    assert client.get("groups").status_code == 429
    assert client.get("groups").status_code == 200 and sandbox.faults.pending() == 0
    sandbox.faults.add("error", status=502)
    resp = client.get("groups")
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "generalException"
    sandbox.faults.add("error")
    resp = client.get("groups")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "serviceNotAvailable"


def test_fault_transport_kinds(sandbox: GraphSandbox, client: httpx.Client) -> None:
    sandbox.faults.add("timeout", delay=1.0)
    with pytest.raises(httpx.ReadTimeout):
        client.get("groups", timeout=0.2)
    sandbox.faults.add("truncate")
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("groups")
    sandbox.faults.add("garbage")
    garbage = client.get("groups")
    assert garbage.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbage.json()
    sandbox.faults.add("drop")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
        client.get("groups")
    assert client.get("groups").status_code == 200


def test_request_log(sandbox: GraphSandbox, client: httpx.Client) -> None:
    sandbox.reset_log()
    client.get("groups?$top=2")
    client.get("users?$top=2")
    assert sandbox.request_count("/v1.0/groups") == 1
    assert sandbox.request_count() == 2
    record = sandbox.requests[0]
    assert (record.method, record.path, record.status) == ("GET", "/v1.0/groups", 200)


def test_localhost_name_verifies(sandbox: GraphSandbox, ctx: ssl.SSLContext) -> None:
    url = f"https://localhost:{sandbox.port}/{sandbox.tenant_id}/v2.0/.well-known/openid-configuration"
    with httpx.Client(verify=ctx) as http:
        config = http.get(url).json()
    assert config["token_endpoint"].endswith(f"/{sandbox.tenant_id}/oauth2/v2.0/token")
