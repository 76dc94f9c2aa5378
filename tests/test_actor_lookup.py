"""Looking up the people that audit events name only by sign-in name or email: the sandbox's
Graph ``/users`` ``$filter`` and the connector's batched lookup, over real HTTPS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from groupsync_pipeline.connectors.base import PermissionDeniedError
from groupsync_pipeline.connectors.office365_activity import (
    pick_directory_user,
    sign_in_name_filter,
)
from groupsync_pipeline.sandbox.graph import DEFAULT_PERMISSIONS, GRAPH_SCOPE, GraphSandbox
from groupsync_pipeline.sandbox.seed import User

from .conftest import make_connector


@pytest.fixture(scope="module")
def tenant() -> Iterator[GraphSandbox]:
    with GraphSandbox(activity_rate=0) as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def _reset(tenant: GraphSandbox) -> Iterator[None]:
    tenant.reset_log()
    yield
    tenant.faults.clear()
    tenant.permissions = set(DEFAULT_PERMISSIONS)


@pytest.fixture
def graph(tenant: GraphSandbox) -> Iterator[httpx.Client]:
    ctx = ssl.create_default_context(cafile=tenant.ca_bundle)
    with httpx.Client(verify=ctx, timeout=10, base_url=tenant.graph_url + "/") as http:
        token = http.post(
            tenant.token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": tenant.client_id,
                "client_secret": tenant.client_secret,
                "scope": GRAPH_SCOPE,
            },
        ).json()["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"
        yield http


def a_guest(tenant: GraphSandbox) -> User:
    return next(u for u in tenant.org.users.values() if u.user_type == "Guest" and u.mail)


def a_member(tenant: GraphSandbox) -> User:
    return next(
        u
        for u in tenant.org.users.values()
        if u.user_type == "Member" and u.mail and "#EXT#" not in u.user_principal_name
    )


# --- the sandbox: /users?$filter with eq ... or ... ------------------------------------------


def test_users_filter_on_sign_in_name_or_mail_ignores_case(
    tenant: GraphSandbox, graph: httpx.Client
) -> None:
    guest, member = a_guest(tenant), a_member(tenant)

    def ids(name: str) -> list[str]:
        literal = name.replace("'", "''")
        resp = graph.get(
            "users",
            params={
                "$filter": f"userPrincipalName eq '{literal}' or mail eq '{literal}'",
                "$select": "id,userPrincipalName,mail,userType",
            },
        )
        assert resp.status_code == 200, resp.text
        return [u["id"] for u in resp.json()["value"]]

    # File events name guests by their UPN in lower case ("#ext#"); Graph's eq ignores case.
    assert ids(guest.user_principal_name.lower()) == [guest.id]
    assert ids(guest.mail.upper()) == [guest.id]  # type: ignore[union-attr]
    assert ids(member.user_principal_name.swapcase()) == [member.id]
    assert ids("someone@partner.example") == []
    assert ids("o'brien@partner.example") == []  # a quote, doubled inside the literal
    # "and" binds tighter than "or", as in OData.
    resp = graph.get(
        "users",
        params={
            "$filter": f"userType eq 'Member' and mail eq '{guest.mail}' "
            f"or userPrincipalName eq '{member.user_principal_name}'"
        },
    )
    assert [u["id"] for u in resp.json()["value"]] == [member.id]


def test_users_filter_inside_batch_needs_the_hash_encoded(
    tenant: GraphSandbox, graph: httpx.Client
) -> None:
    guest = a_guest(tenant)
    name = guest.user_principal_name.lower()
    expression = f"userPrincipalName eq '{name}' or mail eq '{name}'"
    requests = [
        {"id": "1", "method": "GET", "url": f"/users?$filter={quote(expression, safe='')}"},
        # Unencoded, "#" starts the URL's fragment: the literal is cut short.
        {"id": "2", "method": "GET", "url": f"/users?$filter={expression}"},
    ]
    answers = {
        r["id"]: r for r in graph.post("$batch", json={"requests": requests}).json()["responses"]
    }
    assert answers["1"]["status"] == 200
    assert [u["id"] for u in answers["1"]["body"]["value"]] == [guest.id]
    assert answers["2"]["status"] == 400


# --- the connector ---------------------------------------------------------------------------


def batch_requests(tenant: GraphSandbox) -> int:
    return sum(1 for r in tenant.requests if r.path == "/v1.0/$batch")


def test_lookup_finds_guests_and_members_by_any_case_and_knows_who_is_absent(
    tenant: GraphSandbox,
) -> None:
    guest, member = a_guest(tenant), a_member(tenant)
    names = [
        guest.user_principal_name.lower(),  # how file events name a guest
        member.mail.upper(),  # type: ignore[union-attr]
        "someone@partner.example",
        "o'brien@partner.example",
        "a+b&c=d #x@partner.example",  # "+", "&", "=", "#" and a space stay in the literal
        "zoë@partner.example",
        "SHAREPOINT\\system",  # no "@": no sign-in name or address, never asked
        guest.user_principal_name.lower(),  # repeated: asked once
    ]
    with make_connector(tenant) as connector:
        found = connector.users_by_sign_in_name(names)
    assert set(found.found) == {guest.user_principal_name.lower(), member.mail.upper()}  # type: ignore[union-attr]
    account = found.found[guest.user_principal_name.lower()]
    assert account.account_id == guest.id and account.is_external and account.user_type == "Guest"
    assert account.user_principal_name == guest.user_principal_name
    assert found.found[member.mail.upper()].account_id == member.id  # type: ignore[union-attr]
    assert found.absent == {
        "someone@partner.example",
        "o'brien@partner.example",
        "a+b&c=d #x@partner.example",
        "zoë@partner.example",
        "SHAREPOINT\\system",
    }
    assert found.failed == {}
    assert batch_requests(tenant) == 1


def test_lookup_asks_twenty_names_per_batch(tenant: GraphSandbox) -> None:
    users = [u for u in tenant.org.users.values() if u.mail][:45]
    with make_connector(tenant) as connector:
        found = connector.users_by_sign_in_name(u.user_principal_name for u in users)
    assert {a.account_id for a in found.found.values()} == {u.id for u in users}
    assert batch_requests(tenant) == 3


def test_one_name_refused_does_not_fail_the_others(tenant: GraphSandbox) -> None:
    member = a_member(tenant)
    odd = "odd.name@partner.example"
    tenant.faults.add("error", path="odd.name", status=400, count=1)
    tenant.faults.add("throttle", path=quote(member.user_principal_name, safe=""), count=1,
                      retry_after="0.1")  # fmt: skip
    with make_connector(tenant) as connector:
        found = connector.users_by_sign_in_name([odd, member.user_principal_name])
    assert found.found[member.user_principal_name].account_id == member.id  # retried
    assert set(found.failed) == {odd} and "400" in found.failed[odd]
    assert found.absent == set()


def test_lookup_without_user_read_names_the_permission(tenant: GraphSandbox) -> None:
    tenant.permissions.discard("User.Read.All")
    tenant.permissions.discard("Directory.Read.All")
    with make_connector(tenant) as connector, pytest.raises(PermissionDeniedError) as raised:
        connector.users_by_sign_in_name([a_member(tenant).user_principal_name])
    assert "User.Read.All" in str(raised.value)


def test_nothing_to_look_up_asks_nothing(tenant: GraphSandbox) -> None:
    with make_connector(tenant) as connector:
        found = connector.users_by_sign_in_name([])
    assert (found.found, found.absent, found.failed) == ({}, set(), {})
    assert batch_requests(tenant) == 0


def test_the_name_index_follows_hires_and_departures() -> None:
    with GraphSandbox(activity_rate=0) as sandbox, make_connector(sandbox) as connector:
        hired = sandbox.org.create_user("Nadia", "Newcomer", mail_local="nadia.newcomer")
        name = hired.user_principal_name.upper()
        assert connector.users_by_sign_in_name([name]).found[name].account_id == hired.id
        sandbox.org.delete_user(hired.id)
        assert connector.users_by_sign_in_name([name]).absent == {name}


def test_the_filter_and_the_choice_among_answers() -> None:
    assert sign_in_name_filter("o'brien@x.example") == (
        "userPrincipalName eq 'o''brien@x.example' or mail eq 'o''brien@x.example'"
    )
    by_mail = {"id": "b", "userPrincipalName": "b@x.example", "mail": "Ann@X.example"}
    by_upn = {"id": "z", "userPrincipalName": "ANN@x.example", "mail": None}
    # A sign-in name match wins over a mail match; answers that are not users are ignored.
    assert pick_directory_user("ann@x.example", [by_mail, None, {"id": 7}, by_upn]) == by_upn
    assert pick_directory_user("ann@x.example", [by_mail]) == by_mail
    assert pick_directory_user("ann@x.example", [{"displayName": "no id"}, "x"]) is None
    assert pick_directory_user("ann@x.example", []) is None
