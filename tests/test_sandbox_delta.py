"""GET /groups/delta and the evolving tenant of the Graph sandbox (real HTTPS over loopback)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from groupsync_pipeline.sandbox.graph import (
    DEFAULT_PERMISSIONS,
    EVOLVE_EPOCH,
    GraphSandbox,
)
from groupsync_pipeline.sandbox.seed import (
    DEPARTMENT_GROUPS,
    GROUP_CREATED,
    GROUP_DELETED,
    MEMBER_DELETED,
    USER_CREATED,
    Organisation,
    build_organisation,
)

from .test_sandbox_graph import get_token, reference

USER = "#microsoft.graph.user"
GROUP = "#microsoft.graph.group"
CORE_GROUPS = (*DEPARTMENT_GROUPS.values(), "All Company", "All Staff", "Leadership")


def small_org(seed: int = 7) -> Organisation:
    """Same shape as the default tenant, small enough to build per test."""
    return build_organisation(seed=seed, users=700, big_group_members=600)


Connect = Callable[..., tuple[GraphSandbox, httpx.Client]]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Start fresh sandboxes (their own tenant each) with an authenticated client."""
    opened: list[tuple[GraphSandbox, httpx.Client]] = []

    def start(org: Organisation | None = None, **options: Any) -> tuple[GraphSandbox, httpx.Client]:
        sandbox = GraphSandbox(org if org is not None else small_org(), **options)
        sandbox.start()
        http = httpx.Client(verify=sandbox.ssl_context(), timeout=10)
        opened.append((sandbox, http))
        http.headers["Authorization"] = f"Bearer {get_token(sandbox, http)}"
        http.base_url = httpx.URL(sandbox.graph_url + "/")
        return sandbox, http

    yield start
    for sandbox, http in opened:
        http.close()
        sandbox.stop()


@pytest.fixture(scope="module")
def pristine() -> Iterator[tuple[GraphSandbox, httpx.Client]]:
    """The full-size default tenant, never mutated: read-only tests share it."""
    with (
        GraphSandbox(build_organisation()) as sandbox,
        httpx.Client(verify=sandbox.ssl_context(), timeout=10) as http,
    ):
        http.headers["Authorization"] = f"Bearer {get_token(sandbox, http)}"
        http.base_url = httpx.URL(sandbox.graph_url + "/")
        yield sandbox, http


