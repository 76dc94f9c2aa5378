"""Deterministic synthetic Entra ID organisation for the Graph sandbox.

Everything derives from ``random.Random(seed)``: the same seed gives the same ids and data on
every machine and Python version (only ``getrandbits``/``random``/``choice``/``choices``/
``sample`` are used, whose output is stable for a given seed).

The tenant can also change over time: mutation methods on :class:`Organisation` bump
``version`` and append :class:`Change` records, from which :meth:`Organisation.net_changes`
computes what Graph's ``/groups/delta`` reports; :meth:`Organisation.evolve` applies
deterministic pseudo-random steps (step ``k`` depends only on ``(seed, k)`` and the state left by
steps ``1..k-1``), so two processes evolving the same seed to the same step agree exactly.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import hashlib
import random
import threading
import unicodedata
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

# The sandbox is a fake tenant: these identifiers are public by design.
SANDBOX_TENANT_ID = "5f1c2a7e-3b9d-4c8e-9a61-7d2e4b0c8f13"
DEFAULT_DOMAIN = "contoso-sandbox.example"
INITIAL_DOMAIN = "contososandbox.onmicrosoft.com"
GUEST_DOMAINS = ("fabrikam.example", "northwind.example", "adatum.example")

ODATA_DEVICE = "#microsoft.graph.device"
ODATA_SERVICE_PRINCIPAL = "#microsoft.graph.servicePrincipal"
ODATA_ORG_CONTACT = "#microsoft.graph.orgContact"

# department (user attribute) -> display name of its department group
DEPARTMENT_GROUPS: dict[str, str] = {
    "HR": "HR",
    "Finance": "Finance",
    "Executives": "Executives",
    "Engineering": "Engineering",
    "IT": "IT admins",
    "Sales": "Sales",
    "Legal": "Legal",
    "Marketing": "Marketing",
    "Support": "Support",
    "Security": "Security",
}
_DEPARTMENT_WEIGHTS = {
    "HR": 4,
    "Finance": 6,
    "Executives": 0.25,
    "Engineering": 30,
    "IT": 2,
    "Sales": 18,
    "Legal": 3,
    "Marketing": 8,
    "Support": 14,
    "Security": 4,
}
_UNIFIED_DEPARTMENTS = {"Executives", "Engineering", "Sales", "Marketing", "Support"}

HOSTILE_GROUP_NAME = 'Ops "Night" O\'Brien & <Co> — ünïcødé 🚀'

_FIRST = [
    "Ada",
    "Alan",
    "Amara",
    "Ana",
    "Ben",
    "Bianca",
    "Carlos",
    "Chen",
    "Chloe",
    "Dario",
    "Dev",
    "Elif",
    "Emma",
    "Farah",
    "Felix",
    "Grace",
    "Hana",
    "Hugo",
    "Ines",
    "Ivan",
    "Jana",
    "José",
    "Kai",
    "Karin",
    "Leo",
    "Lina",
    "Łukasz",
    "Maya",
    "Mateo",
    "Nadia",
    "Noah",
    "Olga",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Siobhán",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yara",
    "Yusuf",
    "Zoë",
]
_LAST = [
    "Adams",
    "Baker",
    "Chen",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "García",
    "Gupta",
    "Haddad",
    "Ito",
    "Jansen",
    "Kim",
    "Kowalski",
    "Larsen",
    "Lopez",
    "Mbeki",
    "Müller",
    "Nakamura",
    "Nguyễn",
    "Novak",
    "O'Brien",
    "Okafor",
    "Patel",
    "Quispe",
    "Rossi",
    "Santos",
    "Schmidt",
    "Silva",
    "Singh",
    "Smith",
    "Tanaka",
    "Torres",
    "Usman",
    "Varga",
    "Walsh",
    "Wang",
    "Xu",
    "Yilmaz",
    "Zhang",
]
_JOB_TITLES = {
    "HR": ("HR Partner", "Recruiter"),
    "Finance": ("Accountant", "Financial Analyst"),
    "Executives": ("Chief Officer", "Vice President"),
    "Engineering": ("Software Engineer", "Engineering Manager", "SRE"),
    "IT": ("IT Administrator", "Helpdesk Lead"),
    "Sales": ("Account Executive", "Sales Manager"),
    "Legal": ("Counsel", "Paralegal"),
    "Marketing": ("Marketing Manager", "Content Writer"),
    "Support": ("Support Engineer", "Support Lead"),
    "Security": ("Security Analyst", "CISO Office"),
}
_OFFICES = ("London", "Paris", "Berlin", "Seattle", "Singapore", None)
_PROJECTS = [
    "Apollo",
    "Borealis",
    "Cobalt",
    "Delta",
    "Ember",
    "Falcon",
    "Granite",
    "Helios",
    "Iris",
    "Juniper",
    "Kestrel",
    "Lumen",
    "Monsoon",
    "Nimbus",
    "Orion",
]
_EPOCH = dt.datetime(2019, 1, 1, tzinfo=dt.UTC)
# Step k of evolution is nominally EVOLVE_EPOCH + k hours (its objects' createdDateTime); the
# Graph sandbox's time-driven evolution counts steps from this instant too.
EVOLVE_EPOCH = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
# Codenames for project groups that evolution creates (suffixed with the step: unique names).
_NEW_PROJECTS = [
    "Aurora",
    "Basalt",
    "Cirrus",
    "Dynamo",
    "Equinox",
    "Fjord",
    "Glacier",
    "Harbor",
    "Indigo",
    "Jetstream",
    "Keystone",
    "Lighthouse",
    "Meridian",
    "Nova",
    "Onyx",
    "Pulsar",
    "Quartz",
    "Redwood",
    "Sequoia",
    "Tundra",
]

# Change kinds recorded in Organisation.changes.
MEMBER_ADDED = "member_added"
MEMBER_REMOVED = "member_removed"
MEMBER_DELETED = "member_deleted"  # removed because the member (a user) was deleted
GROUP_CREATED = "group_created"
GROUP_DELETED = "group_deleted"
GROUP_RENAMED = "group_renamed"
USER_CREATED = "user_created"
USER_DELETED = "user_deleted"
_MEMBER_KINDS = frozenset({MEMBER_ADDED, MEMBER_REMOVED, MEMBER_DELETED})


@dataclass(frozen=True, slots=True)
class User:
    id: str
    display_name: str
    mail: str | None
    user_principal_name: str
    user_type: str  # "Member" | "Guest"
    account_enabled: bool
    department: str | None
    external_user_state: str | None  # None for members; "Accepted"/"PendingAcceptance" guests
    given_name: str | None = None
    surname: str | None = None
    job_title: str | None = None
    office_location: str | None = None
    created_date_time: str | None = None


@dataclass(frozen=True, slots=True)
class OtherObject:
    """A non-user directory object that can be a group member."""

    id: str
    odata_type: str  # ODATA_DEVICE | ODATA_SERVICE_PRINCIPAL | ODATA_ORG_CONTACT
    display_name: str
    # Type-specific Graph properties (deviceId, operatingSystem, appId, mail, ...).
    properties: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class Group:
    id: str
    display_name: str
    description: str | None
    mail: str | None
    mail_nickname: str
    group_types: list[str]  # ["Unified"] for Microsoft 365 groups, [] for security groups
    security_enabled: bool
    mail_enabled: bool
    created_date_time: str  # ISO "2021-03-04T05:06:07Z"
    members: list[str]  # DIRECT member ids: users, nested groups, other objects
    visibility: str | None = None


# Built-in Entra role templates (ids as published in "Microsoft Entra built-in roles").
GLOBAL_ADMIN_TEMPLATE = "62e90394-69f5-4237-9190-012177145e10"
ROLE_TEMPLATES: dict[str, tuple[str, str, bool]] = {
    # template id -> (displayName, description, grants administrative rights)
    GLOBAL_ADMIN_TEMPLATE: (
        "Global Administrator",
        "Can manage all aspects of Microsoft Entra ID and Microsoft services that use "
        "Microsoft Entra identities.",
        True,
    ),
    "29232cdf-9323-42fd-ade2-1d097af3e4de": (
        "Exchange Administrator",
        "Can manage all aspects of the Exchange product.",
        True,
    ),
    "f28a1f50-f6e7-4571-818b-6a12f2af6b6c": (
        "SharePoint Administrator",
        "Can manage all aspects of the SharePoint service.",
        True,
    ),
    "fe930be7-5e62-47db-91af-98c3a49a38b1": (
        "User Administrator",
        "Can manage all aspects of users and groups, including resetting passwords for "
        "limited admins.",
        True,
    ),
    "729827e3-9c14-49f7-bb1b-9608f156bbb8": (
        "Helpdesk Administrator",
        "Can reset passwords for non-administrators and Helpdesk Administrators.",
        True,
    ),
    "4a5d8f65-41da-4de4-8968-e035b65339cf": (
        "Reports Reader",
        "Can read sign-in and audit reports.",
        False,
    ),
    "88d8e3e3-8f55-4a1e-953a-9b9898b8876b": (
        "Directory Readers",
        "Can read basic directory information. Commonly used to grant directory read access "
        "to applications and guests.",
        False,
    ),
}
# The role-assignable group that holds Helpdesk Administrator (its users are admins too).
ROLE_ASSIGNABLE_GROUP = "IT admins"


@dataclass
class DirectoryRole:
    """An activated directory role (``GET /directoryRoles``) and its direct members."""

    id: str  # object id of the activated role (not the template id)
    role_template_id: str
    display_name: str
    description: str
    is_admin: bool  # False for read-only roles such as Reports Reader
    members: list[str]  # user, role-assignable group and service principal ids


class Change(NamedTuple):
    """One logged mutation; all records of one mutation share its ``version``."""

    version: int
    kind: str  # MEMBER_ADDED, MEMBER_REMOVED, MEMBER_DELETED, GROUP_*, USER_*
    group_id: str | None
    member_id: str | None


@dataclass
class NetChanges:
    """What changed between two versions, netted out (add then remove = nothing)."""

    created: list[str] = field(default_factory=list)  # created in the range, not deleted in it
    deleted: list[str] = field(default_factory=list)  # existed before the range, deleted in it
    renamed: list[str] = field(default_factory=list)
    # group id -> [(member id, removed, removed because the member user was deleted)]. For a
    # created group: every current member, plus removals of members it had meanwhile (a
    # client that saw the group mid-way must drop them; one that did not, ignores them).
    members: dict[str, list[tuple[str, bool, bool]]] = field(default_factory=dict)


class _Scan(NamedTuple):
    first: dict[tuple[str, str], str]
    last: dict[tuple[str, str], str]
    created: dict[str, None]
    deleted: dict[str, None]
    renamed: dict[str, None]


@dataclass
class Snapshot:
    """Groups as of one version (see :meth:`Organisation.snapshot`)."""

    version: int
    groups: list[Group]  # those existing at ``version``, in creation order
    _undo: dict[str, tuple[set[str], set[str]]] = field(repr=False)  # gid -> (added, removed)
    _org: Organisation = field(repr=False)

    def members(self, group_id: str) -> list[str]:
        """Direct member ids at ``version``, sorted."""
        org = self._org
        undo = self._undo.get(group_id)
        if undo is None:  # untouched since: today's list (cached while nothing changes)
            if group_id in org.groups:
                return org.sorted_members(group_id)
            return sorted(org.find_group(group_id).members)
        added, removed = undo
        return sorted((set(org.find_group(group_id).members) - added) | removed)


@dataclass
class Organisation:
    tenant_id: str
    default_domain: str
    domains: list[dict[str, Any]]
    users: dict[str, User]
    groups: dict[str, Group]
    others: dict[str, OtherObject]
    initial_domain: str = INITIAL_DOMAIN
    seed: int = 7
    version: int = 0  # bumped by every mutation
    steps_applied: int = 0  # evolution steps applied so far
    changes: list[Change] = field(default_factory=list, repr=False)
    deleted_groups: dict[str, Group] = field(default_factory=dict, repr=False)
    deleted_users: dict[str, User] = field(default_factory=dict, repr=False)
    evolved_groups: list[str] = field(default_factory=list, repr=False)  # created by evolve()
    roles: list[DirectoryRole] = field(default_factory=list, repr=False)  # activated roles
    # One lock for mutations and for readers that need a consistent view (threaded server).
    lock: AbstractContextManager[Any] = field(
        default_factory=threading.RLock, repr=False, compare=False
    )
    _transitive: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _transitive_users: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _by_name: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Caches that mutations keep up to date incrementally (rebuilt after invalidate_cache).
    _member_sets: dict[str, set[str]] = field(default_factory=dict, repr=False, compare=False)
    _user_ids: list[str] | None = field(default=None, repr=False, compare=False)
    _sorted_members: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    # Stable position of every group ever seen (deleted ones keep theirs): delta paging order.
    _ordinals: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    # Users by case-folded sign-in name and mail, and the (version, user count) it was built at.
    _by_sign_in: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _by_sign_in_at: tuple[int, int] = field(default=(-1, -1), repr=False, compare=False)

    def __post_init__(self) -> None:
        for gid in self.groups:
            self._ordinals.setdefault(gid, len(self._ordinals))

    def group_by_name(self, name: str) -> Group:
        """The group with exactly this display name (KeyError if none)."""
        gid = self._by_name.get(name)
        if gid is None or gid not in self.groups or self.groups[gid].display_name != name:
            # Index missing or stale (groups were edited): rebuild it.
            self._by_name = {g.display_name: g.id for g in self.groups.values()}
            gid = self._by_name[name]
        return self.groups[gid]

    def users_named(self, name: str) -> list[str]:
        """Ids of the users whose sign-in name or mail is ``name``, compared case-folded (as
        directory eq compares them); the index is rebuilt whenever the directory changed."""
        with self.lock:
            at = (self.version, len(self.users))
            if self._by_sign_in_at != at:
                index: dict[str, list[str]] = {}
                for user in self.users.values():
                    for key in {user.user_principal_name.casefold(), (user.mail or "").casefold()}:
                        if key:
                            index.setdefault(key, []).append(user.id)
                self._by_sign_in, self._by_sign_in_at = index, at
            return list(self._by_sign_in.get(name.casefold(), []))

    def invalidate_cache(self) -> None:
        """Forget cached transitive memberships; call after editing ``Group.members``."""
        self._transitive.clear()
        self._transitive_users.clear()
        self._by_name.clear()
        self._member_sets.clear()
        self._user_ids = None
        self._sorted_members.clear()

    def transitive_members(self, group_id: str) -> list[str]:
        """All objects reachable through nesting: depth-first, de-duplicated, cycle-safe."""
        cached = self._transitive.get(group_id)
        if cached is not None:
            return cached
        groups = self.groups
        seen: set[str] = {group_id}  # a cycle back to the root must not list the root
        out: list[str] = []
        # Explicit stack of iterators: nesting depth cannot hit the recursion limit.
        stack = [iter(groups[group_id].members)]
        while stack:
            for member in stack[-1]:
                if member in seen:
                    continue
                seen.add(member)
                out.append(member)
                nested = groups.get(member)
                if nested is not None and nested.members:
                    stack.append(iter(nested.members))
                    break
            else:
                stack.pop()
        self._transitive[group_id] = out
        return out

    def transitive_user_ids(self, group_id: str) -> list[str]:
        """Users only, in ``transitive_members`` order."""
        cached = self._transitive_users.get(group_id)
        if cached is None:
            users = self.users
            cached = [m for m in self.transitive_members(group_id) if m in users]
            self._transitive_users[group_id] = cached
        return cached

    def role_assignable_group_ids(self) -> set[str]:
        """Groups that are members of a directory role (isAssignableToRole)."""
        return {m for role in self.roles for m in role.members if m in self.groups}

    def admin_user_ids(self) -> list[str]:
        """Users holding an administrative role, directly or through a role-assignable group."""
        seen: dict[str, None] = {}
        for role in self.roles:
            if not role.is_admin:
                continue
            for member in role.members:
                if member in self.users:
                    seen.setdefault(member)
                elif member in self.groups:
                    seen.update(dict.fromkeys(self.transitive_user_ids(member)))
        return list(seen)

    def direct_admin_user_ids(self) -> list[str]:
        """Users assigned an administrative role directly (the tenant's named admins)."""
        return list(
            dict.fromkeys(
                m for role in self.roles if role.is_admin for m in role.members if m in self.users
            )
        )

    # -- change over time --------------------------------------------------------------------
    def group_ordinal(self, group_id: str) -> int:
        """Creation position of a (possibly deleted) group: a stable delta paging order."""
        # setdefault: a group a test put straight into ``groups`` goes last.
        return self._ordinals.setdefault(group_id, len(self._ordinals))

    def object_exists(self, object_id: str) -> bool:
        return object_id in self.users or object_id in self.groups or object_id in self.others

    def _members_of(self, group: Group) -> set[str]:
        cached = self._member_sets.get(group.id)
        if cached is None:
            cached = self._member_sets[group.id] = set(group.members)
        return cached

    def sorted_members(self, group_id: str) -> list[str]:
        """Direct member ids sorted (cached until the next change): a stable paging order."""
        cached = self._sorted_members.get(group_id)
        if cached is None:
            cached = self._sorted_members[group_id] = sorted(self.groups[group_id].members)
        return cached

    def user_id_list(self) -> list[str]:
        """User ids in creation order (cached: evolution picks users by index)."""
        if self._user_ids is None:
            self._user_ids = list(self.users)
        return self._user_ids

    def _bump(self, records: list[tuple[str, str | None, str | None]]) -> None:
        # One version per mutation; caches derived from memberships are dropped (the member
        # sets and user list are kept current by the callers).
        self.version += 1
        self.changes.extend(Change(self.version, k, g, m) for k, g, m in records)
        self._transitive.clear()
        self._transitive_users.clear()
        self._by_name.clear()
        self._sorted_members.clear()

    def _derived_id(self, *parts: object) -> str:
        # Deterministic ids for objects created without an rng: same tenant+history, same id.
        digest = hashlib.sha256(":".join(map(str, (self.tenant_id, *parts))).encode()).digest()
        return _uuid4(int.from_bytes(digest[:16], "big"))

    def add_member(self, group_id: str, member_id: str) -> bool:
        """Add a direct member; False (and no version bump) when already a member."""
        with self.lock:
            group = self.groups[group_id]
            if not self.object_exists(member_id) or member_id == group_id:
                raise KeyError(f"no directory object {member_id!r} to add to {group_id!r}")
            members = self._members_of(group)
            if member_id in members:
                return False
            group.members.append(member_id)
            members.add(member_id)
            self._bump([(MEMBER_ADDED, group_id, member_id)])
            return True

    def remove_member(self, group_id: str, member_id: str) -> bool:
        """Remove a direct member; False (and no version bump) when not a member."""
        with self.lock:
            group = self.groups[group_id]
            members = self._members_of(group)
            if member_id not in members:
                return False
            group.members.remove(member_id)
            members.discard(member_id)
            self._bump([(MEMBER_REMOVED, group_id, member_id)])
            return True

    def create_group(
        self,
        display_name: str,
        members: list[str] | tuple[str, ...] = (),
        *,
        unified: bool = False,
        description: str | None = "",
        mail_enabled: bool | None = None,
        visibility: str | None = None,
        created_date_time: str | None = None,
        rng: random.Random | None = None,
    ) -> Group:
        """A new group with these direct members (ids from ``rng`` when given)."""
        with self.lock:
            for member in members:
                if not self.object_exists(member):
                    raise KeyError(f"no directory object {member!r}")
            gid = (
                _uuid4(rng.getrandbits(128))
                if rng is not None
                else self._derived_id("group", self.version, display_name)
            )
            nicknames = {g.mail_nickname for g in self.groups.values()}
            nicknames.update(g.mail_nickname for g in self.deleted_groups.values())
            base = _ascii_slug(display_name, "-") or "group"
            nick, n = base, 1
            while nick in nicknames:  # deterministic suffixes: no rng draws needed
                n += 1
                nick = f"{base}-{n}"
            mail_on = unified if mail_enabled is None else mail_enabled
            group = Group(
                id=gid,
                display_name=display_name,
                description=f"{display_name} group" if description == "" else description,
                mail=f"{nick}@{self.default_domain}" if mail_on else None,
                mail_nickname=nick,
                group_types=["Unified"] if unified else [],
                security_enabled=not unified,
                mail_enabled=mail_on,
                created_date_time=created_date_time or _iso(dt.datetime.now(dt.UTC)),
                members=list(dict.fromkeys(members)),
                visibility=visibility or ("Private" if unified else None),
            )
            self.groups[gid] = group
            self._ordinals[gid] = len(self._ordinals)
            self._member_sets[gid] = set(group.members)
            # Initial members are logged too: delta can then replay the group's whole history.
            added = [(MEMBER_ADDED, gid, m) for m in group.members]
            self._bump([(GROUP_CREATED, gid, None), *added])
            return group

    def delete_group(self, group_id: str) -> Group:
        """Delete a group: gone from listings and from its parents' member lists."""
        with self.lock:
            group = self.groups.pop(group_id)
            self._member_sets.pop(group_id, None)
            self.deleted_groups[group_id] = group
            if group_id in self.evolved_groups:
                self.evolved_groups.remove(group_id)
            records: list[tuple[str, str | None, str | None]] = []
            for parent in self.groups.values():
                members = self._members_of(parent)
                if group_id in members:
                    parent.members.remove(group_id)
                    members.discard(group_id)
                    records.append((MEMBER_REMOVED, parent.id, group_id))
            records.append((GROUP_DELETED, group_id, None))
            self._bump(records)
            return group

    def rename_group(self, group_id: str, new_name: str) -> None:
        with self.lock:
            group = self.groups[group_id]
            if group.display_name == new_name:
                return
            group.display_name = new_name
            self._bump([(GROUP_RENAMED, group_id, None)])

    def create_user(
        self,
        given_name: str,
        surname: str,
        *,
        department: str | None = None,
        user_type: str = "Member",
        mail_local: str | None = None,
        created_date_time: str | None = None,
        rng: random.Random | None = None,
    ) -> User:
        """A new internal (or guest) user; not in any group until added."""
        with self.lock:
            uid = (
                _uuid4(rng.getrandbits(128))
                if rng is not None
                else self._derived_id("user", self.version, given_name, surname)
            )
            local = mail_local or f"{_ascii_slug(given_name)}.{_ascii_slug(surname, '')}.{uid[:4]}"
            upn = f"{local}@{self.default_domain}"
            user = User(
                id=uid,
                display_name=f"{given_name} {surname}",
                mail=upn,
                user_principal_name=upn,
                user_type=user_type,
                account_enabled=True,
                department=department,
                external_user_state=None,
                given_name=given_name,
                surname=surname,
                job_title=_JOB_TITLES[department][0] if department in _JOB_TITLES else None,
                office_location=None,
                created_date_time=created_date_time or _iso(dt.datetime.now(dt.UTC)),
            )
            self.users[uid] = user
            if self._user_ids is not None:
                self._user_ids.append(uid)
            self._bump([(USER_CREATED, None, uid)])
            return user

    def delete_user(self, user_id: str) -> User:
        """Delete a user: removed from every group (logged as MEMBER_DELETED removals)."""
        with self.lock:
            user = self.users.pop(user_id)
            self.deleted_users[user_id] = user
            if self._user_ids is not None:
                self._user_ids.remove(user_id)
            records: list[tuple[str, str | None, str | None]] = []
            for group in self.groups.values():
                members = self._members_of(group)
                if user_id in members:
                    group.members.remove(user_id)
                    members.discard(user_id)
                    records.append((MEMBER_DELETED, group.id, user_id))
            for role in self.roles:  # a deleted user loses its role assignments
                if user_id in role.members:
                    role.members.remove(user_id)
            records.append((USER_DELETED, None, user_id))
            self._bump(records)
            return user

    def _scan(self, since: int, until: int | None) -> _Scan:
        """First and last change per (group, member), and group events, in (since, until]."""
        scan = _Scan({}, {}, {}, {}, {})
        start = bisect.bisect_right(self.changes, since, key=attrgetter("version"))
        for change in self.changes[start:]:
            if until is not None and change.version > until:
                break
            kind, gid = change.kind, change.group_id or ""
            if kind in _MEMBER_KINDS:
                key = (gid, change.member_id or "")
                scan.first.setdefault(key, kind)
                scan.last[key] = kind
            elif kind == GROUP_CREATED:
                scan.created[gid] = None
            elif kind == GROUP_DELETED:
                scan.deleted[gid] = None
            elif kind == GROUP_RENAMED:
                scan.renamed[gid] = None
        return scan

    def find_group(self, group_id: str) -> Group:
        """A group, existing or deleted (KeyError if never seen)."""
        group = self.groups.get(group_id)
        return group if group is not None else self.deleted_groups[group_id]

    def snapshot(self, version: int) -> Snapshot:
        """The groups and their direct members as they were at ``version``.

        Properties (displayName) are today's; memberships are rewound through the change log.
        """
        with self.lock:
            scan = self._scan(version, None)
            groups = [g for g in self.groups.values() if g.id not in scan.created]
            groups += [self.deleted_groups[g] for g in scan.deleted if g not in scan.created]
            groups.sort(key=lambda g: self._ordinals[g.id])
            undo: dict[str, tuple[set[str], set[str]]] = {}
            for (gid, member), kind in scan.first.items():
                added, removed = undo.setdefault(gid, (set(), set()))
                # The first change after ``version`` tells the state at ``version``.
                (added if kind == MEMBER_ADDED else removed).add(member)
            return Snapshot(version, groups, undo, self)

    def net_changes(self, since: int, until: int | None = None) -> NetChanges:
        """Net group changes between versions ``since`` (exclusive) and ``until`` (inclusive)."""
        with self.lock:
            scan = self._scan(since, until)
            first, last = scan.first, scan.last
            created, deleted, renamed = scan.created, scan.deleted, scan.renamed
            net = NetChanges(
                created=[g for g in created if g not in deleted],
                deleted=[g for g in deleted if g not in created],
                renamed=[g for g in renamed if g not in created and g not in deleted],
            )
            for (gid, member), kind in first.items():
                if gid in deleted:
                    continue  # rendered as @removed
                final = last[(gid, member)]
                is_member = final == MEMBER_ADDED
                # A created group lists its whole history; otherwise the first change tells
                # the old state and only a difference counts.
                if gid in created or (kind != MEMBER_ADDED) != is_member:
                    entry = (member, not is_member, final == MEMBER_DELETED)
                    net.members.setdefault(gid, []).append(entry)
            return net

    def evolve(self, steps: int = 1) -> int:
        """Apply ``steps`` deterministic pseudo-random steps; returns ``steps_applied``."""
        with self.lock:
            depts: list[str] = []
            for name in DEPARTMENT_GROUPS.values():
                with contextlib.suppress(KeyError):  # a test may have deleted one
                    depts.append(self.group_by_name(name).id)
            try:
                everyone: str | None = self.group_by_name("All Company").id
            except KeyError:
                everyone = None
            for _ in range(steps):
                self._evolve_step(self.steps_applied + 1, depts, everyone)
            return self.steps_applied

    def evolve_to(self, step: int) -> int:
        """Evolve forward to ``step`` (never backwards); returns ``steps_applied``."""
        with self.lock:
            return self.evolve(max(0, step - self.steps_applied))

    def _evolve_step(self, k: int, depts: list[str], everyone: str | None) -> None:
        rng = random.Random(f"{self.seed}:{k}")  # step k: a pure function of (seed, k)
        rand = rng.random
        when = _iso(EVOLVE_EPOCH + dt.timedelta(hours=k))
        groups, users = self.groups, self.users
        user_ids = self.user_id_list()
        depts = [g for g in depts if g in groups]
        projects = [g.id for g in groups.values() if g.display_name.startswith("Project ")]
        targets = depts + projects or list(groups)
        # A few people join or leave department and project groups.
        for _ in range(1 + int(rand() * 3) if targets else 0):
            gid = targets[int(rand() * len(targets))]
            uid = user_ids[int(rand() * len(user_ids))]
            if users[uid].user_type == "Member":
                self.add_member(gid, uid)
        for _ in range(1 + int(rand() * 3) if targets else 0):
            group = groups[targets[int(rand() * len(targets))]]
            if len(group.members) > 1:  # never empty a group by attrition
                member = group.members[int(rand() * len(group.members))]
                if member in users:
                    self.remove_member(group.id, member)
        if rand() < 0.06:  # a new project with a small team
            team = {user_ids[int(rand() * len(user_ids))] for _ in range(3 + int(rand() * 13))}
            codename = _NEW_PROJECTS[int(rand() * len(_NEW_PROJECTS))]
            created = self.create_group(
                f"Project {codename} {k}",
                [u for u in user_ids if u in team],  # creation order: deterministic
                unified=rand() < 0.5,
                created_date_time=when,
                rng=rng,
            )
            self.evolved_groups.append(created.id)
        # Deletion gets likelier as evolved projects pile up (steady state around a dozen).
        if self.evolved_groups and rand() < min(0.5, 0.005 * len(self.evolved_groups)):
            self.delete_group(self.evolved_groups[int(rand() * len(self.evolved_groups))])
        if self.evolved_groups and rand() < 0.03:
            gid = self.evolved_groups[int(rand() * len(self.evolved_groups))]
            codename = _NEW_PROJECTS[int(rand() * len(_NEW_PROJECTS))]
            self.rename_group(gid, f"Project {codename} {k}")
        if rand() < 0.08 and len(user_ids) > 100:  # someone leaves the company
            self.delete_user(user_ids[int(rand() * len(user_ids))])
        if rand() < 0.08 and depts:  # a new hire joins a department (and All Company)
            first, last = _FIRST[int(rand() * len(_FIRST))], _LAST[int(rand() * len(_LAST))]
            gid = depts[int(rand() * len(depts))]
            dept = next((d for d, n in DEPARTMENT_GROUPS.items() if n == groups[gid].display_name))
            hire = self.create_user(
                first,
                last,
                department=dept,
                mail_local=f"{_FIRST_SLUG[first]}.{_LAST_SLUG[last]}.{k}",
                created_date_time=when,
                rng=rng,
            )
            self.add_member(gid, hire.id)
            if everyone is not None and everyone in groups:
                self.add_member(everyone, hire.id)
        self.steps_applied = k


def _ascii_slug(text: str, sep: str = ".") -> str:
    """Mail-safe local part: strip accents, keep [a-z0-9], join words with ``sep``."""
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    words = "".join(c if c.isalnum() else " " for c in norm.replace("'", "")).split()
    return sep.join(words)


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_FIRST_SLUG = {name: _ascii_slug(name) for name in _FIRST}
_LAST_SLUG = {name: _ascii_slug(name, "") for name in _LAST}
_DAYS = [(_EPOCH + dt.timedelta(days=d)).strftime("%Y-%m-%d") for d in range(1700)]
# RFC 4122 version-4 bit twiddling, as uuid.UUID(version=4) applies it.
_UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID_SET = (0x8000 << 48) | (4 << 76)


def _uuid4(bits: int) -> str:
    """Same value as str(uuid.UUID(int=bits, version=4)), 3x faster."""
    h = f"{(bits & _UUID_CLEAR) | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def build_organisation(
    seed: int = 7,
    users: int = 6000,
    big_group_members: int = 5200,
    extra_groups: dict[str, int] | None = None,
) -> Organisation:
    """Build the synthetic organisation (40 groups + ``extra_groups``)."""
    if users < big_group_members + 50:
        raise ValueError("users must exceed big_group_members by at least 50")
    rng = random.Random(seed)

    getrandbits = rng.getrandbits

    def new_id() -> str:
        return _uuid4(getrandbits(128))

    # --- users -----------------------------------------------------------------------------
    n = users
    guest_count = max(3, round(n * 0.03))
    special = rng.sample(range(n), guest_count + 5)
    guest_idx = set(special[:guest_count])
    external_member_idx = set(special[guest_count:])  # Member + #EXT# UPN
    departments = rng.choices(
        list(_DEPARTMENT_WEIGHTS), weights=list(_DEPARTMENT_WEIGHTS.values()), k=n
    )
    taken: dict[str, int] = {}
    user_list: list[User] = []
    rand = rng.random
    choice = rng.choice
    n_first, n_last, n_days = len(_FIRST), len(_LAST), len(_DAYS)
    for i in range(n):
        # int(rand() * len) instead of choice(): the hot loop runs 100k times in benchmarks.
        first, last = _FIRST[int(rand() * n_first)], _LAST[int(rand() * n_last)]
        base = f"{_FIRST_SLUG[first]}.{_LAST_SLUG[last]}"
        k = taken.get(base, 0)
        taken[base] = k + 1
        local = base if k == 0 else f"{base}{k}"
        dept = departments[i]
        secs = int(rand() * 86_400)
        created = (
            f"{_DAYS[int(rand() * n_days)]}T{secs // 3600:02d}:{secs // 60 % 60:02d}:"
            f"{secs % 60:02d}Z"
        )
        if i in guest_idx or i in external_member_idx:
            home = choice(GUEST_DOMAINS)
            mail: str | None = f"{local}@{home}"
            upn = f"{local}_{home}#EXT#@{INITIAL_DOMAIN}"
            is_guest = i in guest_idx
            user_type = "Guest" if is_guest else "Member"
            # B2B invitees carry an invitation state whatever their userType.
            state: str | None = "PendingAcceptance" if rand() < 0.2 else "Accepted"
        else:
            upn = f"{local}@{DEFAULT_DOMAIN}"
            mail = None if rand() < 0.02 else upn  # unlicensed accounts have no mailbox
            user_type, state = "Member", None
        user_list.append(
            User(
                id=new_id(),
                display_name=f"{first} {last}",
                mail=mail,
                user_principal_name=upn,
                user_type=user_type,
                account_enabled=rand() >= 0.03,
                department=dept,
                external_user_state=state,
                given_name=first,
                surname=last,
                job_title=_JOB_TITLES[dept][int(rand() * 2)],
                office_location=_OFFICES[int(rand() * len(_OFFICES))],
                created_date_time=created,
            )
        )
    user_map = {u.id: u for u in user_list}
    ids = [u.id for u in user_list]
    by_dept: dict[str, list[str]] = {d: [] for d in DEPARTMENT_GROUPS}
    for u in user_list:
        by_dept[u.department or ""].append(u.id)
    for d in by_dept:  # tiny orgs: never leave a department group without a member
        if not by_dept[d]:
            by_dept[d].append(ids[rng.randrange(n)])
    member_ids = [
        u.id for u in user_list if u.user_type == "Member" and "#EXT#" not in u.user_principal_name
    ]
    guest_ids = [u.id for u in user_list if u.user_type == "Guest"]
    external_member_ids = [
        u.id for u in user_list if u.user_type == "Member" and "#EXT#" in u.user_principal_name
    ]
    disabled_ids = [u.id for u in user_list if not u.account_enabled]
    order = {uid: i for i, uid in enumerate(ids)}

    def pick(pool: list[str], k: int) -> list[str]:
        return sorted(rng.sample(pool, min(k, len(pool))), key=order.__getitem__)

    # --- other directory objects ----------------------------------------------------------
    others: dict[str, OtherObject] = {}

    def add_other(odata_type: str, name: str, props: dict[str, Any]) -> str:
        oid = new_id()
        others[oid] = OtherObject(oid, odata_type, name, props)
        return oid

    devices = [
        add_other(
            ODATA_DEVICE,
            f"{prefix}-{rng.getrandbits(24):06X}",
            {"deviceId": new_id(), "operatingSystem": os_name, "accountEnabled": True},
        )
        for prefix, os_name in (
            ("LAPTOP", "Windows"),
            ("LAPTOP", "Windows"),
            ("MBP", "MacMDM"),
            ("IPHONE", "iOS"),
            ("PIXEL", "Android"),
            ("KIOSK", "Windows"),
        )
    ]
    service_principals = [
        add_other(ODATA_SERVICE_PRINCIPAL, name, {"appId": new_id(), "accountEnabled": True})
        for name in ("Backup Service", "HR Sync Connector", "Build Agent", "Ticketing Bot")
    ]
    contacts = [
        add_other(
            ODATA_ORG_CONTACT,
            name,
            {"mail": f"{_ascii_slug(name)}@{domain}", "companyName": company},
        )
        for name, domain, company in (
            ("Alex Vendor", "supplier.example", "Supplier Ltd"),
            ("Brook Auditor", "audit.example", "Audit & Co"),
            ("Casey Counsel", "lawfirm.example", "Law Firm LLP"),
            ("Dana Agency", "agency.example", "Creative Agency"),
        )
    ]

    # --- groups ---------------------------------------------------------------------------
    groups: dict[str, Group] = {}
    nicknames: set[str] = set()

    def add_group(
        name: str,
        members: list[str],
        *,
        unified: bool,
        description: str | None = "",
        mail_enabled: bool | None = None,
    ) -> str:
        gid = new_id()
        nick = _ascii_slug(name, "-") or "group"
        while nick in nicknames:
            nick = f"{nick}-{rng.getrandbits(16):04x}"
        nicknames.add(nick)
        mail_on = unified if mail_enabled is None else mail_enabled
        created = _EPOCH + dt.timedelta(days=len(groups) * 20, seconds=rng.randrange(86_400))
        groups[gid] = Group(
            id=gid,
            display_name=name,
            description=f"{name} group" if description == "" else description,
            mail=f"{nick}@{DEFAULT_DOMAIN}" if mail_on else None,
            mail_nickname=nick,
            group_types=["Unified"] if unified else [],
            security_enabled=not unified,
            mail_enabled=mail_on,
            created_date_time=_iso(created),
            members=list(members),
            visibility=("Public" if rng.random() < 0.7 else "Private") if unified else None,
        )
        return gid

    dept_gid = {
        dept: add_group(gname, by_dept[dept], unified=dept in _UNIFIED_DEPARTMENTS)
        for dept, gname in DEPARTMENT_GROUPS.items()
    }
    # "All Staff": departments nested, plus two users who are also direct members (dedupe).
    all_staff_direct = [by_dept["Engineering"][0], by_dept["Sales"][0]]
    add_group("All Staff", [*dept_gid.values(), *all_staff_direct], unified=False)
    # "Leadership": Executives nested + department heads + one executive again directly.
    heads = [by_dept[d][0] for d in ("Finance", "Engineering", "Sales", "Legal", "Security")]
    add_group(
        "Leadership",
        [dept_gid["Executives"], *heads, by_dept["Executives"][0]],
        unified=False,
        description="Executives and department heads",
    )
    # Internal members first; top up with guests/external members only when short.
    big_pool = member_ids if len(member_ids) >= big_group_members else ids
    add_group(
        "All Company",
        pick(big_pool, big_group_members),
        unified=True,
        description="Everyone at Contoso",
    )
    # Three-level chain: Region EMEA > Country UK > London Office.
    london = add_group("London Office", pick(member_ids, 20), unified=False)
    uk = add_group("Country UK", [london, *pick(member_ids, 6)], unified=False)
    add_group("Region EMEA", [uk, *pick(member_ids, 4)], unified=False)
    add_group(
        "Managed Devices",
        [*devices, by_dept["IT"][0]],
        unified=False,
        description="Intune-managed endpoints",
    )
    add_group("Automation Apps", [*service_principals, *pick(member_ids, 2)], unified=False)
    add_group(
        "External Partners",
        [*contacts, *pick(guest_ids, 10)],
        unified=False,
        mail_enabled=True,
        description=None,
    )
    add_group("Partner Guests", guest_ids, unified=False)
    add_group("Archived Project Zeus", [], unified=True, description="Empty on purpose")
    add_group(
        HOSTILE_GROUP_NAME,
        [*pick(member_ids, 5), guest_ids[0], *disabled_ids[:1]],
        unified=True,
        description="Quotes, <markup>, & unicode on purpose",
    )
    add_group(
        "Mixed Bag",
        [*pick(member_ids, 3), dept_gid["HR"], devices[0], service_principals[0], contacts[0]],
        unified=False,
    )
    add_group("External Members", external_member_ids, unified=False)
    add_group("Disabled Accounts Review", disabled_ids[:25], unified=False, description=None)
    project_ids: list[str] = []
    for i, project in enumerate(_PROJECTS):
        members = pick(member_ids, 5 + rng.randrange(76))
        if project == "Orion":
            members.insert(0, project_ids[-1])  # "Project Orion" nests "Project Nimbus"
        project_ids.append(add_group(f"Project {project}", members, unified=i % 2 == 0))
    for name, count in (extra_groups or {}).items():
        if count > n:
            raise ValueError(f"extra group {name!r} wants {count} members but users={n}")
        # sample() over indices then map: much faster than sampling strings for 100k.
        chosen = sorted(rng.sample(range(n), count))
        add_group(name, [ids[i] for i in chosen], unified=False)

    domains: list[dict[str, Any]] = [
        _domain(DEFAULT_DOMAIN, default=True, initial=False, verified=True),
        _domain(INITIAL_DOMAIN, default=False, initial=True, verified=True),
        _domain("contoso-legacy.example", default=False, initial=False, verified=False),
    ]
    return Organisation(
        tenant_id=SANDBOX_TENANT_ID,
        default_domain=DEFAULT_DOMAIN,
        domains=domains,
        users=user_map,
        groups=groups,
        others=others,
        seed=seed,
        roles=_build_roles(seed, user_map, groups, others, by_dept),
    )


