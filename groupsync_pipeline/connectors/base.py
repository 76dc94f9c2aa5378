"""What every connector returns, and the errors it raises. Pure data: no I/O, no Dagster."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol


@dataclass(frozen=True)
class RemoteGroup:
    """A group as it exists in the connected app right now."""

    remote_id: str
    name: str
    description: str | None
    mail: str | None
    kind: str  # e.g. "microsoft365", "security", "mail-enabled security", "distribution"
    member_count: int | None  # people in the group (nested groups flattened); None if unknown


class Account(NamedTuple):
    """A person's account in a connected app (a tuple: cheap by the hundred thousand)."""

    account_id: str
    email: str | None
    display_name: str | None
    user_principal_name: str | None
    user_type: str | None  # the app's own word, e.g. Graph's "Member" / "Guest"
    is_external: bool
    enabled: bool | None


@dataclass(frozen=True)
class UnreadableAccount:
    """A person the app would not give details of (an error other than "no such user")."""

    account_id: str
    reason: str  # status and the app's error code, e.g. "HTTP 400 Request_BadRequest"


@dataclass
class MemberPage:
    """One page of a group's members, as the app listed them: its JSON items, not yet read.

    The connector's ``member_rows_sql`` reads them in DuckDB (people, and what else the page
    held): a 100,000-member import spent 0.9 s in Python turning items into Accounts, and
    held the GIL the page-fetching thread needed (bench/import_members.py).
    """

    items: list[Any]


@dataclass(frozen=True)
class MemberRef:
    """One membership change of a group, as a delta query reports it."""

    member_id: str
    # "user", "group", "device", "servicePrincipal", "orgContact", another short type name, or
    # "unknown" when the app did not say.
    member_type: str


@dataclass
class GroupChange:
    """One group object of a delta page: what changed about the group since the saved state.

    The same group can appear several times, on one page or over several (a large group's
    membership changes are split): apply the changes in the order they come.
    """

    remote_id: str
    # None: this object does not carry the property (unchanged), unless it is in ``cleared``.
    name: str | None
    description: str | None
    mail: str | None
    kind: str | None  # as RemoteGroup.kind, when the object carries the properties it needs
    removed: str | None  # the app's reason ("changed", "deleted", ...): the group is gone
    members_added: list[MemberRef] = field(default_factory=list)
    members_removed: list[MemberRef] = field(default_factory=list)
    # Properties ("description", "mail") the object carries as null: cleared in the app. A
    # delta object carries at least what changed, so absent means unchanged, null means none.
    cleared: frozenset[str] = frozenset()


@dataclass
class DeltaPage:
    """One page of a delta query. Only the final page carries the link for the next sync."""

    changes: list[GroupChange]
    delta_link: str | None  # set only on the final page: save it for the next sync
    invalid_members: int = 0  # member entries without a usable id: counted, not returned


class Activity(NamedTuple):
    """One event from an app's audit log, normalized (a tuple: cheap by the million).

    ``(connection, source, event_id)`` identifies an event: the app may send it again (an
    overlapping window, a retried page) and it is stored once.
    """

    source: str  # the log it came from, e.g. "signIns", "directoryAudits", "Audit.SharePoint"
    event_id: str  # the app's own id for the event
    occurred_at: datetime  # when it happened, timezone-aware UTC
    actor_account_id: str | None  # the app's user id of who acted, when the event gives it
    actor_email: str | None  # who acted: sign-in name or email, as the event gives it
    action: str  # the app's name for what was done, e.g. "FileAccessed", "Sign-in"
    object_name: str | None  # the file or resource acted on
    object_id: str | None  # its id or URL
    ip_address: str | None  # client address, without a port
    country: str | None  # ISO 3166-1 alpha-2, upper case, when the app geolocates the event
    city: str | None
    user_agent: str | None
    success: bool | None  # None when the app does not say
    raw: str  # the event exactly as received, as JSON text
    # What acted: "user", "anonymous" (a sharing link), "application", "system"; None: unknown.
    actor_type: str | None = None


