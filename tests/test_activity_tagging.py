"""Storing and tagging activities: the import-time rule, boundaries, repeats, late events,
automatic groups. Real DuckDB files; the merge is the one the pipeline runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from groupsync_pipeline.config import Connection
from groupsync_pipeline.connectors.base import Account, Activity
from groupsync_pipeline.storage.activity_writes import (
    ActivityStaging,
    ActorLookup,
    DuplicateActivityError,
    SourceRead,
    merge_activities,
    unknown_actor_names,
)
from groupsync_pipeline.storage.lake import Lake

CONTOSO = Connection(name="contoso", app="office365")
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DOMAINS = ["contoso.example", "contoso.onmicrosoft.com"]
NOTHING_TO_LOOK_UP = ActorLookup()


def event(
    event_id: str,
    at: datetime,
    actor: str | None = "u-ann",
    email: str | None = "ann@contoso.example",
    source: str = "signIns",
    action: str = "Sign-in",
    country: str | None = "US",
) -> Activity:
    raw = json.dumps({"id": event_id})
    return Activity(
        source,
        event_id,
        at,
        actor,
        email,
        action,
        None,
        None,
        "203.0.113.9",
        country,
        None,
        None,
        True,
        raw,
    )


def ingest(
    lake: Lake,
    events: list[Activity],
    now: datetime,
    admins: list[Account] | None = None,
    domains: list[str] | None = DOMAINS,
    lookup: ActorLookup | None = NOTHING_TO_LOOK_UP,
):
    staging = ActivityStaging(lake.staging_path())
    try:
        staging.add(events)
        with lake.write() as conn:
            return merge_activities(
                conn,
                connection=CONTOSO,
                staging=staging,
                reads=[SourceRead("signIns", now, len(events))],
                verified_domains=domains,
                admins=admins,
                now=now,
                actor_lookup=lookup,
            )
    finally:
        staging.remove()


def file_event(event_id: str, at: datetime, name: str | None, actor_type: str | None = "user"):
    """A file event: only a sign-in name (or email) for its actor, as SharePoint gives it."""
    return event(
        event_id,
        at,
        actor=None,
        email=name,
        source="Audit.SharePoint",
        action="FileAccessed",
        country=None,
    )._replace(actor_type=actor_type)


def actors(lake: Lake) -> dict[str, str | None]:
    with lake.read() as conn:
        return dict(conn.execute("SELECT event_id, actor_account_id FROM activities").fetchall())


def external_members(lake: Lake) -> list[str]:
    with lake.read() as conn:
        rows = conn.execute(
            "SELECT account_id FROM group_memberships "
            "WHERE group_id = 'contoso:auto:external' ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


def accounts(lake: Lake) -> dict[str, tuple]:
    with lake.read() as conn:
        rows = conn.execute(
            "SELECT account_id, email, user_type, is_external FROM accounts"
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def add_group(lake: Lake, name: str, imported_at: datetime, intervals: list) -> str:
    """An imported group with membership intervals [(account, valid_from, valid_to)]."""
    group_id = f"contoso:{name.lower()}"
    with lake.write() as conn:
        conn.execute(
            "INSERT INTO user_groups VALUES "
            "(?, ?, 'imported', 'contoso', ?, ?, ?, 0, NULL,"
            " (SELECT coalesce(max(group_key), 0) + 1 FROM user_groups))",
            [group_id, name, name.lower(), imported_at, imported_at],
        )
        for account, start, end in intervals:
            conn.execute(
                "INSERT INTO group_memberships VALUES (?, 'contoso', ?, ?, ?)",
                [group_id, account, start, end],
            )
    return group_id


def add_account(
    lake: Lake, account_id: str, email: str, name: str, upn: str, *, enabled: bool = True
) -> None:
    """A member account of contoso, first and last seen at T0."""
    with lake.write() as conn:
        conn.execute(
            "INSERT INTO accounts VALUES ('contoso', ?, ?, ?, ?, 'Member', false, ?, ?, ?)",
            [account_id, email, name, upn, enabled, T0, T0],
        )


def tags(lake: Lake) -> dict[str, list[str]]:
    with lake.read() as conn:
        rows = conn.execute(
            "SELECT event_id, groups FROM activities_tagged ORDER BY event_id"
        ).fetchall()
    return dict(rows)


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path)


def test_boundaries_join_and_leave_exactly_at_the_activity(lake: Lake) -> None:
    joined, left = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    add_group(lake, "HR", T0, [("u-ann", joined, left)])
    ingest(
        lake,
        [
            event("before-join", joined - timedelta(microseconds=1)),
            event("at-join", joined),
            event("inside", joined + timedelta(minutes=30)),
            event("before-leave", left - timedelta(microseconds=1)),
            event("at-leave", left),
        ],
        now=T0 + timedelta(hours=3),
    )
    assert tags(lake) == {
        "before-join": [],
        "at-join": ["HR"],  # valid_from is inclusive
        "inside": ["HR"],
        "before-leave": ["HR"],
        "at-leave": [],  # valid_to is exclusive
    }


def test_a_group_tags_only_activities_at_or_after_its_import(lake: Lake) -> None:
    # The interval starts before the import here on purpose: the import time still rules.
    add_group(lake, "Finance", T0, [("u-ann", T0 - timedelta(days=1), None)])
    ingest(
        lake,
        [event("before-import", T0 - timedelta(seconds=1)), event("at-import", T0)],
        now=T0 + timedelta(hours=1),
    )
    assert tags(lake) == {"before-import": [], "at-import": ["Finance"]}


def test_importing_later_never_tags_older_activities(lake: Lake) -> None:
    ingest(lake, [event("old", T0)], now=T0 + timedelta(minutes=5))
    imported = T0 + timedelta(hours=1)
    add_group(lake, "Executives", imported, [("u-ann", imported, None)])
    ingest(
        lake,
        [event("new", imported + timedelta(minutes=1))],
        now=imported + timedelta(hours=1),
    )
    assert tags(lake) == {"old": [], "new": ["Executives"]}
    # Tagging again (another run with nothing new) changes nothing.
    ingest(lake, [], now=imported + timedelta(hours=2))
    assert tags(lake) == {"old": [], "new": ["Executives"]}


def test_repeats_are_stored_once_and_keep_their_ids(lake: Lake) -> None:
    add_group(lake, "HR", T0, [("u-ann", T0, None)])
    first = [event(f"e{i}", T0 + timedelta(minutes=i)) for i in range(5)]
    result = ingest(lake, first + first[:2], now=T0 + timedelta(hours=1))
    assert (result.received, result.new) == (7, 5)
    with lake.read() as conn:
        before = conn.execute("SELECT activity_id, event_id FROM activities ORDER BY 1").fetchall()
    # The next read overlaps the last one: the same five come again, plus one new.
    again = ingest(
        lake, [*first, event("e5", T0 + timedelta(minutes=50))], now=T0 + timedelta(hours=2)
    )
    assert (again.received, again.new) == (6, 1)
    with lake.read() as conn:
        after = conn.execute("SELECT activity_id, event_id FROM activities ORDER BY 1").fetchall()
        tag_rows = conn.execute("SELECT count(*) FROM activity_groups").fetchall()[0][0]
    assert after[:5] == before
    assert after[5][1] == "e5" and after[5][0] > before[-1][0]
    assert tag_rows == 6  # every activity tagged exactly once


def test_a_late_event_inside_the_overlap_is_stored_and_tagged_by_its_own_time(
    lake: Lake,
) -> None:
    left = T0 + timedelta(minutes=30)
    add_group(lake, "HR", T0, [("u-ann", T0, left)])
    ingest(lake, [event("on-time", T0 + timedelta(minutes=40))], now=T0 + timedelta(hours=1))
    # Published late: it happened while Ann was still in HR, and arrives after she left.
    late = event("late", T0 + timedelta(minutes=10))
    result = ingest(
        lake, [late, event("on-time", T0 + timedelta(minutes=40))], now=T0 + timedelta(hours=2)
    )
    assert result.new == 1
    assert result.late_by_source == {"signIns": 1}  # before the last read ended: the overlap
    assert tags(lake) == {"late": ["HR"], "on-time": []}


def test_file_events_find_their_actor_by_sign_in_name(lake: Lake) -> None:
    add_group(lake, "HR", T0, [("u-bob", T0, None)])
    add_account(lake, "u-bob", "Bob@Contoso.example", "Bob", "bob@contoso.example")
    file_event = event(
        "file-1",
        T0 + timedelta(minutes=5),
        actor=None,
        email="BOB@contoso.example",
        source="Audit.SharePoint",
        action="FileAccessed",
        country=None,
    )
    # Someone only a sign-in has named so far: the app's own pairing of name and id is used.
    signin = event(
        "signin-1", T0 + timedelta(minutes=1), actor="u-cat", email="cat@contoso.example"
    )
    cat_file = event(
        "file-2",
        T0 + timedelta(minutes=6),
        actor=None,
        email="cat@contoso.example",
        source="Audit.SharePoint",
        action="FileAccessed",
    )
    result = ingest(lake, [file_event, signin, cat_file], now=T0 + timedelta(hours=1))
    assert result.resolved_actors == 2
    with lake.read() as conn:
        actors = dict(conn.execute("SELECT event_id, actor_account_id FROM activities").fetchall())
    assert actors == {"file-1": "u-bob", "signin-1": "u-cat", "file-2": "u-cat"}
    assert tags(lake)["file-1"] == ["HR"]


def test_a_stored_sign_in_names_the_account_of_later_file_events_for_30_days(
    lake: Lake,
) -> None:
    def file_event(event_id: str, at: datetime) -> Activity:
        return event(
            event_id,
            at,
            actor=None,
            email="CAT@contoso.example",
            source="Audit.SharePoint",
            action="FileAccessed",
        )

    ingest(lake, [event("signin-1", T0, actor="u-cat", email="Cat@Contoso.example")], now=T0)
    day_29, day_31 = T0 + timedelta(days=29), T0 + timedelta(days=31)
    ingest(lake, [file_event("file-1", day_29)], now=day_29 + timedelta(minutes=5))
    # Past Graph's 30 days of sign-ins, the pairing no longer counts...
    ingest(lake, [file_event("file-2", day_31)], now=day_31 + timedelta(minutes=5))
    # ...until the person signs in again.
    again = day_31 + timedelta(hours=1)
    ingest(lake, [event("signin-2", again, actor="u-cat", email="cat@contoso.example")], now=again)
    ingest(lake, [file_event("file-3", again + timedelta(hours=1))], now=again + timedelta(hours=2))
    with lake.read() as conn:
        actors = dict(conn.execute("SELECT event_id, actor_account_id FROM activities").fetchall())
        pairs = conn.execute(
            "SELECT name, account_id, signed_in_on FROM _sign_in_names ORDER BY signed_in_on"
        ).fetchall()
    assert actors == {
        "signin-1": "u-cat",
        "file-1": "u-cat",
        "file-2": None,
        "signin-2": "u-cat",
        "file-3": "u-cat",
    }
    assert pairs == [  # one row per day a sign-in paired them
        ("cat@contoso.example", "u-cat", T0.date()),
        ("cat@contoso.example", "u-cat", again.date()),
    ]


def test_a_sign_in_name_handed_on_names_its_latest_holder(lake: Lake) -> None:
    # Two names, each handed from an old holder to a new one; their pairings stored in both
    # orders and with the new holder's id sorting first and last: nothing but the dates of
    # the sign-ins can pick the new holders both times.
    ann, bob = "ann.h@contoso.example", "bob.h@contoso.example"
    later = T0 + timedelta(days=10)
    ingest(lake, [event("ann-new", later, actor="u-a1", email=ann)], now=later)
    # Old holders' sign-ins, published late, stored after Ann's new holder's...
    ingest(
        lake,
        [
            event("ann-old", T0, actor="u-z1", email=ann),
            event("bob-old", T0, actor="u-a2", email=bob),
        ],
        now=later + timedelta(minutes=1),
    )
    # ...and before Bob's.
    ingest(
        lake, [event("bob-new", later, actor="u-z2", email=bob)], now=later + timedelta(minutes=2)
    )
    file_at = later + timedelta(days=1)
    files = [
        event(
            f"file-{n}",
            file_at,
            actor=None,
            email=e,
            source="Audit.SharePoint",
            action="FileAccessed",
        )
        for n, e in (("ann", ann), ("bob", bob))
    ]
    ingest(lake, files, now=file_at + timedelta(minutes=5))
    with lake.read() as conn:
        actors = dict(
            conn.execute(
                "SELECT event_id, actor_account_id FROM activities WHERE event_id LIKE 'file-%'"
            ).fetchall()
        )
    assert actors == {"file-ann": "u-a1", "file-bob": "u-z2"}


def test_a_sign_in_dated_in_the_future_never_outranks_the_directory(lake: Lake) -> None:
    add_account(lake, "u-dir", "eve@contoso.example", "Eve", "eve@contoso.example")
    # A sign-in the app dated centuries ahead pairs the name with another id.
    ahead = event(
        "far", datetime(2999, 1, 1, tzinfo=UTC), actor="u-odd", email="eve@contoso.example"
    )
    ingest(lake, [ahead], now=T0)
    later = T0 + timedelta(minutes=5)
    ingest(
        lake,
        [event("file", later, actor=None, email="eve@contoso.example", source="Audit.SharePoint")],
        now=later,
    )
    with lake.read() as conn:
        assert conn.execute(
            "SELECT actor_account_id FROM activities WHERE event_id = 'file'"
        ).fetchall() == [("u-dir",)]


def test_external_group_starts_when_created_and_holds_outside_people(
    lake: Lake,
) -> None:
    created = T0
    ingest(lake, [], now=created)  # the first ingest creates the automatic groups
    guest = event(
        "guest",
        T0 + timedelta(minutes=1),
        actor="u-guest",
        email="pat_partner.example#EXT#@contoso.onmicrosoft.com",
    )
    outsider = event(
        "outsider",
        T0 + timedelta(minutes=2),
        actor=None,
        email="Someone@Partner.example",
        source="Audit.SharePoint",
        action="FileAccessed",
        country=None,
    )
    before = event(
        "outsider-before",
        T0 - timedelta(minutes=1),
        actor=None,
        email="someone@partner.example",
        source="Audit.SharePoint",
        action="FileAccessed",
        country=None,
    )
    staff = event("staff", T0 + timedelta(minutes=3))
    result = ingest(
        lake,
        [guest, outsider, before, staff],
        now=T0 + timedelta(hours=1),
        # The directory has no account by that name: an outside person.
        lookup=ActorLookup(absent=frozenset({"someone@partner.example"})),
    )
    assert result.external_joined == 2
    assert tags(lake) == {
        "guest": ["External"],
        "outsider": ["External"],
        "outsider-before": [],  # before the group existed: automatic groups tag from creation
        "staff": [],
    }
    with lake.read() as conn:
        outsider_account = conn.execute(
            "SELECT account_id, is_external FROM accounts "
            "WHERE lower(email) = 'someone@partner.example'"
        ).fetchall()
    assert outsider_account == [("someone@partner.example", True)]


def test_no_verified_domains_means_only_guests_are_external(lake: Lake) -> None:
    ingest(lake, [], now=T0, domains=None)
    result = ingest(
        lake,
        [event("a", T0 + timedelta(minutes=1), email="ann@elsewhere.example")],
        now=T0 + timedelta(hours=1),
        domains=None,
    )
    assert result.external_joined == 0


def test_administrators_group_follows_the_role_holders(lake: Lake) -> None:
    ann = Account(
        "u-ann", "ann@contoso.example", "Ann", "ann@contoso.example", "Member", False, True
    )
    bob = Account(
        "u-bob", "bob@contoso.example", "Bob", "bob@contoso.example", "Member", False, True
    )
    first = ingest(lake, [], now=T0, admins=[ann, bob])
    assert (first.admins_joined, first.admins_left) == (2, 0)
    later = T0 + timedelta(hours=1)
    second = ingest(
        lake,
        [event("ann-abroad", later + timedelta(minutes=1), country="NG")],
        now=later + timedelta(minutes=5),
        admins=[ann],
    )
    assert (second.admins_joined, second.admins_left) == (0, 1)
    # Not read (e.g. a missing permission): the group is left as it was.
    third = ingest(lake, [], now=later + timedelta(hours=1), admins=None)
    assert (third.admins_joined, third.admins_left) == (0, 0)
    with lake.read() as conn:
        members = conn.execute(
            "SELECT account_id, valid_to IS NULL FROM group_memberships "
            "WHERE group_id = 'contoso:auto:admins' ORDER BY 1"
        ).fetchall()
        count = conn.execute(
            "SELECT member_count FROM user_groups WHERE group_id = 'contoso:auto:admins'"
        ).fetchall()
    assert members == [("u-ann", True), ("u-bob", False)]
    assert count == [(1,)]
    assert tags(lake) == {"ann-abroad": ["Office 365 administrators"]}


def test_a_failed_merge_stores_nothing(lake: Lake) -> None:
    ingest(lake, [event("kept", T0)], now=T0 + timedelta(minutes=5))
    staging = ActivityStaging(lake.staging_path())
    staging.add([event("lost", T0 + timedelta(minutes=1))])
    with pytest.raises(RuntimeError, match="crash"), lake.write() as conn:
        merge_activities(
            conn,
            connection=CONTOSO,
            staging=staging,
            reads=[SourceRead("signIns", T0 + timedelta(hours=1), 1)],
            verified_domains=DOMAINS,
            admins=None,
            now=T0 + timedelta(hours=1),
        )
        raise RuntimeError("crash after the merge, before the commit")
    staging.remove()
    with lake.read() as conn:
        stored = conn.execute("SELECT event_id FROM activities").fetchall()
        state = conn.execute(
            "SELECT read_until FROM activity_sources_state WHERE source = 'signIns'"
        ).fetchall()
    assert stored == [("kept",)]
    assert state == [(T0 + timedelta(minutes=5),)]


def test_file_events_take_the_place_of_a_sign_in_from_the_same_address(
    lake: Lake,
) -> None:
    def located(event_id: str, at: datetime, ip: str, source: str = "Audit.SharePoint"):
        return event(event_id, at, source=source, action="FileAccessed", country=None)._replace(
            ip_address=ip
        )

    lagos = event("signin-ng", T0, country="NG")._replace(ip_address="198.51.100.7", city="Lagos")
    ingest(lake, [lagos], now=T0 + timedelta(minutes=5))
    ingest(
        lake,
        [
            located("same-ip", T0 + timedelta(hours=2), "198.51.100.7"),
            located("other-ip", T0 + timedelta(hours=2), "192.0.2.1"),
            located("too-late", T0 + timedelta(hours=25), "198.51.100.7"),
            located("before-sign-in", T0 - timedelta(minutes=1), "198.51.100.7"),
        ],
        now=T0 + timedelta(hours=26),
    )
    with lake.read() as conn:
        places = {
            event_id: (country, city)
            for event_id, country, city in conn.execute(
                "SELECT event_id, country, city FROM activities WHERE source <> 'signIns'"
            ).fetchall()
        }
    assert places == {
        "same-ip": ("NG", "Lagos"),
        "other-ip": (None, None),
        "too-late": (None, None),  # the sign-in is more than 24 hours older
        "before-sign-in": (None, None),  # a place is only lent forward in time
    }


def test_an_id_repeated_across_management_content_types_is_stored_once(
    lake: Lake,
) -> None:
    record = event("rec-1", T0, source="Audit.SharePoint", action="FileAccessed")
    again = record._replace(source="Audit.General")
    first = ingest(lake, [record, again], now=T0 + timedelta(minutes=5))
    later = ingest(lake, [again], now=T0 + timedelta(minutes=10))
    # Graph's logs are separate id spaces: the same id in two of them is two events.
    graph = ingest(
        lake,
        [event("g-1", T0), event("g-1", T0, source="directoryAudits", action="Update user")],
        now=T0 + timedelta(minutes=15),
    )
    assert (first.new, later.new, graph.new) == (1, 0, 2)


def test_apps_and_the_system_are_never_external_but_sharing_links_are(
    lake: Lake,
) -> None:
    ingest(lake, [], now=T0)

    def file_event(event_id: str, email: str, actor_type: str) -> Activity:
        return event(
            event_id,
            T0 + timedelta(minutes=1),
            actor=None,
            email=email,
            source="Audit.SharePoint",
            action="FileAccessed",
        )._replace(actor_type=actor_type)

    result = ingest(
        lake,
        [
            file_event("system", "app@sharepoint", "system"),
            file_event("application", "robot@vendor.example", "application"),
            file_event("link", "urn:spo:anon#4f1c9a", "anonymous"),
        ],
        now=T0 + timedelta(hours=1),
    )
    assert result.external_joined == 1
    assert tags(lake) == {"system": [], "application": [], "link": ["External"]}


def test_a_sparse_admin_listing_keeps_what_a_full_read_stored(lake: Lake) -> None:
    add_account(lake, "u-ann", "ann@contoso.example", "Ann", "ann@contoso.example", enabled=False)
    # Role listings carry no userType or accountEnabled.
    sparse = Account(
        "u-ann", "ann@contoso.example", "Ann", "ann@contoso.example", None, False, None
    )
    ingest(lake, [], now=T0 + timedelta(minutes=5), admins=[sparse])
    with lake.read() as conn:
        stored = conn.execute(
            "SELECT user_type, enabled, is_external FROM accounts WHERE account_id = 'u-ann'"
        ).fetchall()
    assert stored == [("Member", False, False)]


# --- who acted: directory accounts before anything made up ----------------------------------

GUEST_UPN = "Pat_partner.example#EXT#@contoso.onmicrosoft.com"
GUEST = Account("u-pat", "pat@partner.example", "Pat", GUEST_UPN, "Guest", True, True)
QUIET = Account(
    "u-quinn", "quinn@contoso.example", "Quinn", "quinn@contoso.example", "Member", False, True
)


def test_a_guest_named_by_a_lower_case_upn_is_their_directory_account(
    lake: Lake,
) -> None:
    ingest(lake, [], now=T0)
    first = file_event("file-1", T0 + timedelta(minutes=1), GUEST_UPN.lower())
    quiet = file_event("quiet-1", T0 + timedelta(minutes=2), "Quinn@Contoso.example")
    result = ingest(
        lake,
        [first, quiet],
        now=T0 + timedelta(hours=1),
        lookup=ActorLookup(accounts=(GUEST, QUIET), asked=2),
    )
    assert result.resolved_actors == 2 and result.unresolved_actors == 0
    # Later events find them stored (no lookup), and the guest's sign-in is the same person.
    later = T0 + timedelta(hours=2)
    signin = event("signin-1", later, actor="u-pat", email=GUEST_UPN)
    again = file_event("file-2", later + timedelta(minutes=1), GUEST_UPN.lower())
    ingest(lake, [signin, again], now=later + timedelta(minutes=5))
    assert actors(lake) == {
        "file-1": "u-pat",
        "quiet-1": "u-quinn",
        "signin-1": "u-pat",
        "file-2": "u-pat",
    }
    assert external_members(lake) == ["u-pat"]  # once, by the directory id
    assert set(accounts(lake)) == {"u-pat", "u-quinn"}  # no account keyed by a name
    assert accounts(lake)["u-pat"] == ("pat@partner.example", "Guest", True)
    assert tags(lake) == {
        "file-1": ["External"],
        "file-2": ["External"],
        "quiet-1": [],
        "signin-1": ["External"],
    }


def test_a_name_that_could_not_be_looked_up_gets_no_made_up_account(
    lake: Lake,
) -> None:
    ingest(lake, [], now=T0)
    guest = file_event("guest", T0 + timedelta(minutes=1), GUEST_UPN.lower())
    outsider = file_event("outsider", T0 + timedelta(minutes=2), "someone@partner.example")
    # None: the directory could not be asked at all (or failed on these names).
    result = ingest(lake, [guest, outsider], now=T0 + timedelta(hours=1), lookup=None)
    assert result.unresolved_actors == 2 and result.external_joined == 0
    assert actors(lake) == {"guest": None, "outsider": None}
    assert accounts(lake) == {} and external_members(lake) == []


def test_services_and_the_system_are_never_looked_up_or_made_people(
    lake: Lake,
) -> None:
    ingest(lake, [], now=T0)
    events = [
        file_event("crawler", T0 + timedelta(minutes=1), "app@sharepoint", "application"),
        file_event("system", T0 + timedelta(minutes=2), "SHAREPOINT\\system", "system"),
        # Even told that the directory has no such name.
    ]
    result = ingest(
        lake,
        events,
        now=T0 + timedelta(hours=1),
        lookup=ActorLookup(absent=frozenset({"app@sharepoint", "sharepoint\\system"})),
    )
    assert result.external_joined == 0 and result.unresolved_actors == 0
    assert actors(lake) == {"crawler": None, "system": None}
    assert accounts(lake) == {}


def test_a_guest_account_made_up_by_an_older_release_gives_way_to_the_directory(
    lake: Lake,
) -> None:
    ingest(lake, [], now=T0)
    # An older release made an account keyed by the guest's sign-in name.
    with lake.write() as conn:
        conn.execute(
            "INSERT INTO accounts VALUES ('contoso', ?, ?, NULL, NULL, 'External', true, NULL, "
            "?, ?)",
            [GUEST_UPN.lower(), GUEST_UPN.lower(), T0, T0],
        )
    with lake.read() as conn:
        unknown = unknown_actor_names(
            conn, "contoso", [GUEST_UPN.lower(), "quinn@contoso.example"], T0
        )
    assert sorted(unknown) == [GUEST_UPN.lower(), "quinn@contoso.example"]
    ingest(
        lake,
        [file_event("file", T0 + timedelta(minutes=1), GUEST_UPN.lower())],
        now=T0 + timedelta(hours=1),
        lookup=ActorLookup(accounts=(GUEST,), asked=1),
    )
    assert actors(lake) == {"file": "u-pat"}


def test_a_repeat_the_dedupe_misses_fails_the_merge_loudly(lake: Lake) -> None:
    stored = file_event("rec-1", T0, "ann@contoso.example")
    ingest(lake, [stored], now=T0 + timedelta(minutes=5))
    # The same record again, with another time: the dedupe (which expects a repeat to carry
    # its time) lets it through; the key check refuses to store it twice.
    shifted = stored._replace(occurred_at=T0 + timedelta(hours=1), source="Audit.General")
    with pytest.raises(DuplicateActivityError, match="rec-1"):
        ingest(lake, [shifted], now=T0 + timedelta(hours=2))
    with lake.read() as conn:
        assert conn.execute("SELECT event_id, source FROM activities").fetchall() == [
            ("rec-1", "Audit.SharePoint")
        ]
