"""Deterministic synthetic Entra ID organisation for the Graph sandbox.

Everything derives from ``random.Random(seed)``: the same seed gives the same ids and data on
every machine and Python version (only ``getrandbits``/``random``/``choice``/``choices``/
``sample`` are used, whose output is stable for a given seed).
"""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class Organisation:
    tenant_id: str
    default_domain: str
    domains: list[dict[str, Any]]
    users: dict[str, User]
    groups: dict[str, Group]
    others: dict[str, OtherObject]
    initial_domain: str = INITIAL_DOMAIN
    _transitive: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _transitive_users: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    _by_name: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def group_by_name(self, name: str) -> Group:
        """The group with exactly this display name (KeyError if none)."""
        gid = self._by_name.get(name)
        if gid is None or gid not in self.groups or self.groups[gid].display_name != name:
            # Index missing or stale (groups were edited): rebuild it.
            self._by_name = {g.display_name: g.id for g in self.groups.values()}
            gid = self._by_name[name]
        return self.groups[gid]

    def invalidate_cache(self) -> None:
        """Forget cached transitive memberships; call after editing ``Group.members``."""
        self._transitive.clear()
        self._transitive_users.clear()
        self._by_name.clear()

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
        # Same value as str(uuid.UUID(int=getrandbits(128), version=4)), 3x faster.
        h = f"{(getrandbits(128) & _UUID_CLEAR) | _UUID_SET:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

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
    )


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