def _build_roles(
    seed: int,
    users: dict[str, User],
    groups: dict[str, Group],
    others: dict[str, OtherObject],
    by_dept: dict[str, list[str]],
) -> list[DirectoryRole]:
    """Activated roles and their holders; a separate rng so the rest of the tenant is as before."""
    rng = random.Random(f"{seed}:roles")
    it_people = sorted(u for u in by_dept["IT"] if users[u].account_enabled)
    security = sorted(u for u in by_dept["Security"] if users[u].account_enabled)
    if not it_people:  # tiny orgs: any enabled member
        it_people = sorted(u for u in users if users[u].user_type == "Member")
    named = rng.sample(it_people, min(6, len(it_people)))
    named += [named[-1]] * (6 - len(named))  # pad (tiny orgs): the same person twice
    helpdesk = next(g.id for g in groups.values() if g.display_name == ROLE_ASSIGNABLE_GROUP)
    apps = {o.display_name: o.id for o in others.values()}
    holders: dict[str, list[str]] = {
        GLOBAL_ADMIN_TEMPLATE: named[0:2],
        "29232cdf-9323-42fd-ade2-1d097af3e4de": [named[2]],
        "f28a1f50-f6e7-4571-818b-6a12f2af6b6c": [named[3]],
        # The HR provisioning app creates and updates users: an app holding an admin role.
        "fe930be7-5e62-47db-91af-98c3a49a38b1": [named[4], named[0], apps["HR Sync Connector"]],
        "729827e3-9c14-49f7-bb1b-9608f156bbb8": [helpdesk, named[5]],
        "4a5d8f65-41da-4de4-8968-e035b65339cf": security[:1] or named[:1],
        "88d8e3e3-8f55-4a1e-953a-9b9898b8876b": [apps["Ticketing Bot"]],
    }
    roles: list[DirectoryRole] = []
    for template, (name, description, is_admin) in ROLE_TEMPLATES.items():
        roles.append(
            DirectoryRole(
                id=_uuid4(rng.getrandbits(128)),
                role_template_id=template,
                display_name=name,
                description=description,
                is_admin=is_admin,
                members=list(dict.fromkeys(holders[template])),
            )
        )
    return roles


def _domain(name: str, *, default: bool, initial: bool, verified: bool) -> dict[str, Any]:
    return {
        "id": name,
        "authenticationType": "Managed",
        "availabilityStatus": None,
        "isAdminManaged": True,
        "isDefault": default,
        "isInitial": initial,
        "isRoot": True,
        "isVerified": verified,
        "passwordNotificationWindowInDays": 14,
        "passwordValidityPeriodInDays": 2147483647,
        "state": None,
        "supportedServices": ["Email", "OfficeCommunicationsOnline"] if verified else [],
    }