@pytest.fixture(autouse=True)
def _reset_pristine(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "pristine" in request.fixturenames:
        sandbox, _ = request.getfixturevalue("pristine")
        sandbox.faults.clear()
        sandbox.permissions = set(DEFAULT_PERMISSIONS)


def run_round(http: httpx.Client, url: str) -> tuple[list[dict[str, Any]], str]:
    """Follow nextLinks until the deltaLink: (pages, deltaLink)."""
    pages: list[dict[str, Any]] = []
    while True:
        resp = http.get(url)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        pages.append(page)
        if "@odata.deltaLink" in page:
            assert "@odata.nextLink" not in page
            return pages, page["@odata.deltaLink"]
        url = page["@odata.nextLink"]


def merge(pages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge a round's group objects by id, as a client must (a large group repeats)."""
    merged: dict[str, dict[str, Any]] = {}
    for page in pages:
        for obj in page["value"]:
            entry = merged.setdefault(
                obj["id"], {"props": {}, "added": set(), "removed": set(), "types": {}}
            )
            if "@removed" in obj:
                entry["gone"] = obj["@removed"]["reason"]
            entry["props"].update({k: v for k, v in obj.items() if k != "members@delta"})
            for member in obj.get("members@delta", []):
                target = entry["removed"] if "@removed" in member else entry["added"]
                assert member["id"] not in target, "a member was sent twice in one round"
                target.add(member["id"])
                entry["types"][member["id"]] = member["@odata.type"]
    return merged


def initial(http: httpx.Client, query: str = "$select=displayName,members") -> str:
    """Run an initial round; return its deltaLink."""
    return run_round(http, f"groups/delta?{query}")[1]


def changes(http: httpx.Client, link: str) -> tuple[dict[str, dict[str, Any]], str]:
    pages, new_link = run_round(http, link)
    return merge(pages), new_link


def members_of(org: Organisation, name: str, k: int = 1) -> list[str]:
    return [m for m in org.group_by_name(name).members if m in org.users][:k]


def outsider(org: Organisation, name: str, skip: int = 0) -> str:
    members = set(org.group_by_name(name).members)
    return [u for u in org.users if u not in members][skip]


# -- shape -----------------------------------------------------------------------------------
def test_shape_matches_vendor_example(pristine: tuple[GraphSandbox, httpx.Client]) -> None:
    sandbox, http = pristine
    example = reference("groups_delta.json")
    seq = example["sequence"]
    pages, link = run_round(http, "groups/delta?$select=displayName,description,members")
    first, last = pages[0], pages[-1]
    assert list(first) == list(
        seq["1_GET /v1.0/groups/delta?$select=displayName,description&$expand=members"]
    )
    assert list(last) == list(seq["3_GET final nextLink"])
    assert (
        first["@odata.context"] == f"{sandbox.graph_url}/$metadata#groups(displayName,description)"
    )
    assert all(p["@odata.context"] == f"{sandbox.graph_url}/$metadata#groups" for p in pages[1:])
    assert first["@odata.nextLink"].startswith(f"{sandbox.graph_url}/groups/delta?$skiptoken=")
    assert link.startswith(f"{sandbox.graph_url}/groups/delta?$deltatoken=")
    vendor_entry = seq["2_GET nextLink"]["value"][0]["members@delta"][0]
    for page in pages:
        for obj in page["value"]:
            assert set(obj) <= {"id", "displayName", "description", "members@delta"}
            assert {"id", "displayName", "description"} <= set(obj)
            for member in obj.get("members@delta", []):
                assert set(member) == set(vendor_entry)
    # The empty group is listed without a members@delta key, like TestGroup2 in the docs.
    zeus = sandbox.org.group_by_name("Archived Project Zeus").id
    assert [o for p in pages for o in p["value"] if o["id"] == zeus] == [
        {"id": zeus, "displayName": "Archived Project Zeus", "description": "Empty on purpose"}
    ]
    # No $select: every property plus members (the docs' Response 1).
    full = http.get("groups/delta").json()["value"][0]
    assert set(example["GET_/v1.0/groups/delta"]["value"][0]) <= set(full)
    # $expand=members is the other way to ask for members; without it, no members@delta.
    expanded = http.get("groups/delta?$select=displayName,description&$expand=members").json()
    assert any("members@delta" in g for g in expanded["value"])
    plain = http.get("groups/delta?$select=displayName,description,mailNickname").json()
    vendor_plain = example["GET_/v1.0/groups/delta?$select=displayName,description,mailNickname"]
    for obj in plain["value"]:
        assert set(vendor_plain["value"][0]) <= set(obj) and "members@delta" not in obj


def test_member_types_in_members_delta(pristine: tuple[GraphSandbox, httpx.Client]) -> None:
    sandbox, http = pristine
    mixed = sandbox.org.group_by_name("Mixed Bag").id
    body = http.get("groups/delta", params={"$select": "members", "$filter": f"id eq '{mixed}'"})
    (obj,) = body.json()["value"]
    assert {m["@odata.type"] for m in obj["members@delta"]} == {
        USER,
        GROUP,
        "#microsoft.graph.device",
        "#microsoft.graph.servicePrincipal",
        "#microsoft.graph.orgContact",
    }


# -- paging ----------------------------------------------------------------------------------
def test_paging_splits_large_groups_and_merge_is_exact(
    pristine: tuple[GraphSandbox, httpx.Client],
) -> None:
    sandbox, http = pristine
    org = sandbox.org
    sandbox.reset_log()
    pages, _ = run_round(http, "groups/delta?$select=displayName,members")
    assert sandbox.request_count("/v1.0/groups/delta") == len(pages)
    for page in pages:
        assert len(page["value"]) <= 100
        assert sum(len(g.get("members@delta", [])) for g in page["value"]) <= 1000
    everyone = org.group_by_name("All Company").id
    carrying = [i for i, p in enumerate(pages) if any(g["id"] == everyone for g in p["value"])]
    assert len(carrying) >= 6 and carrying == list(range(carrying[0], carrying[-1] + 1))
    repeats = [g for p in pages for g in p["value"] if g["id"] == everyone]
    assert all(g["displayName"] == "All Company" for g in repeats)
    merged = merge(pages)
    assert list(merged) == list(org.groups)  # every group once, in a stable order
    for gid, group in org.groups.items():
        assert merged[gid]["added"] == set(group.members) and not merged[gid]["removed"]
        assert merged[gid]["props"]["displayName"] == group.display_name


def test_small_page_limits_split_and_merge(connect: Connect) -> None:
    sandbox, http = connect(delta_page_groups=3, delta_page_members=40)
    pages, _ = run_round(http, "groups/delta?$select=displayName&$expand=members")
    assert all(len(p["value"]) <= 3 for p in pages)
    assert all(sum(len(g.get("members@delta", [])) for g in p["value"]) <= 40 for p in pages)
    ids = [g["id"] for p in pages for g in p["value"]]
    assert len(ids) > len(set(ids))  # large groups repeat across pages
    merged = merge(pages)
    assert {gid: m["added"] for gid, m in merged.items()} == {
        gid: set(g.members) for gid, g in sandbox.org.groups.items()
    }


# -- resuming --------------------------------------------------------------------------------
def test_no_change_resume_is_one_request(pristine: tuple[GraphSandbox, httpx.Client]) -> None:
    sandbox, http = pristine
    link = initial(http)
    sandbox.reset_log()
    body = http.get(link).json()
    assert sandbox.request_count("/v1.0/groups/delta") == 1
    assert body["value"] == [] and "@odata.nextLink" not in body
    assert body["@odata.deltaLink"].startswith(f"{sandbox.graph_url}/groups/delta?$deltatoken=")
    assert list(body) == list(
        reference("groups_delta.json")["sequence"]["4a_GET deltaLink (no changes)"]
    )


def test_net_changes(connect: Connect) -> None:
    sandbox, http = connect()
    org = sandbox.org
    link = initial(http, "$select=displayName,description,members")
    hr, finance, legal, sales = (org.group_by_name(n) for n in ("HR", "Finance", "Legal", "Sales"))
    joiner = outsider(org, "HR")
    (leaver,) = members_of(org, "Finance")
    assert org.add_member(hr.id, joiner)
    assert org.remove_member(finance.id, leaver)
    flicker = outsider(org, "Legal")
    org.add_member(legal.id, flicker)  # joined then left: nets to nothing
    org.remove_member(legal.id, flicker)
    (back,) = members_of(org, "Sales")
    org.remove_member(sales.id, back)  # left then rejoined: nothing either
    org.add_member(sales.id, back)
    marketing = org.group_by_name("Marketing")
    org.rename_group(marketing.id, "Marketing & Growth")
    new_members = [outsider(org, "HR", 1), outsider(org, "HR", 2)]
    created = org.create_group("Project Tesseract", new_members)
    fleeting = org.create_group("Project Mayfly", new_members[:1])
    org.delete_group(fleeting.id)  # created and deleted since: nothing
    security = org.group_by_name("Project Borealis")  # security group
    unified = org.group_by_name("Project Apollo")  # Microsoft 365 group
    assert unified.group_types == ["Unified"] and security.group_types == []
    org.delete_group(security.id)
    org.delete_group(unified.id)
    london, uk = org.group_by_name("London Office"), org.group_by_name("Country UK")
    org.delete_group(london.id)  # also leaves its parent

    pages, link = run_round(http, link)
    merged = merge(pages)
    assert set(merged) == {
        hr.id,
        finance.id,
        marketing.id,
        created.id,
        security.id,
        unified.id,
        london.id,
        uk.id,
    }
    assert merged[hr.id]["added"] == {joiner} and not merged[hr.id]["removed"]
    assert merged[finance.id]["removed"] == {leaver} and not merged[finance.id]["added"]
    assert merged[marketing.id]["props"]["displayName"] == "Marketing & Growth"
    assert not merged[marketing.id]["added"] | merged[marketing.id]["removed"]
    assert merged[created.id]["added"] == set(new_members)
    assert merged[created.id]["props"]["displayName"] == "Project Tesseract"
    assert merged[security.id]["gone"] == "deleted"
    assert merged[unified.id]["gone"] == "changed"
    assert merged[uk.id]["removed"] == {london.id}
    assert merged[uk.id]["types"][london.id] == GROUP
    # The vendor's forms: a deleted group is just id + @removed; a removed member carries
    # @removed beside @odata.type and id.
    objects = {o["id"]: o for p in pages for o in p["value"]}
    assert objects[security.id] == {"id": security.id, "@removed": {"reason": "deleted"}}
    vendor = reference("groups_delta.json")["sequence"]
    vendor_change = vendor["4b_GET deltaLink (changes; member removed + added)"]["value"][0]
    (entry,) = objects[finance.id]["members@delta"]
    assert set(entry) == set(vendor_change["members@delta"][0])
    assert entry == {"@odata.type": USER, "id": leaver, "@removed": {"reason": "deleted"}}
    assert set(vendor_change) <= set(objects[finance.id])
    # Nothing since: the new link answers empty.
    again = http.get(link).json()
    assert again["value"] == [] and "@odata.deltaLink" in again


def test_user_deletion_with_and_without_omission(connect: Connect) -> None:
    sandbox, http = connect()
    org = sandbox.org
    link = initial(http)
    everyone = org.group_by_name("All Company")
    leaver = next(
        u for u in everyone.members if sum(u in g.members for g in org.groups.values()) > 2
    )
    homes = {g.id for g in org.groups.values() if leaver in g.members}
    org.delete_user(leaver)
    merged, _ = changes(http, link)
    assert set(merged) == homes
    assert all(m["removed"] == {leaver} and not m["added"] for m in merged.values())
    assert all(m["types"][leaver] == USER for m in merged.values())
    # Graph: "permanently deleted users may not appear as removals" (same token reused).
    sandbox.omit_deleted_user_removals = True
    quiet, _ = changes(http, link)
    assert quiet == {}
    # A plain leave still shows while the deletion stays invisible.
    (other,) = members_of(org, "HR")
    org.remove_member(org.group_by_name("HR").id, other)
    merged, _ = changes(http, link)
    assert set(merged) == {org.group_by_name("HR").id}
    assert merged[org.group_by_name("HR").id]["removed"] == {other}


def test_deltatoken_latest(connect: Connect) -> None:
    sandbox, http = connect()
    org = sandbox.org
    body = http.get("groups/delta?$select=displayName,members&$deltaToken=latest").json()
    assert body["value"] == [] and "@odata.nextLink" not in body
    hr = org.group_by_name("HR")
    joiner = outsider(org, "HR")
    org.add_member(hr.id, joiner)
    merged, _ = changes(http, body["@odata.deltaLink"])
    assert set(merged) == {hr.id} and merged[hr.id]["added"] == {joiner}
    assert set(merged[hr.id]["props"]) == {"id", "displayName"}


def test_filter_by_ids(connect: Connect) -> None:
    sandbox, http = connect()
    org = sandbox.org
    wanted = [org.group_by_name(n).id for n in ("HR", "Legal")]
    query = " or ".join(f"id eq '{g}'" for g in wanted)
    pages, link = run_round(http, f"groups/delta?$select=displayName,members&$filter={query}")
    assert list(merge(pages)) == wanted
    org.add_member(wanted[1], outsider(org, "Legal"))
    org.add_member(org.group_by_name("Finance").id, outsider(org, "Finance"))  # not tracked
    merged, _ = changes(http, link)
    assert list(merged) == [wanted[1]]


# -- errors ----------------------------------------------------------------------------------
def test_unsupported_parameters(pristine: tuple[GraphSandbox, httpx.Client]) -> None:
    sandbox, http = pristine
    for query in ("$top=5", "$orderby=displayName", "$count=true", '$search="displayName:HR"'):
        resp = http.get(f"groups/delta?{query}", headers={"ConsistencyLevel": "eventual"})
        assert resp.status_code == 400, query
        error = resp.json()["error"]
        assert error["code"] == "Request_UnsupportedQuery" and "innerError" in error
    assert http.get("groups/delta?$expand=owners").status_code == 400
    bad_select = http.get("groups/delta?$select=displayName,nope")
    assert bad_select.status_code == 400 and "'nope'" in bad_select.json()["error"]["message"]
    bad_filter = http.get("groups/delta", params={"$filter": "displayName eq 'HR'"})
    assert bad_filter.status_code == 400
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(51)]
    too_many = " or ".join(f"id eq '{i}'" for i in ids)
    resp = http.get("groups/delta", params={"$filter": too_many})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "Request_UnsupportedQuery"
    fifty = " or ".join(f"id eq '{i}'" for i in [*ids[:49], sandbox.org.group_by_name("HR").id])
    ok = http.get("groups/delta", params={"$filter": fifty, "$select": "displayName"})
    assert ok.status_code == 200 and [g["displayName"] for g in ok.json()["value"]] == ["HR"]


def test_forged_and_garbled_tokens(connect: Connect) -> None:
    sandbox, http = connect()
    link = initial(http)
    first = http.get("groups/delta?$select=displayName,members").json()
    skip = first["@odata.nextLink"]
    token = parse_qs(urlsplit(link).query)["$deltatoken"][0]
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    stranger, stranger_http = connect(random_token_key=True)
    foreign = initial(stranger_http).replace(stranger.graph_url, sandbox.graph_url)
    skip_token = parse_qs(urlsplit(skip).query)["$skiptoken"][0]
    for url in (
        "groups/delta?$deltatoken=not-a-token",
        f"groups/delta?$deltatoken={tampered}",
        f"groups/delta?$deltatoken={skip_token}",  # a skiptoken is no deltatoken
        f"groups/delta?$skiptoken={token}",
        foreign,  # signed with another key
    ):
        resp = http.get(url)
        assert resp.status_code == 400, url
        assert resp.json()["error"]["code"] == "Request_BadRequest"
        assert resp.json()["error"]["message"] == "Badly formed token."
    assert http.get(link).status_code == 200 and http.get(skip).status_code == 200


@pytest.mark.parametrize("mode", ["gone", "syncStateNotFound", "resyncRequired"])
def test_expired_tokens(connect: Connect, mode: str) -> None:
    sandbox, http = connect(delta_expiry_mode=mode)
    query = "$select=displayName,members"
    link = initial(http, query)
    skip = http.get(f"groups/delta?{query}").json()["@odata.nextLink"]
    sandbox.expire_delta_tokens()
    for url in (link, skip):
        resp = http.get(url)
        error = resp.json()["error"]
        if mode == "gone":
            assert resp.status_code == 410 and error["code"] == "resyncRequired"
            location = resp.headers["Location"]
            assert location.startswith(f"{sandbox.graph_url}/groups/delta?")
            assert parse_qs(urlsplit(location).query, keep_blank_values=True)["$deltatoken"] == [""]
            # The Location starts a fresh round of the same shape.
            pages, fresh = run_round(http, location)
            assert set(merge(pages)) == set(sandbox.org.groups)
            assert set(pages[0]["value"][0]) == {"id", "displayName", "members@delta"}
            assert http.get(fresh).json()["value"] == []
        else:
            assert resp.status_code == 400 and error["code"] == mode
            assert "Location" not in resp.headers
        assert set(error) == {"code", "message", "innerError"}
    # Age: tokens live delta_token_lifetime seconds (7 days by default).
    link = initial(http, query)
    assert sandbox.delta_token_lifetime == 7 * 24 * 3600
    sandbox.clock = lambda: time.time() + 7 * 24 * 3600 + 60
    assert http.get(link).status_code == (410 if mode == "gone" else 400)
    sandbox.clock = lambda: time.time() + 6 * 24 * 3600
    assert http.get(link).status_code == 200


# -- routes around delta ---------------------------------------------------------------------
def test_deleted_objects_disappear_and_batch_reads_users(connect: Connect) -> None:
    sandbox, http = connect()
    org = sandbox.org
    group = org.group_by_name("Project Kestrel")
    (user,) = members_of(org, "Legal")
    (kept,) = members_of(org, "HR")
    org.delete_group(group.id)
    org.delete_user(user)
    for path in (
        f"groups/{group.id}",
        f"groups/{group.id}/members",
        f"groups/{group.id}/transitiveMembers",
        f"users/{user}",
    ):
        resp = http.get(path)
        assert (
            resp.status_code == 404 and resp.json()["error"]["code"] == "Request_ResourceNotFound"
        )
    listed = http.get("groups?$top=999&$select=id").json()["value"]
    assert group.id not in {g["id"] for g in listed} and len(listed) == len(org.groups)
    assert user not in {
        m["id"]
        for m in http.get(f"groups/{org.group_by_name('Legal').id}/members?$top=999").json()[
            "value"
        ]
    }
    requests = [
        {"id": "1", "method": "GET", "url": f"/users/{kept}?$select=id,displayName,userType"},
        {"id": "2", "method": "GET", "url": f"/users/{user}?$select=id"},
    ]
    body = http.post("$batch", json={"requests": requests}).json()
    by_id = {r["id"]: r for r in body["responses"]}
    assert by_id["1"]["status"] == 200
    assert set(by_id["1"]["body"]) == {"@odata.context", "id", "displayName", "userType"}
    assert by_id["2"]["status"] == 404


def test_faults_log_and_permissions(pristine: tuple[GraphSandbox, httpx.Client]) -> None:
    sandbox, http = pristine
    sandbox.reset_log()
    sandbox.faults.add("throttle", path="/groups/delta", retry_after="2")
    throttled = http.get("groups/delta?$select=displayName")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
    assert http.get("groups/delta?$select=displayName").status_code == 200
    assert [r.status for r in sandbox.requests] == [429, 200]
    assert sandbox.request_count("/v1.0/groups/delta") == 2
    sandbox.permissions -= {"GroupMember.Read.All", "Directory.Read.All"}
    denied = http.get("groups/delta")
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "Authorization_RequestDenied"
    sandbox.permissions.add("Group.Read.All")
    assert http.get("groups/delta?$select=displayName").status_code == 200


# -- an evolving tenant ----------------------------------------------------------------------
def test_step_zero_is_pristine_and_evolution_is_deterministic() -> None:
    base = small_org()
    assert (base.version, base.steps_applied, base.changes) == (0, 0, [])
    a, b = small_org(), small_org()
    a.evolve(120)
    b.evolve(50)
    b.evolve_to(120)
    b.evolve_to(3)  # never backwards
    assert a == b and a.steps_applied == 120 and a.version > 120
    assert list(a.groups) == list(b.groups) and list(a.users) == list(b.users)
    assert a != base
    c = small_org(seed=8)
    c.evolve(120)
    assert c.changes != a.changes
    kinds = {change.kind for change in a.changes}
    assert {GROUP_CREATED, MEMBER_DELETED, USER_CREATED} <= kinds
    for name in CORE_GROUPS:
        a.group_by_name(name)  # never deleted or renamed by evolution
    changed = {c.group_id for c in a.changes if c.kind == "member_added"}
    assert len(changed - {a.group_by_name("All Company").id}) > 10
    # Caches follow the mutations: transitive memberships match a fresh computation.
    for gid in list(a.groups)[:15]:
        cached = a.transitive_members(gid)
        a.invalidate_cache()
        assert a.transitive_members(gid) == cached


def test_evolved_groups_get_deleted_and_core_groups_survive() -> None:
    org = small_org()
    org.evolve(600)
    kinds = [c.kind for c in org.changes]
    assert GROUP_DELETED in kinds
    assert all(g not in org.groups for g in org.deleted_groups)
    assert all(
        org.deleted_groups[g].display_name.startswith("Project ") for g in org.deleted_groups
    )
    for name in CORE_GROUPS:
        assert org.group_by_name(name).members
    assert not any(u in g.members for g in org.groups.values() for u in org.deleted_users)


def test_catch_up_is_fast() -> None:
    org = build_organisation()
    start = time.perf_counter()
    org.evolve(2000)  # about 83 days of hourly steps
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed


def test_tokens_work_across_instances_of_the_same_tenant(connect: Connect) -> None:
    org_a, org_b = small_org(), small_org()
    org_a.evolve(40)
    org_b.evolve(40)
    a, http_a = connect(org_a, delta_page_members=100)
    b, http_b = connect(org_b, delta_page_members=100)

    def on_b(url: str) -> str:  # the same link, sent to the other process
        return url.replace(a.graph_url, b.graph_url)

    first = http_a.get("groups/delta?$select=displayName,members").json()
    page_a = http_a.get(first["@odata.nextLink"]).json()
    page_b = http_b.get(on_b(first["@odata.nextLink"])).json()
    assert page_a["value"] == page_b["value"]
    link = initial(http_a)
    assert http_b.get(on_b(link)).json()["value"] == []
    org_a.evolve(5)
    org_b.evolve(5)
    from_a, _ = changes(http_a, link)
    from_b, _ = changes(http_b, on_b(link))
    assert from_a == from_b and from_a


def test_evolve_every_advances_with_the_clock(connect: Connect) -> None:
    epoch = EVOLVE_EPOCH.timestamp()
    now = [epoch + 10.5 * 3600]
    sandbox, http = connect(small_org(), evolve_every=3600, clock=lambda: now[0])
    assert sandbox.evolution_step() == 10 and sandbox.catch_up() == 10
    assert http.get("groups?$top=1").status_code == 200
    assert sandbox.org.steps_applied == 10
    link = initial(http)
    now[0] += 2 * 3600
    merged, link = changes(http, link)  # the request itself catches the tenant up
    assert sandbox.org.steps_applied == 12 and merged
    now[0] -= 5 * 3600  # the clock going back never undoes steps
    assert http.get(link).json()["value"] == [] and sandbox.org.steps_applied == 12
    # Another process started later agrees exactly.
    twin = small_org()
    twin.evolve_to(12)
    assert twin == sandbox.org
    # Before the epoch there is nothing to do.
    early = GraphSandbox(small_org(), evolve_every=3600, clock=lambda: epoch - 86_400)
    assert early.catch_up() == 0


def test_client_converges_while_the_tenant_evolves(connect: Connect) -> None:
    """Evolution between pages of every round: merged rounds still end in the exact state."""
    sandbox, http = connect(delta_page_groups=4, delta_page_members=60)
    org = sandbox.org
    state: dict[str, set[str]] = {}

    def apply(pages: list[dict[str, Any]]) -> None:
        for page in pages:
            for obj in page["value"]:
                if "@removed" in obj:
                    state.pop(obj["id"], None)
                    continue
                members = state.setdefault(obj["id"], set())
                for m in obj.get("members@delta", []):
                    (members.discard if "@removed" in m else members.add)(m["id"])

    def evolving_round(url: str) -> str:
        pages: list[dict[str, Any]] = []
        while True:
            page = http.get(url).json()
            pages.append(page)
            org.evolve(1)  # the tenant changes while the client pages
            if "@odata.deltaLink" in page:
                apply(pages)
                return page["@odata.deltaLink"]
            url = page["@odata.nextLink"]

    link = evolving_round("groups/delta?$select=displayName,members")
    for _ in range(3):
        link = evolving_round(link)
    pages, _ = run_round(http, link)  # quiet now: one last round catches up
    apply(pages)
    assert state == {gid: set(g.members) for gid, g in org.groups.items()}


def test_snapshot_rewinds_memberships() -> None:
    org = small_org()
    org.evolve(30)
    version = org.version
    then = {gid: sorted(g.members) for gid, g in org.groups.items()}
    org.evolve(60)
    snapshot = org.snapshot(version)
    assert [g.id for g in snapshot.groups] == list(then)
    assert {g.id: snapshot.members(g.id) for g in snapshot.groups} == then
