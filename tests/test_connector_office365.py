"""The Microsoft Graph connector over real HTTPS against the sandbox tenant."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

import duckdb
import pytest

from groupsync_pipeline.connectors.base import (
    Account,
    AuthenticationError,
    GroupNotFoundError,
    MemberPage,
    PermissionDeniedError,
    VendorError,
)
from groupsync_pipeline.connectors.office365 import (
    GraphConnector,
    _member_type,
    account_from_user,
    batch_count,
    graph_scope,
    group_kind,
    parse_retry_after,
)
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.storage.writes import MemberStaging

from .conftest import VENDOR_EXAMPLES, make_connector

API_REFERENCE = VENDOR_EXAMPLES / "graph"
HOSTILE = 'Ops "Night" O\'Brien & <Co> — ünïcødé 🚀'


def member_rows(pages: Iterable[MemberPage]) -> tuple[list[Account], dict[str, int], int]:
    """Pages read as an import reads them (MemberStaging, the connector's member_rows_sql):
    the people in listing order, the other members by kind, and the page count."""
    with tempfile.TemporaryDirectory() as folder:
        staging = MemberStaging(Path(folder) / "members")
        try:
            for page in pages:
                staging.add(page)
            staging.read(GraphConnector.member_rows_sql)
            rows = duckdb.sql(
                f"SELECT {', '.join(Account._fields)} "
                "FROM read_parquet($rows, file_row_number = true) "
                "WHERE kind = 'user' ORDER BY file_row_number",
                params={"rows": str(staging.rows_path)},
            ).fetchall()
        finally:
            staging.remove()
    return [Account(*row) for row in rows], dict(staging.other_members), staging.pages


def members_of(connector: GraphConnector, remote_id: str) -> tuple[list, dict, int]:
    return member_rows(connector.group_members(remote_id))


def test_catalog_lists_every_group_with_people_counts(
    sandbox: GraphSandbox, connector: GraphConnector
) -> None:
    catalog = {g.remote_id: g for g in connector.group_catalog()}
    assert len(catalog) == len(sandbox.org.groups) == 40
    for group_id, group in sandbox.org.groups.items():
        assert catalog[group_id].name == group.display_name
        assert catalog[group_id].member_count == len(sandbox.org.transitive_user_ids(group_id))
    kinds = {g.kind for g in catalog.values()}
    assert {"microsoft365", "security"} <= kinds


def test_large_group_pages_at_999_and_flattens_nesting(
    sandbox: GraphSandbox, connector: GraphConnector
) -> None:
    group = sandbox.org.group_by_name("All Company")
    sandbox.reset_log()
    accounts, _, pages = members_of(connector, group.id)
    expected = sandbox.org.transitive_user_ids(group.id)
    assert len(expected) > 5000
    assert pages == -(-len(sandbox.org.transitive_members(group.id)) // 999)
    assert sorted(a.account_id for a in accounts) == sorted(expected)
    queries = [unquote(r.query) for r in sandbox.requests if "transitiveMembers" in r.path]
    assert len(queries) == pages and all("$top=999" in q for q in queries)


def test_nested_groups_and_other_member_types_are_counted_not_stored(
    sandbox: GraphSandbox, connector: GraphConnector
) -> None:
    org = sandbox.org
    checked = 0
    for group in org.groups.values():
        members = org.transitive_members(group.id)
        non_users = [m for m in members if m not in org.users]
        if not non_users:
            continue
        accounts, others, _ = members_of(connector, group.id)
        assert sorted(a.account_id for a in accounts) == sorted(org.transitive_user_ids(group.id))
        assert sum(others.values()) == len(non_users)
        checked += 1
    assert checked >= 2


def test_guests_are_external(sandbox: GraphSandbox, connector: GraphConnector) -> None:
    group = sandbox.org.group_by_name("All Staff")
    accounts, _, _ = members_of(connector, group.id)
    by_id = {a.account_id: a for a in accounts}
    guests = [u for u in sandbox.org.users.values() if u.id in by_id and u.user_type == "Guest"]
    assert guests
    assert all(by_id[u.id].is_external for u in guests)
    member = next(
        u
        for u in sandbox.org.users.values()
        if u.id in by_id and u.user_type == "Member" and "#EXT#" not in u.user_principal_name
    )
    assert not by_id[member.id].is_external


def test_find_group_by_id_and_by_hostile_name(
    sandbox: GraphSandbox, connector: GraphConnector
) -> None:
    hr = sandbox.org.group_by_name("HR")
    assert connector.find_group(hr.id).name == "HR"
    hostile = connector.find_group(HOSTILE)
    assert hostile.remote_id == sandbox.org.group_by_name(HOSTILE).id
    assert hostile.member_count == len(sandbox.org.transitive_user_ids(hostile.remote_id))


def test_unknown_group_lists_close_matches(connector: GraphConnector) -> None:
    with pytest.raises(GroupNotFoundError) as raised:
        connector.find_group("Finanse")
    assert "no group has the id or the exact name 'Finanse'" in str(raised.value)
    assert "close matches: Finance (" in str(raised.value)
    # Graph matches names without regard to case; an import takes the exact name only.
    with pytest.raises(GroupNotFoundError, match=r"exact name 'hr'.*close matches: HR \("):
        connector.find_group("hr")
    with pytest.raises(GroupNotFoundError, match="the id or the exact name '00000000-"):
        connector.find_group("00000000-0000-4000-8000-000000000000")
    with pytest.raises(GroupNotFoundError, match="no group given"):
        connector.find_group("   ")


ODD_ID = "Legacy:HR/01 #1"  # a real id need not be a GUID (other directories, proxies)


def test_a_group_id_of_any_shape_is_tried_as_an_id_first(sandbox: GraphSandbox) -> None:
    quoted = "Legacy%3AHR%2F01%20%231"  # one path segment, whatever it holds
    group = {"id": ODD_ID, "displayName": "Legacy HR", "securityEnabled": True}
    sandbox.faults.add("respond", path=f"/groups/{quoted}?", body=json.dumps(group))
    sandbox.faults.add("respond", path=f"/groups/{quoted}/transitive", body="7")
    sandbox.reset_log()
    with make_connector(sandbox) as graph:
        found = graph.find_group(ODD_ID)
    assert (found.remote_id, found.name, found.member_count) == (ODD_ID, "Legacy HR", 7)
    assert sandbox.faults.pending() == 0
    assert not any("$filter" in unquote(r.query) for r in sandbox.requests)  # no name search


def test_a_name_is_searched_after_graph_says_it_is_no_id(
    sandbox: GraphSandbox, connector: GraphConnector
) -> None:
    hr = sandbox.org.group_by_name("HR")
    assert connector.find_group(hr.id.upper()).remote_id == hr.id  # ids ignore case
    # "delta" reaches /groups/delta, which answers 200 with no group: it is not an id.
    for name in ("delta", "$count", ".."):
        with pytest.raises(GroupNotFoundError, match="the id or the exact name"):
            connector.find_group(name)
    # Any client error about the path means "not an id": the name is searched next.
    finance = sandbox.org.group_by_name("Finance")
    for status in (400, 404, 405):
        sandbox.faults.add("error", path="/groups/Finance?", status=status)
        assert connector.find_group("Finance").remote_id == finance.id
    # A service that stays down is an error, not a missing group.
    sandbox.faults.add("error", path="/groups/Finance?", status=503, count=100)
    with make_connector(sandbox, max_attempts=2) as graph, pytest.raises(VendorError):
        graph.find_group("Finance")


def test_each_retry_wait_is_logged(sandbox: GraphSandbox) -> None:
    hr = sandbox.org.group_by_name("HR")
    users = sorted(sandbox.org.users)[:3]
    sandbox.faults.add("throttle", path="transitiveMembers", count=1, retry_after="0.2")
    sandbox.faults.add("drop", path="transitiveMembers", count=1)
    sandbox.faults.add("throttle", path=f"/users/{users[1]}", count=1, retry_after="0.1")
    lines: list[str] = []
    with make_connector(sandbox, log=lines.append) as graph:
        members_of(graph, hr.id)
        list(graph.users_by_id(users))
    assert lines[0] == (
        f"Graph 429 on /groups/{hr.id}/transitiveMembers: waiting 0.2 s (attempt 2 of 8)"
    )
    assert lines[1].startswith(f"Graph RemoteProtocolError on /groups/{hr.id}/transitiveMembers")
    assert lines[1].endswith("(attempt 3 of 8)")
    assert lines[2] == ("Graph 429 for 1 of 3 requests on /$batch: waiting 0.1 s (attempt 2 of 8)")
    assert len(lines) == 3


def test_throttling_honours_fractional_retry_after(
    sandbox: GraphSandbox, connector: GraphConnector
) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("throttle", path="transitiveMembers", count=2, retry_after="0.3")
    started = time.monotonic()
    accounts, _, _ = members_of(connector, hr.id)
    assert time.monotonic() - started >= 0.6
    assert len(accounts) == len(sandbox.org.transitive_user_ids(hr.id))
    assert sandbox.faults.pending() == 0


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("error", {"status": 503}),
        ("error", {"status": 504}),
        ("timeout", {"delay": 1.5}),
        ("truncate", {}),
        ("garbage", {}),
        ("drop", {}),
    ],
)
def test_transient_faults_are_retried(sandbox: GraphSandbox, kind: str, options: dict) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add(kind, path="transitiveMembers", count=2, **options)
    with make_connector(sandbox, timeout=0.5) as graph:
        accounts, _, _ = members_of(graph, hr.id)
    assert len(accounts) == len(sandbox.org.transitive_user_ids(hr.id))
    assert sandbox.faults.pending() == 0


def test_persistent_500_fails_with_vendor_code_and_request_id(sandbox: GraphSandbox) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("error", path="transitiveMembers", count=100, status=500)
    with make_connector(sandbox, max_attempts=3) as graph, pytest.raises(VendorError) as raised:
        members_of(graph, hr.id)
    message = str(raised.value)
    assert "after 3 attempts" in message and "HTTP 500" in message
    assert "request-id" in message


def test_throttling_longer_than_the_budget_fails_fast(sandbox: GraphSandbox) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("throttle", path="transitiveMembers", count=5, retry_after="120")
    started = time.monotonic()
    with make_connector(sandbox, max_retry_wait=2) as graph, pytest.raises(VendorError):
        members_of(graph, hr.id)
    assert time.monotonic() - started < 10


def test_garbage_forever_is_a_clear_error(sandbox: GraphSandbox) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("garbage", path="transitiveMembers", count=100)
    with make_connector(sandbox, max_attempts=2) as graph, pytest.raises(VendorError) as raised:
        members_of(graph, hr.id)
    assert "not JSON" in str(raised.value)


def test_missing_permission_fails_at_once_naming_it(sandbox: GraphSandbox) -> None:
    sandbox.permissions.discard("GroupMember.Read.All")
    sandbox.permissions.discard("Directory.Read.All")
    try:
        sandbox.reset_log()
        with make_connector(sandbox) as graph, pytest.raises(PermissionDeniedError) as raised:
            list(graph.group_catalog())
        assert "GroupMember.Read.All" in str(raised.value)
        assert sandbox.request_count("/v1.0/groups") == 1  # not retried
    finally:
        sandbox.permissions.add("Directory.Read.All")


def test_expired_token_is_refreshed_once(sandbox: GraphSandbox, connector: GraphConnector) -> None:
    hr = sandbox.org.group_by_name("HR")
    members_of(connector, hr.id)
    sandbox.expire_tokens()
    accounts, _, _ = members_of(connector, hr.id)
    assert len(accounts) == len(sandbox.org.transitive_user_ids(hr.id))


def test_wrong_secret_is_an_authentication_error_without_the_secret(
    sandbox: GraphSandbox,
) -> None:
    with (
        make_connector(sandbox, client_secret="wrong-secret-xyz") as graph,
        pytest.raises(AuthenticationError) as raised,
    ):
        list(graph.group_catalog())
    assert "AADSTS7000215" in str(raised.value)
    assert "wrong-secret-xyz" not in str(raised.value)


def test_unreachable_identity_platform_is_clear(sandbox: GraphSandbox) -> None:
    with (
        make_connector(sandbox, authority_host="https://127.0.0.1:9") as graph,
        pytest.raises(AuthenticationError, match="identity platform"),
    ):
        list(graph.group_catalog())


def test_retry_after_parsing() -> None:
    assert parse_retry_after("10") == 10
    assert parse_retry_after("2.128") == pytest.approx(2.128)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # a past date: at once
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-3") == 0


def test_scopes_for_national_clouds_and_proxies() -> None:
    assert graph_scope("https://graph.microsoft.us/v1.0") == "https://graph.microsoft.us/.default"
    assert graph_scope("https://127.0.0.1:8443/v1.0") == "https://graph.microsoft.com/.default"


def test_vendor_examples_parse() -> None:
    groups = json.loads((API_REFERENCE / "groups_list.json").read_text())
    golf, talk = groups["example1_GET_/v1.0/groups"]["value"]
    assert group_kind(golf) == "microsoft365"
    assert group_kind(talk) == "distribution"
    members = json.loads((API_REFERENCE / "group_members.json").read_text())
    (user,) = members["GET_/v1.0/groups/02bd9fd6-8f93-4758-87c3-1fb73740a315/transitiveMembers"][
        "value"
    ]
    account = account_from_user(user)
    assert account.email == "group1@contoso.com" and account.enabled is None
    assert member_rows([MemberPage(items=[user])])[0] == [account]  # as an import reads it
    users = json.loads((API_REFERENCE / "domains_users.json").read_text())
    guest = users[
        "GET_/v1.0/users?$filter=startswith(displayName,'a')&$orderby=displayName&$count=true&$top=1"
        " (ConsistencyLevel: eventual)"
    ]["value"][0]
    assert account_from_user({"id": "x", **guest}).is_external


# What real tenants and other implementations of Graph may send in a member listing.
ODD_MEMBERS = [
    None,
    "a string",
    5,
    [],
    {},
    {"id": 123, "userPrincipalName": "number-id@contoso.example"},
    {"id": "", "userPrincipalName": "empty-id@contoso.example"},
    {"id": True},
    {"id": "enabled-text", "userPrincipalName": "t@contoso.example", "accountEnabled": "yes"},
    {"id": "name-object", "userPrincipalName": "o@contoso.example", "displayName": {"x": 1}},
    {"id": "name-number", "userPrincipalName": "n@contoso.example", "displayName": 5},
    {"id": "nulls", "userPrincipalName": None, "mail": None, "accountEnabled": None},
    {"id": "not-a-number", "userPrincipalName": "nan@contoso.example", "displayName": float("nan")},
    {"id": "empty-mail", "userPrincipalName": "e@contoso.example", "mail": ""},
    {"id": "no-type-no-upn", "displayName": "Printer"},
    {"id": "group-1", "@odata.type": "#microsoft.graph.group", "displayName": "Nested"},
    {"id": "sp-1", "@odata.type": "#microsoft.graph.servicePrincipal"},
    {"id": "dev-1", "@odata.type": "#microsoft.graph.device"},
    {"id": "typed-number", "@odata.type": 7, "userPrincipalName": "tn@contoso.example"},
    {"id": "guest", "@odata.type": "#microsoft.graph.user", "userType": "Guest", "mail": "g@x.io"},
    {"id": "ext-member", "userType": "Member", "userPrincipalName": "a_b.io#ext#@contoso.example"},
    {
        "id": "ab/c'd?e=\u00e9\n",
        "@odata.type": "#microsoft.graph.user",
        "displayName": HOSTILE + "\n=cmd|' /C calc'!A0",
        "mail": "hostile@contoso.example",
        "userPrincipalName": "hostile@contoso.example",
        "userType": "Member",
        "accountEnabled": False,
        "extra": {"nested": [1, 2]},
    },
    {"id": "again", "userPrincipalName": "r@contoso.example"},
    {"id": "again", "userPrincipalName": "r@contoso.example"},
]


def python_member_rows(items: list) -> tuple[list[Account], dict[str, int]]:
    """The same items read one by one in Python (account_from_user, _member_type)."""
    accounts, others = [], Counter()
    for obj in items:
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            others["invalid"] += 1
        elif (kind := _member_type(obj)) == "user":
            accounts.append(account_from_user(obj))
        else:
            others[kind] += 1
    return accounts, dict(others)


def test_member_rows_match_python() -> None:
    """office365_members.sql reads member items exactly as account_from_user reads a user,
    whatever shape the items have; nothing in them fails the read."""
    pages = [MemberPage(items=ODD_MEMBERS[:9]), MemberPage(items=[]), MemberPage(ODD_MEMBERS[9:])]
    accounts, others, page_count = member_rows(pages)
    expected_accounts, expected_others = python_member_rows(ODD_MEMBERS)
    assert page_count == 3
    assert accounts == expected_accounts
    assert others == expected_others
    assert others == {"invalid": 8, "unknown": 1, "group": 1, "servicePrincipal": 1, "device": 1}
    by_id = {a.account_id: a for a in accounts}
    assert by_id["guest"].is_external and by_id["ext-member"].is_external
    assert by_id["enabled-text"].enabled is None and by_id["name-object"].display_name is None
    assert by_id["not-a-number"].display_name is None
    assert by_id["empty-mail"].email == "e@contoso.example"
    assert by_id["ab/c'd?e=\u00e9\n"].display_name == HOSTILE + "\n=cmd|' /C calc'!A0"
    assert [a.account_id for a in accounts].count("again") == 2  # the merge keeps one


def test_member_rows_of_an_empty_listing() -> None:
    assert member_rows([]) == ([], {}, 0)
    assert member_rows([MemberPage(items=[]), MemberPage(items=[])]) == ([], {}, 2)


def test_member_rows_survive_what_json_cannot_hold() -> None:
    """Values JSON has no room for (NaN, infinity, a lone surrogate, a huge number) read as
    null or "?": the import goes on."""
    items = [
        {"id": "u1", "userPrincipalName": "a@contoso.example", "displayName": "\ud800 Ann"},
        {"id": "u2", "userPrincipalName": "b@contoso.example", "displayName": float("inf")},
        {"id": "u3", "userPrincipalName": "c@contoso.example", "extra": 10**40},
    ]
    accounts, others, _ = member_rows([MemberPage(items=items)])
    assert [(a.account_id, a.display_name) for a in accounts] == [
        ("u1", "? Ann"),
        ("u2", None),
        ("u3", None),
    ]
    assert others == {}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (42, 42),
        ("42", 42),
        (" 7 ", 7),
        ("NDI=", 42),
        ("MTIzNDU=", 12345),
        ("1234", 1234),
        ("", None),
        (None, None),
        (True, None),
        ({"error": {}}, None),
        ("abc", None),
    ],
)
def test_count_inside_batch_in_every_observed_form(body: object, expected: int | None) -> None:
    assert batch_count(body) == expected


def test_next_link_to_another_host_is_refused(sandbox: GraphSandbox) -> None:
    group = sandbox.org.group_by_name("All Company")
    sandbox.faults.add("foreign_next_link", path="transitiveMembers")
    with make_connector(sandbox) as graph, pytest.raises(VendorError, match="another host"):
        members_of(graph, group.id)
    assert not any("attacker" in r.path for r in sandbox.requests)


# What other implementations of the API may answer, and the sandbox never does on its own.
@pytest.mark.parametrize(
    ("answer", "content_type", "status", "message"),
    [
        ('{"value": null}', "application/json", 200, "no 'value' list"),
        ('{"value": [], "@odata.nextLink": 42}', "application/json", 200, "nextLink is not a URL"),
        (
            '{"error": {"code": "Weird", "innerError": "oops"}}',
            "application/json",
            400,
            "HTTP 400: Weird",
        ),
        ("", "application/json", 204, "HTTP 204 with a body that is not JSON"),
        ("[1, 2", "application/json", 404, "HTTP 404"),
    ],
)
def test_malformed_pages_fail_clearly_without_retrying(
    sandbox: GraphSandbox, answer: str, content_type: str, status: int, message: str
) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add(
        "respond", path="transitiveMembers", status=status, body=answer, content_type=content_type
    )
    sandbox.reset_log()
    with make_connector(sandbox) as graph, pytest.raises(VendorError, match=message):
        members_of(graph, hr.id)
    assert sandbox.request_count("/v1.0/groups/") == 1


def test_redirects_are_not_followed(sandbox: GraphSandbox) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("respond", path="transitiveMembers", status=302, body="")
    with make_connector(sandbox) as graph, pytest.raises(VendorError, match="unexpected redirect"):
        members_of(graph, hr.id)


def test_members_with_nulls_and_unknown_types_are_counted_not_crashed(
    sandbox: GraphSandbox,
) -> None:
    hr = sandbox.org.group_by_name("HR")
    page = {
        "value": [
            {
                "@odata.type": "#microsoft.graph.user",
                "id": "u1",
                "mail": None,
                "userPrincipalName": "x_fabrikam.example#EXT#@t.onmicrosoft.com",
                "displayName": None,
                "userType": None,
                "accountEnabled": None,
            },
            {"id": "u2", "userPrincipalName": "b@contoso.example"},  # no @odata.type
            {"@odata.type": None, "id": "x1"},
            {"@odata.type": "#microsoft.graph.orgContact", "id": "c1"},
            {"@odata.type": "#microsoft.graph.futureThing", "id": "f1"},
            {"@odata.type": "#microsoft.graph.user", "id": None},
            "not an object",
        ]
    }
    sandbox.faults.add("respond", path="transitiveMembers", body=json.dumps(page))
    with make_connector(sandbox) as graph:
        accounts, others, _ = members_of(graph, hr.id)
    assert [a.account_id for a in accounts] == ["u1", "u2"]
    assert accounts[0].is_external and accounts[0].email.startswith("x_fabrikam")
    assert others == {"unknown": 1, "orgContact": 1, "futureThing": 1, "invalid": 2}


def test_count_that_is_not_a_number_is_an_error(sandbox: GraphSandbox) -> None:
    hr = sandbox.org.group_by_name("HR")
    sandbox.faults.add("respond", path=r"\$count", body="lots", content_type="text/plain")
    with make_connector(sandbox) as graph, pytest.raises(VendorError, match="not a number"):
        graph.find_group(hr.id)


def test_permission_denied_inside_batch_names_the_permission(sandbox: GraphSandbox) -> None:
    denied = {
        "responses": [
            {
                "id": str(i),
                "status": 403,
                "headers": {},
                "body": {
                    "error": {
                        "code": "Authorization_RequestDenied",
                        "message": "Insufficient privileges",
                    }
                },
            }
            for i in range(20)
        ]
    }
    sandbox.faults.add("respond", path=r"\$batch", body=json.dumps(denied))
    with (
        make_connector(sandbox) as graph,
        pytest.raises(PermissionDeniedError, match="GroupMember.Read.All"),
    ):
        list(graph.group_catalog())


def test_batch_answer_that_is_not_an_object_is_an_error(sandbox: GraphSandbox) -> None:
    sandbox.faults.add("respond", path=r"\$batch", body="[]")
    with make_connector(sandbox) as graph, pytest.raises(VendorError, match="'responses'"):
        list(graph.group_catalog())


def test_counts_still_throttled_at_the_end_are_left_unknown(sandbox: GraphSandbox) -> None:
    sandbox.faults.add(
        "throttle",
        path="transitiveMembers/microsoft.graph.user/$count",
        count=10_000,
        retry_after="0.05",
    )
    try:
        with make_connector(sandbox, max_attempts=2) as graph:
            catalog = list(graph.group_catalog())
    finally:
        sandbox.faults.clear()
    assert len(catalog) == 40 and all(g.member_count is None for g in catalog)


def test_stopping_early_does_not_wait_for_a_throttled_page(sandbox: GraphSandbox) -> None:
    group = sandbox.org.group_by_name("All Company")
    sandbox.faults.add("throttle", path="skiptoken", count=100, retry_after="30")
    with make_connector(sandbox) as graph:
        pages = graph.group_members(group.id)
        next(pages)
        started = time.monotonic()
        pages.close()
        assert time.monotonic() - started < 3
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "graph-pages"]