@dataclass(frozen=True)
class ActivitySource:
    """One audit log a connector reads, and how far back the app keeps it."""

    name: str  # Activity.source
    retention: timedelta  # events older than this cannot be read from the app any more


@dataclass
class DirectoryLookup:
    """What the directory said about sign-in names (or email addresses) that audit events
    name their actors by, keyed by the names exactly as they were asked."""

    found: dict[str, Account] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)  # no directory account has that name
    failed: dict[str, str] = field(default_factory=dict)  # not answered this time: why


ProgressCallback = Callable[[int, int], None]  # (pages fetched, members listed so far)

# The columns a connector's member_rows_sql gives, one row per item of its MemberPages.
MEMBER_ROW_COLUMNS = (
    "kind",  # "user" (a person), another member type such as "group", or "invalid"
    *Account._fields,
)


class Connector(Protocol):
    """The small interface every connected app implements."""

    app: str
    # Audit events dropped because they had no id or no readable time (cannot be deduplicated).
    skipped_activities: int

    def group_catalog(self) -> Iterator[RemoteGroup]: ...

    def find_group(self, reference: str) -> RemoteGroup: ...

    # A DuckDB SELECT over member_items(item JSON), the items of this connector's MemberPages
    # in listing order, giving MEMBER_ROW_COLUMNS in the same order (no ORDER BY, no
    # aggregate): how the app's member objects read.
    member_rows_sql: str

    def group_members(self, remote_id: str) -> Iterator[MemberPage]: ...

    def member_count(self, remote_id: str) -> int: ...

    def group_delta(self, delta_link: str | None = None) -> Iterator[DeltaPage]: ...

    def latest_delta_link(self) -> str: ...

    def users_by_id(self, user_ids: Iterable[str]) -> Iterator[Account | UnreadableAccount]:
        """Details of these people; those the app will not give are UnreadableAccounts,
        those no longer in the app are left out."""
        ...

    def administrators(self) -> Iterator[Account]:
        """People who hold an administrator role in the app now (groups expanded)."""
        ...

    def users_by_sign_in_name(self, names: Iterable[str]) -> DirectoryLookup:
        """Directory accounts of actors that audit events name only by sign-in name or email."""
        ...

    def verified_domains(self) -> list[str]:
        """The organisation's own domain names (lower case): other domains are external."""
        ...

    def activity_sources(self) -> list[ActivitySource]: ...

    def activities(self, source: str, start: datetime, end: datetime) -> Iterator[list[Activity]]:
        """The source's events made available in [start, end), a page at a time, any order.

        Both bounds are UTC. Windows longer than the app allows are split by the connector.
        """
        ...

    def close(self) -> None: ...


class ConnectorError(Exception):
    """A connected app could not answer what was asked; the message says what to do."""


class AuthenticationError(ConnectorError):
    """The app refused the credentials (token endpoint error or repeated 401)."""


class PermissionDeniedError(ConnectorError):
    """The credentials work but lack a permission (403)."""


class VendorError(ConnectorError):
    """The app answered with an error, or with something that is not its documented answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when the app answered with one


class DeltaExpiredError(ConnectorError):
    """The app no longer accepts the saved delta state: discard it and do a full resync."""


class GroupNotFoundError(ConnectorError):
    """No group matches the reference; the message lists close matches."""


def close_matches(reference: str, candidates: dict[str, str], limit: int = 5) -> list[str]:
    """Candidates ({label: comparable name}) closest to ``reference``, best first."""
    lowered = {name.casefold(): label for label, name in candidates.items()}
    found = difflib.get_close_matches(reference.casefold(), list(lowered), n=limit, cutoff=0.5)
    contains = [
        label
        for name, label in lowered.items()
        if reference.casefold() in name and label not in {lowered[f] for f in found}
    ]
    return [lowered[name] for name in found] + contains[: max(0, limit - len(found))]
