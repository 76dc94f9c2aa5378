"""A deterministic synthetic audit stream for the sandbox organisation.

Events are a pure function of (org seed, hour bucket, the seeded population): every process
that starts a sandbox for the same seed sees the same events, with the same ids, at the same
times. The stream feeds Graph ``/auditLogs/signIns`` and ``/auditLogs/directoryAudits`` and the
Office 365 Management Activity API (``management.py``).

Shape of a simulated day (UTC):

* background noise scaled by ``rate`` (events per hour at a weekday peak): sign-ins (mostly
  from the US, some failed), SharePoint/OneDrive file events, Exchange and Teams activity,
  and directory audits by administrators or by the HR provisioning app;
* stories, present whenever ``rate > 0`` and independent of its value:

  - ``hr_documents``: HR department members read HR documents on ``/sites/HR`` at 09, 11,
    14 and 16 h every day;
  - ``admin_abroad``: at hours 1, 5, 9, 13, 17 and 21 (``hour % 4 == 1``) a directory-role
    holder signs in from outside the US (GB, DE, IN, BR or NG) in the first half hour, then
    performs 1-3 directory changes from the same IP;
  - ``external_access``: at hours where ``hour % 3 == 2`` guests (``#EXT#`` users, who also
    sign in) and outside people (plain ``someone@partner.example`` addresses) open shared
    files on ``/sites/ExternalPartners``;
  - ``executive_burst``: once a day, at an hour from :meth:`ActivityStream.burst_hour`, one
    executive downloads dozens of files within 45 minutes;
  - ``service_accounts``: every working hour (8-17 h) SharePoint's search crawler
    (``app@sharepoint``) reads one or two files, and at 3, 9, 15 and 21 h ``SHAREPOINT\\system``
    modifies one; both with ``UserType`` 0, as SharePoint records them;
  - ``quiet_actors``: at 10 and 15 h a guest who never signs in (``pools()["quiet_guests"]``,
    named by a lower-case ``#ext#`` UPN like every guest in file events) and a member who
    never signs in and is in neither HR, Executives nor an administrator role
    (``pools()["quiet_members"]``) each open a file;
  - ``system_actions``: at 3 h Entra ID changes a user by itself: a directory audit whose
    initiating user is the all-zero id.

Events become visible (served by the APIs) a few minutes after they happen; a small
fraction is late (20-50 minutes). Tests inject exact events with ``add_sign_in``,
``add_file_event`` and ``add_directory_audit``, optionally with their own ``visible_at``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from groupsync_pipeline.sandbox.seed import (
    EVOLVE_EPOCH,
    ODATA_SERVICE_PRINCIPAL,
    Organisation,
    User,
)

__all__ = [
    "ActivityEvent",
    "ActivityStream",
    "AUDIT_AAD",
    "AUDIT_EXCHANGE",
    "AUDIT_GENERAL",
    "AUDIT_SHAREPOINT",
    "CONTENT_TYPES",
    "DEFAULT_RATE",
    "DIRECTORY_AUDIT",
    "EXCHANGE",
    "FILE",
    "SIGN_IN",
    "TEAMS",
]

# Events per hour at a weekday peak: ~6,000 people make ~20k sign-ins and far more file,
# mail and chat operations a day; the sandbox keeps a representative slice (generation of
# an hour stays well under 0.3 s).
DEFAULT_RATE = 3000
HOUR = 3600

# Event kinds.
SIGN_IN = "signIn"
DIRECTORY_AUDIT = "directoryAudit"
FILE = "file"
EXCHANGE = "exchange"
TEAMS = "teams"

# Management Activity API content types.
AUDIT_AAD = "Audit.AzureActiveDirectory"
AUDIT_EXCHANGE = "Audit.Exchange"
AUDIT_SHAREPOINT = "Audit.SharePoint"
AUDIT_GENERAL = "Audit.General"
DLP_ALL = "DLP.All"
CONTENT_TYPES = (AUDIT_AAD, AUDIT_EXCHANGE, AUDIT_SHAREPOINT, AUDIT_GENERAL, DLP_ALL)
_CONTENT_TYPE = {
    SIGN_IN: AUDIT_AAD,
    DIRECTORY_AUDIT: AUDIT_AAD,
    FILE: AUDIT_SHAREPOINT,
    EXCHANGE: AUDIT_EXCHANGE,
    TEAMS: AUDIT_GENERAL,
}
_MIX = ((SIGN_IN, 0.32), (FILE, 0.45), (EXCHANGE, 0.12), (TEAMS, 0.1), (DIRECTORY_AUDIT, 0.01))
_MIX_CUMULATIVE = tuple(
    (kind, sum(w for _, w in _MIX[: i + 1])) for i, (kind, _) in enumerate(_MIX)
)

# Stories.
HR_DOCUMENTS = "hr_documents"
ADMIN_ABROAD = "admin_abroad"
EXTERNAL_ACCESS = "external_access"
EXECUTIVE_BURST = "executive_burst"
SERVICE_ACCOUNTS = "service_accounts"
QUIET_ACTORS = "quiet_actors"
SYSTEM_ACTIONS = "system_actions"
QUIET_HOURS = (10, 15)
SYSTEM_HOUR = 3
NIL_ID = "00000000-0000-0000-0000-000000000000"  # Entra ID's "user" for its own actions
# Service identities in SharePoint records: UserId -> UserKey (UserType is 0 for both).
SERVICE_IDENTITIES = {
    "app@sharepoint": "i:0i.t|00000003-0000-0ff1-ce00-000000000000|app@sharepoint",
    "SHAREPOINT\\system": "SHAREPOINT\\system",
}
HR_HOURS = (9, 11, 14, 16)
HR_FILES = (
    "Salary bands 2026.xlsx",
    "Performance reviews Q3.docx",
    "Headcount plan 2027.xlsx",
    "Disciplinary cases log.xlsx",
    "Benefits renewal 2027.pdf",
    "Succession planning.docx",
)
EXEC_FILES = (
    "Board pack {n:02d}.pdf",
    "M&A target {n:02d} valuation.xlsx",
    "Strategy offsite {n:02d}.pptx",
    "Customer contract {n:03d}.pdf",
    "Forecast FY27 v{n}.xlsx",
)
SHARED_FILES = (
    "Joint roadmap 2027.pptx",
    "Partner pricing Q4.xlsx",
    "Integration spec v3.docx",
    "Statement of work.pdf",
)
OUTSIDE_PEOPLE = (
    "someone@partner.example",
    "j.doe@partner.example",
    "procurement@supplier.example",
    "reviewer@audit.example",
)

# (city, state, ISO country, latitude, longitude, IPv4 prefixes)
_PLACES: dict[str, list[tuple[str, str, float, float]]] = {
    "US": [
        ("Seattle", "Washington", 47.6062, -122.3321),
        ("Redmond", "Washington", 47.6740, -122.1215),
        ("New York", "New York", 40.7128, -74.0060),
        ("Austin", "Texas", 30.2672, -97.7431),
        ("Chicago", "Illinois", 41.8781, -87.6298),
        ("San Francisco", "California", 37.7749, -122.4194),
        ("Boston", "Massachusetts", 42.3601, -71.0589),
    ],
    "GB": [("London", "England", 51.5072, -0.1276), ("Manchester", "England", 53.4808, -2.2426)],
    "DE": [("Berlin", "Berlin", 52.5200, 13.4050), ("Munich", "Bayern", 48.1351, 11.5820)],
    "IN": [
        ("Bengaluru", "Karnataka", 12.9716, 77.5946),
        ("Mumbai", "Maharashtra", 19.0760, 72.8777),
    ],
    "BR": [
        ("Sao Paulo", "Sao Paulo", -23.5505, -46.6333),
        ("Rio De Janeiro", "Rio De Janeiro", -22.9068, -43.1729),
    ],
    "NG": [
        ("Lagos", "Lagos", 6.5244, 3.3792),
        ("Abuja", "Federal Capital Territory", 9.0765, 7.3986),
    ],
    "FR": [("Paris", "Ile-De-France", 48.8566, 2.3522)],
    "CA": [("Toronto", "Ontario", 43.6532, -79.3832)],
    "SG": [("Singapore", "Central Singapore", 1.3521, 103.8198)],
}
_IP_PREFIXES = {
    "US": ("20.81", "40.76", "52.168", "104.44", "98.97"),
    "GB": ("81.2", "86.140", "51.140"),
    "DE": ("85.214", "91.64", "87.123"),
    "IN": ("49.36", "103.21", "117.200"),
    "BR": ("177.72", "189.6", "200.150"),
    "NG": ("105.112", "197.210", "102.89"),
    "FR": ("90.84", "82.64"),
    "CA": ("142.112", "99.230"),
    "SG": ("116.86", "203.116"),
}
ABROAD_COUNTRIES = ("GB", "DE", "IN", "BR", "NG")
_OTHER_COUNTRIES = ("GB", "DE", "FR", "CA", "IN", "SG")

# (browser, operatingSystem, User-Agent)
_DEVICES = (
    (
        "Edge 131.0.0",
        "Windows10",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    ),
    (
        "Chrome 131.0.0",
        "Windows10",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
    ),
    (
        "Safari 18.1",
        "MacOs",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
        "Gecko) Version/18.1 Safari/605.1.15",
    ),
    (
        "Mobile Safari 18.1",
        "Ios",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
        "like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    ),
    (
        "Chrome Mobile 131.0.6778",
        "Android",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.6778.81 Mobile Safari/537.36",
    ),
    (
        "Firefox 133.0",
        "Linux",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    ),
)
# (appDisplayName, appId, resourceDisplayName, resourceId, clientAppUsed)
SIGN_IN_APPS = (
    (
        "Office 365 Exchange Online",
        "00000002-0000-0ff1-ce00-000000000000",
        "Office 365 Exchange Online",
        "00000002-0000-0ff1-ce00-000000000000",
        "Browser",
    ),
    (
        "Microsoft Teams",
        "1fec8e78-bce4-4aaf-ab1b-5451cc387264",
        "Microsoft Teams Services",
        "cc15fd57-2c6c-4117-a88c-83b1d56b4bbe",
        "Mobile Apps and Desktop clients",
    ),
    (
        "Office 365 SharePoint Online",
        "00000003-0000-0ff1-ce00-000000000000",
        "Office 365 SharePoint Online",
        "00000003-0000-0ff1-ce00-000000000000",
        "Browser",
    ),
    (
        "Microsoft Office",
        "d3590ed6-52b3-4102-aeff-aad2292ab01c",
        "Microsoft Graph",
        "00000003-0000-0000-c000-000000000000",
        "Mobile Apps and Desktop clients",
    ),
    (
        "OfficeHome",
        "4765445b-32c6-49b0-83e6-1d93765276ca",
        "OfficeHome",
        "4765445b-32c6-49b0-83e6-1d93765276ca",
        "Browser",
    ),
)
ADMIN_SIGN_IN_APPS = (
    (
        "Azure Portal",
        "c44b4083-3bb0-49c1-b47d-974e53cbdf3c",
        "Windows Azure Service Management API",
        "797f4846-ba00-4fd7-ba43-dac1f8f63013",
        "Browser",
    ),
    (
        "Microsoft Entra admin center",
        "0000000c-0000-0000-c000-000000000000",
        "Microsoft Graph",
        "00000003-0000-0000-c000-000000000000",
        "Browser",
    ),
)
# Entra sign-in failures: (errorCode, failureReason)
_FAILURES = (
    (50126, "Error validating credentials due to invalid username or password."),
    (50074, "Strong Authentication is required."),
    (
        50053,
        "The account is locked, you've tried to sign in too many times with an incorrect "
        "user ID or password.",
    ),
    (
        53003,
        "Access has been blocked by Conditional Access policies. The access policy does "
        "not allow token issuance.",
    ),
    (
        50140,
        "This error occurred due to 'Keep me signed in' interrupt when the user was signing in.",
    ),
)
_CA_POLICIES = (
    ("de7e60eb-ed89-4d73-8205-2227def6b7c9", "Require MFA for admins"),
    ("6701123a-b4c6-48af-8565-565c8bf7cabc", "Block legacy authentication"),
)
# (Graph activityDisplayName, category, operationType, needs a group target)
_ADMIN_ACTIVITIES = (
    ("Add member to group", "GroupManagement", "Add", True),
    ("Remove member from group", "GroupManagement", "Delete", True),
    ("Reset user password", "UserManagement", "Update", False),
    ("Update user", "UserManagement", "Update", False),
    ("Disable account", "UserManagement", "Update", False),
    ("Add member to role", "RoleManagement", "Add", False),
)
_APP_ACTIVITIES = (
    ("Update user", "UserManagement", "Update", False),
    ("Add user", "UserManagement", "Add", False),
)
_FILE_OPS = (
    ("FileAccessed", 0.5),
    ("FilePreviewed", 0.15),
    ("FileModified", 0.15),
    ("FileDownloaded", 0.1),
    ("FileUploaded", 0.05),
    ("FileSyncDownloadedFull", 0.03),
    ("FileDeleted", 0.02),
)
_DEPT_SITES = ("Engineering", "Sales", "Marketing", "Support", "Finance", "Legal", "Security")
_DOC_WORDS = ("Roadmap", "Budget", "Notes", "Runbook", "Proposal", "Report", "Plan", "Minutes")
_DOC_EXT = ("docx", "xlsx", "pptx", "pdf", "txt")
_EXCHANGE_OPS = (("MailItemsAccessed", 50, 0.7), ("Send", 2, 0.2), ("MailboxLogin", 2, 0.1))
_TEAMS_OPS = ("MessageSent", "TeamsSessionStarted", "MemberAdded", "ChatCreated", "MessageRead")


def _uuid(bits: int) -> str:
    h = f"{bits:032x}"
    h = h[:12] + "4" + h[13:16] + "89ab"[int(h[16], 16) & 3] + h[17:]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def iso_graph(moment: float) -> str:
    """Graph audit timestamps: 7 fractional digits and Z (``2020-03-13T19:15:41.6195833Z``)."""
    whole = int(moment)
    frac = int(round((moment - whole) * 10_000_000))
    if frac >= 10_000_000:
        whole, frac = whole + 1, 0
    stamp = dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:07d}Z"


def iso_management(moment: float) -> str:
    """Management API ``CreationTime``: UTC without zone or fraction (``2015-06-29T20:03:19``)."""
    return dt.datetime.fromtimestamp(int(moment), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _rhythm(hour_index: int) -> float:
    """Relative activity of an hour (UTC): work hours busiest, nights and weekends quiet."""
    hod = hour_index % 24
    weekday = (hour_index // 24 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    if 8 <= hod < 18:
        level = 1.0
    elif 6 <= hod < 8 or 18 <= hod < 21:
        level = 0.4
    else:
        level = 0.08
    return level * (0.25 if weekday >= 5 else 1.0)


@dataclass(slots=True)
class ActivityEvent:
    """One audited action. ``params`` holds what was decided up front (stories, injections);
    everything else is drawn from ``seed`` when the event is first rendered."""

    kind: str
    at: float  # when it happened (unix seconds)
    visible_at: float  # when the APIs start serving it
    id: str
    seed: int
    story: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    injected: bool = False

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPE[self.kind]


class ActivityStream:
    """Synthetic, deterministic audit events of one organisation, plus injected ones."""

    def __init__(
        self,
        org: Organisation,
        *,
        rate: float = DEFAULT_RATE,
        cache_hours: int = 192,  # a week and a bit: the Management API's 7-day window
    ) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0 events per hour")
        self.org = org
        self.rate = rate
        self.seed = org.seed
        self._cache: OrderedDict[int, list[ActivityEvent]] = OrderedDict()
        self._cache_hours = cache_hours
        self._injected: list[ActivityEvent] = []
        self._lock = threading.RLock()
        self._pools: dict[str, list[str]] | None = None
        self._site_host = org.initial_domain.split(".", 1)[0]

    # -- population --------------------------------------------------------------------------
    def pools(self) -> dict[str, list[str]]:
        """Who acts in the stream: the seeded population (never the evolved hires), sorted by
        id, so evolution or a restart cannot reshuffle who did what in past hours."""
        with self._lock, self.org.lock:  # the org may be evolving in another thread
            if self._pools is not None:
                return self._pools
            org = self.org
            epoch = EVOLVE_EPOCH.strftime("%Y-%m-%dT%H:%M:%SZ")
            everyone = {**org.deleted_users, **org.users}
            seeded = sorted(
                (u for u in everyone.values() if (u.created_date_time or "") < epoch),
                key=lambda u: u.id,
            )
            members = [
                u.id
                for u in seeded
                if u.user_type == "Member" and "#EXT#" not in u.user_principal_name
            ]
            admins = sorted(org.direct_admin_user_ids())
            helpdesk = sorted(
                set(org.admin_user_ids()) - set(admins)
            )  # via the role-assignable group
            guests = [u.id for u in seeded if u.user_type == "Guest"]
            role_holders = set(org.admin_user_ids())
            # Who never signs in: the last guest, and the first enabled member with a mailbox
            # outside HR, Executives and the administrators (the groups tests import).
            quiet_members = [
                u
                for u in members
                if everyone[u].department not in ("HR", "Executives")
                and u not in role_holders
                and everyone[u].mail
                and everyone[u].account_enabled
            ][:1]
            self._pools = {
                "members": members or [u.id for u in seeded],
                "hr": [u for u in members if everyone[u].department == "HR"] or members[:1],
                "executives": [u for u in members if everyone[u].department == "Executives"]
                or members[:1],
                "guests": guests[:-1] or members[:1],
                "quiet_guests": guests[-1:],
                "quiet_members": quiet_members,
                "admins": admins or members[:1],
                "helpdesk": helpdesk or admins or members[:1],
            }
            return self._pools

    def user(self, user_id: str) -> User | None:
        return self.org.users.get(user_id) or self.org.deleted_users.get(user_id)

    def _find_user(self, key: str) -> User | None:
        found = self.user(key)
        if found is not None:
            return found
        lowered = key.lower()
        with self.org.lock:
            candidates = [*self.org.users.values(), *self.org.deleted_users.values()]
        for candidate in candidates:
            if (
                candidate.user_principal_name.lower() == lowered
                or (candidate.mail or "").lower() == lowered
            ):
                return candidate
        return None

    # -- schedule ----------------------------------------------------------------------------
    def burst_hour(self, day_index: int) -> int:
        """Hour of day (UTC) of the executive download burst on day ``day_index`` (unix days)."""
        rng = random.Random(f"{self.seed}:burst:{day_index}")
        return 8 + int(rng.random() * 12)

    def hour(self, hour_index: int) -> list[ActivityEvent]:
        """Synthetic events that happened in hour ``hour_index`` (unix hours), by time."""
        with self._lock:
            cached = self._cache.get(hour_index)
            if cached is not None:
                self._cache.move_to_end(hour_index)
                return cached
        events = self._generate(hour_index) if self.rate > 0 else []
        with self._lock:
            self._cache[hour_index] = events
            while len(self._cache) > self._cache_hours:
                self._cache.popitem(last=False)
        return events

    def _generate(self, h: int) -> list[ActivityEvent]:
        rng = random.Random(f"{self.seed}:activity:{h}")
        rand = rng.random
        base = h * HOUR
        events: list[ActivityEvent] = []
        n = int(self.rate * _rhythm(h) * (0.9 + 0.2 * rand()))

        def add(
            kind: str,
            at: float,
            story: str | None = None,
            _rng: random.Random = rng,
            **params: Any,
        ) -> ActivityEvent:
            event = ActivityEvent(
                kind,
                at,
                at + self._latency(kind, _rng.random),
                _uuid(_rng.getrandbits(128)),
                _rng.getrandbits(64),
                story,
                params,
            )
            events.append(event)
            return event

        for _ in range(n):
            roll = rand()
            kind = next(k for k, edge in _MIX_CUMULATIVE if roll < edge) if roll < 1 else FILE
            add(kind, base + rand() * HOUR)
        pools = self.pools()
        hod, day = h % 24, h // 24
        if hod in HR_HOURS:
            for _ in range(2 + int(rand() * 4)):
                op = (
                    "FileDownloaded"
                    if rand() < 0.2
                    else ("FileAccessed", "FilePreviewed")[int(rand() * 2)]
                )
                add(
                    FILE,
                    base + rand() * HOUR,
                    HR_DOCUMENTS,
                    actor=pools["hr"][int(rand() * len(pools["hr"]))],
                    operation=op,
                    site="HR",
                    file_name=HR_FILES[int(rand() * len(HR_FILES))],
                )
        if hod % 4 == 1:
            admin = pools["admins"][int(rand() * len(pools["admins"]))]
            country = ABROAD_COUNTRIES[int(rand() * len(ABROAD_COUNTRIES))]
            city = _PLACES[country][int(rand() * len(_PLACES[country]))][0]
            ip = self._ip(country, rng)
            at = base + rand() * 1800
            add(
                SIGN_IN,
                at,
                ADMIN_ABROAD,
                user_id=admin,
                country=country,
                city=city,
                ip=ip,
                success=True,
                admin=True,
            )
            for _ in range(1 + int(rand() * 3)):
                at += 60 + rand() * 500
                add(DIRECTORY_AUDIT, at, ADMIN_ABROAD, actor=admin, ip=ip)
        if hod % 3 == 2:
            for _ in range(1 + int(rand() * 2)):
                guest = pools["guests"][int(rand() * len(pools["guests"]))]
                at = base + rand() * 3000
                add(SIGN_IN, at, EXTERNAL_ACCESS, user_id=guest, success=True)
                add(
                    FILE,
                    at + 30 + rand() * 500,
                    EXTERNAL_ACCESS,
                    actor=guest,
                    operation="FileAccessed",
                    site="ExternalPartners",
                    file_name=SHARED_FILES[int(rand() * len(SHARED_FILES))],
                )
            for _ in range(1 + int(rand() * 2)):
                add(
                    FILE,
                    base + rand() * HOUR,
                    EXTERNAL_ACCESS,
                    actor=OUTSIDE_PEOPLE[int(rand() * len(OUTSIDE_PEOPLE))],
                    operation=("FileAccessed", "FilePreviewed")[int(rand() * 2)],
                    site="ExternalPartners",
                    file_name=SHARED_FILES[int(rand() * len(SHARED_FILES))],
                )
        if hod == self.burst_hour(day):
            burst = random.Random(f"{self.seed}:burst-actor:{day}")
            execs = pools["executives"]
            actor = execs[int(burst.random() * len(execs))]
            start = base + burst.random() * 600
            ip = self._ip("US", burst)
            for i in range(30 + int(burst.random() * 31)):
                add(
                    FILE,
                    start + burst.random() * 2700,
                    EXECUTIVE_BURST,
                    actor=actor,
                    operation="FileDownloaded",
                    site="Executives",
                    ip=ip,
                    file_name=EXEC_FILES[i % len(EXEC_FILES)].format(n=i + 1),
                )
        # Stories added later draw from their own generator: the events above stay as they were.
        actors = random.Random(f"{self.seed}:actors:{h}")
        draw = actors.random
        if 8 <= hod < 18:
            for _ in range(1 + int(draw() * 2)):
                add(
                    FILE,
                    base + draw() * HOUR,
                    SERVICE_ACCOUNTS,
                    actors,
                    actor="app@sharepoint",
                    operation="FileAccessed",
                    site=_DEPT_SITES[int(draw() * len(_DEPT_SITES))],
                )
        if hod % 6 == 3:
            add(
                FILE,
                base + draw() * HOUR,
                SERVICE_ACCOUNTS,
                actors,
                actor="SHAREPOINT\\system",
                operation="FileModified",
                site=_DEPT_SITES[int(draw() * len(_DEPT_SITES))],
            )
        if hod in QUIET_HOURS:
            for member in pools["quiet_members"]:
                at = base + draw() * HOUR
                add(FILE, at, QUIET_ACTORS, actors, actor=member, operation="FileAccessed")
            for guest in pools["quiet_guests"]:
                add(
                    FILE,
                    base + draw() * HOUR,
                    QUIET_ACTORS,
                    actors,
                    actor=guest,
                    operation="FilePreviewed",
                    site="ExternalPartners",
                    file_name=SHARED_FILES[int(draw() * len(SHARED_FILES))],
                )
        if hod == SYSTEM_HOUR:
            add(
                DIRECTORY_AUDIT,
                base + draw() * HOUR,
                SYSTEM_ACTIONS,
                actors,
                system=True,
                activity="Update StsRefreshTokenValidFrom Timestamp",
            )
        events.sort(key=lambda e: (e.at, e.id))
        return events

    @staticmethod
    def _latency(kind: str, rand: Any) -> float:
        # Audit pipelines lag: a few minutes usually, 20-50 minutes for a small fraction.
        # Always under an hour, so an hour's visible events come from it and the one before.
        if rand() < 0.05:
            return 1200 + rand() * 1800
        if kind == SIGN_IN:
            return 90 + rand() * 330
        if kind == DIRECTORY_AUDIT:
            return 150 + rand() * 750
        return 240 + rand() * 900

    @staticmethod
    def _ip(country: str, rng: random.Random) -> str:
        prefixes = _IP_PREFIXES.get(country, _IP_PREFIXES["US"])
        prefix = prefixes[int(rng.random() * len(prefixes))]
        return f"{prefix}.{1 + int(rng.random() * 254)}.{1 + int(rng.random() * 254)}"

    # -- injection ---------------------------------------------------------------------------
    def _inject(
        self,
        kind: str,
        at: float | dt.datetime,
        visible_at: float | dt.datetime | None,
        params: dict[str, Any],
    ) -> ActivityEvent:
        when = at.timestamp() if isinstance(at, dt.datetime) else float(at)
        if visible_at is None:
            visible = when
        else:
            visible = visible_at.timestamp() if isinstance(visible_at, dt.datetime) else visible_at
        digest = hashlib.sha256(
            f"{self.seed}:inject:{len(self._injected)}:{kind}:{when}:{sorted(params.items())}".encode()
        ).digest()
        event = ActivityEvent(
            kind,
            when,
            float(visible),
            _uuid(int.from_bytes(digest[:16], "big")),
            int.from_bytes(digest[16:24], "big"),
            params.pop("story", None),
            params,
            injected=True,
        )
        with self._lock:
            self._injected.append(event)
        return event

    def add_sign_in(
        self,
        user_id: str,
        at: float | dt.datetime,
        *,
        country: str = "US",
        city: str | None = None,
        state: str | None = None,
        ip: str | None = None,
        success: bool = True,
        error_code: int | None = None,
        app: str | None = None,
        visible_at: float | dt.datetime | None = None,
    ) -> str:
        """Inject a sign-in of ``user_id`` (id or UPN); returns its Graph/record id.

        ``visible_at`` (default ``at``): when the APIs start serving it (audit latency)."""
        user = self._find_user(user_id)
        if user is None:
            raise KeyError(f"no user {user_id!r}")
        params = {"user_id": user.id, "country": country, "success": success}
        for name, value in (
            ("city", city),
            ("state", state),
            ("ip", ip),
            ("error_code", error_code),
            ("app", app),
        ):
            if value is not None:
                params[name] = value
        return self._inject(SIGN_IN, at, visible_at, params).id

    def add_file_event(
        self,
        user: str,
        at: float | dt.datetime,
        operation: str = "FileAccessed",
        file_name: str = "Document.docx",
        site_url: str | None = None,
        *,
        ip: str | None = None,
        user_agent: str | None = None,
        folder: str = "Shared Documents",
        visible_at: float | dt.datetime | None = None,
    ) -> str:
        """Inject a SharePoint file event by a UPN, user id or outside e-mail address.

        ``site_url`` is a full URL or a path like ``/sites/HR`` (default ``/sites/HR``)."""
        found = self._find_user(user)
        params: dict[str, Any] = {
            "actor": found.id if found is not None else user,
            "operation": operation,
            "file_name": file_name,
            "folder": folder,
        }
        if site_url is None or site_url.startswith("/"):
            params["site"] = (site_url or "/sites/HR").rstrip("/").rsplit("/", 1)[-1]
        else:
            params["site_url"] = site_url.rstrip("/") + "/"
        if ip is not None:
            params["ip"] = ip
        if user_agent is not None:
            params["user_agent"] = user_agent
        return self._inject(FILE, at, visible_at, params).id

    def add_directory_audit(
        self,
        actor: str | None,
        at: float | dt.datetime,
        activity: str = "Add member to group",
        *,
        target_user: str | None = None,
        target_group: str | None = None,
        ip: str | None = None,
        app: str | None = None,
        result: str = "success",
        system: bool = False,
        visible_at: float | dt.datetime | None = None,
    ) -> str:
        """Inject a directory audit by user ``actor`` (or, when ``actor`` is None, by service
        principal ``app`` name, or by Entra ID itself with ``system``: the all-zero initiator
        id); returns the Graph directoryAudit id."""
        params: dict[str, Any] = {"activity": activity, "result": result}
        if system:
            params["system"] = True
        elif actor is not None:
            found = self._find_user(actor)
            if found is None:
                raise KeyError(f"no user {actor!r}")
            params["actor"] = found.id
        else:
            params["app"] = app or "HR Sync Connector"
        for name, value in (("target_user", target_user), ("target_group", target_group)):
            if value is not None:
                params[name] = value
        if ip is not None:
            params["ip"] = ip
        return self.graph_id(self._inject(DIRECTORY_AUDIT, at, visible_at, params))

    def clear_injected(self) -> None:
        with self._lock:
            self._injected.clear()

    # -- queries -----------------------------------------------------------------------------
    def events(
        self,
        kinds: frozenset[str] | set[str] | tuple[str, ...],
        start: float,
        end: float,
        *,
        visible_by: float,
        newest_first: bool = True,
    ) -> Iterator[ActivityEvent]:
        """Events of ``kinds`` that happened in [start, end] and are visible at ``visible_by``.

        Lazily, hour by hour (newest first by default), so a page of a wide window only
        generates the hours it needs."""
        end = min(end, visible_by)
        if end < start:
            return
        with self._lock:
            injected = [
                e
                for e in self._injected
                if e.kind in kinds and start <= e.at <= end and e.visible_at <= visible_by
            ]
        first, last = int(start // HOUR), int(end // HOUR)
        hours = range(last, first - 1, -1) if newest_first else range(first, last + 1)
        for h in hours:
            chunk = [
                e
                for e in self.hour(h)
                if e.kind in kinds and start <= e.at <= end and e.visible_at <= visible_by
            ]
            chunk += [e for e in injected if int(e.at // HOUR) == h]
            chunk.sort(key=lambda e: (e.at, e.id), reverse=newest_first)
            yield from chunk

    def visible_between(self, content_type: str, start: float, end: float) -> list[ActivityEvent]:
        """Events of a Management API content type that became visible in [start, end)."""
        out: list[ActivityEvent] = []
        first, last = int(start // HOUR) - 1, int(end // HOUR)
        for h in range(first, last + 1):
            out.extend(
                e
                for e in self.hour(h)
                if start <= e.visible_at < end and _CONTENT_TYPE[e.kind] == content_type
            )
        with self._lock:
            out.extend(
                e
                for e in self._injected
                if start <= e.visible_at < end and _CONTENT_TYPE[e.kind] == content_type
            )
        out.sort(key=lambda e: (e.visible_at, e.id))
        return out

    def has_visible(self, content_type: str, start: float, end: float) -> bool:
        return bool(self.visible_between(content_type, start, end))

    # -- rendering ---------------------------------------------------------------------------
    def details(self, event: ActivityEvent) -> dict[str, Any]:
        """Everything about an event, drawn from its seed (params win). Not cached: cheap to
        redo, and hours of rendered events would hold a lot of memory."""
        rng = random.Random(event.seed)
        rand = rng.random
        pools = self.pools()
        p = event.params
        d: dict[str, Any] = {"rng_country": None}
        device = _DEVICES[int(rand() * len(_DEVICES))]
        d["browser"], d["os"], d["user_agent"] = device
        d["user_agent"] = p.get("user_agent", d["user_agent"])
        d["correlation_id"] = _uuid(rng.getrandbits(128))
        if event.kind == SIGN_IN:
            uid = p.get("user_id")
            if uid is None:
                members = pools["members"]
                index = int(rand() * len(members))
                uid = members[index]
                if uid in pools["quiet_members"]:  # never signs in: the next one does
                    uid = members[(index + 1) % len(members)]
            user = self.user(uid)
            is_admin = bool(p.get("admin")) or uid in pools["admins"]
            country = p.get("country")
            if country is None:
                roll = rand()
                country = "US" if roll < 0.9 else _OTHER_COUNTRIES[int(rand() * 6)]
            place = _PLACES.get(country) or [(None, None, None, None)]
            city, state, lat, lon = place[int(rand() * len(place))]
            if p.get("city"):
                # A named city: its coordinates if the sandbox knows it, else none.
                known = next((pl for pl in place if pl[0] == p["city"]), None)
                city, state, lat, lon = known or (p["city"], None, None, None)
                state = p.get("state") or state
            success = p.get("success")
            if success is None:
                success = rand() >= 0.07
            code, reason = 0, None
            if not success:
                code, reason = _FAILURES[int(rand() * len(_FAILURES))]
                if p.get("error_code") is not None:
                    code = int(p["error_code"])
                    reason = dict(_FAILURES).get(code, "Other.")
                if rand() < 0.4 and "city" not in p:
                    # Failed attempts often carry no resolved city (an unknown proxy/VPN).
                    city, state, lat, lon = None, None, None, None
            apps = ADMIN_SIGN_IN_APPS if is_admin and rand() < 0.6 else SIGN_IN_APPS
            app = apps[int(rand() * len(apps))]
            if p.get("app"):
                app = next(
                    (a for a in (*SIGN_IN_APPS, *ADMIN_SIGN_IN_APPS) if a[0] == p["app"]), app
                )
            d.update(
                user=user,
                user_id=uid,
                country=country,
                city=city,
                state=state,
                lat=lat,
                lon=lon,
                success=success,
                error_code=code,
                failure_reason=reason,
                app=app,
                ip=p.get("ip") or self._ip(country, rng),
                admin=is_admin,
                mfa=is_admin or rand() < 0.3,
            )
        elif event.kind == DIRECTORY_AUDIT:
            app_name = p.get("app")
            actor = p.get("actor")
            system = bool(p.get("system"))
            if actor is None and app_name is None and not system:
                if rand() < 0.25:
                    app_name = "HR Sync Connector"
                else:
                    pool = pools["admins"] if rand() < 0.6 else pools["helpdesk"]
                    actor = pool[int(rand() * len(pool))]
            choices = _APP_ACTIVITIES if app_name else _ADMIN_ACTIVITIES
            activity = choices[int(rand() * len(choices))]
            if p.get("activity"):
                activity = next(
                    (a for a in (*_ADMIN_ACTIVITIES, *_APP_ACTIVITIES) if a[0] == p["activity"]),
                    (p["activity"], "Other", "Update", False),
                )
            target = p.get("target_user") or pools["members"][int(rand() * len(pools["members"]))]
            target_user = self._find_user(target)
            with self.org.lock:
                groups = sorted(self.org.groups.values(), key=lambda g: g.id)
            group = None
            if p.get("target_group"):
                key = p["target_group"]
                group = self.org.groups.get(key) or next(
                    (g for g in groups if g.display_name == key), None
                )
            elif activity[3] and groups:
                group = groups[int(rand() * len(groups))]
            sp = next(
                (
                    o
                    for o in self.org.others.values()
                    if o.odata_type == ODATA_SERVICE_PRINCIPAL and o.display_name == app_name
                ),
                None,
            )
            d.update(
                actor=self.user(actor) if actor else None,
                actor_id=actor,
                app_name=app_name,
                system=system,
                service_principal=sp,
                activity=activity,
                target_user=target_user,
                target_group=group,
                result=p.get("result", "success"),
                ip=p.get("ip") or self._ip("US", rng),
            )
        elif event.kind == FILE:
            actor = p.get("actor") or pools["members"][int(rand() * len(pools["members"]))]
            user = self.user(actor)
            op = p.get("operation")
            if op is None:
                roll, edge = rand(), 0.0
                op = _FILE_OPS[0][0]
                for name, weight in _FILE_OPS:
                    edge += weight
                    if roll < edge:
                        op = name
                        break
            site = p.get("site")
            site_url = p.get("site_url")
            onedrive = False
            if site_url is None:
                if site is None and user is not None and rand() < 0.35:
                    onedrive = True
                    slug = user.user_principal_name.lower().replace("@", "_").replace(".", "_")
                    site_url = f"https://{self._site_host}-my.sharepoint.com/personal/{slug}/"
                else:
                    if site is None:
                        dept = (user.department if user else None) or "Engineering"
                        site = (
                            dept
                            if dept in _DEPT_SITES and rand() < 0.7
                            else _DEPT_SITES[int(rand() * len(_DEPT_SITES))]
                        )
                    site_url = f"https://{self._site_host}.sharepoint.com/sites/{site}/"
            file_name = p.get("file_name") or (
                f"{_DOC_WORDS[int(rand() * len(_DOC_WORDS))]} {1 + int(rand() * 40)}."
                f"{_DOC_EXT[int(rand() * len(_DOC_EXT))]}"
            )
            service = actor in SERVICE_IDENTITIES
            external = not service and (
                user is None
                or user.user_type == "Guest"
                or "#EXT#" in (user.user_principal_name if user else "")
            )
            country = "US" if not external else ("GB", "DE", "FR", "CA")[int(rand() * 4)]
            d.update(
                user=user,
                actor=actor,
                operation=op,
                site_url=site_url,
                onedrive=onedrive,
                folder=p.get("folder") or ("Documents" if onedrive else "Shared Documents"),
                file_name=file_name,
                ip=p.get("ip") or self._client_ip(country, rng),
                external=external,
                service=service,
                site_guid=_uuid(int(hashlib.md5(site_url.encode()).hexdigest(), 16)),
                item_guid=_uuid(int(hashlib.md5((site_url + file_name).encode()).hexdigest(), 16)),
            )
        else:
            uid = p.get("actor") or pools["members"][int(rand() * len(pools["members"]))]
            d.update(
                user=self.user(uid),
                actor=uid,
                ip=self._client_ip("US", rng),
                op_index=rand(),
                count=1 + int(rand() * 12),
            )
        return d

    def _client_ip(self, country: str, rng: random.Random) -> str:
        # Management API ClientIP: sometimes with a port, sometimes IPv6 in brackets.
        roll = rng.random()
        if roll < 0.12:
            host = f"2001:db8:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
            return f"[{host}]:{rng.randrange(1024, 65535)}"
        if roll < 0.2:
            return (
                f"2001:db8:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}::{rng.getrandbits(12):x}"
            )
        ip = self._ip(country, rng)
        return f"{ip}:{rng.randrange(1024, 65535)}" if roll < 0.35 else ip

    # -- vendor shapes -----------------------------------------------------------------------
    @staticmethod
    def graph_id(event: ActivityEvent) -> str:
        """The id Graph shows: sign-ins use the GUID; directory audits are prefixed with the
        logging service and a partition suffix (``Directory_<guid>_<ABCDE>_<digits>``)."""
        if event.kind != DIRECTORY_AUDIT:
            return event.id
        letters = "".join(chr(65 + (event.seed >> (5 * i)) % 26) for i in range(5))
        return f"Directory_{event.id}_{letters}_{event.seed % 100_000_000:08d}"

    def graph_sign_in(self, event: ActivityEvent) -> dict[str, Any]:
        """``microsoft.graph.signIn`` with every key of the docs' example (auditlogs.json)."""
        d = self.details(event)
        user: User | None = d["user"]
        app = d["app"]
        policies = [
            {
                "id": pid,
                "displayName": name,
                "enforcedGrantControls": ["Mfa"] if d["admin"] and i == 0 else [],
                "enforcedSessionControls": [],
                "result": ("success" if d["success"] else "failure")
                if d["admin"] and i == 0
                else "notEnabled",
            }
            for i, (pid, name) in enumerate(_CA_POLICIES)
        ]
        if d["success"]:
            details = "MFA requirement satisfied by claim in the token" if d["mfa"] else None
        else:
            details = (
                "The user didn't enter the right credentials." if d["error_code"] == 50126 else None
            )
        return {
            "id": event.id,
            "createdDateTime": iso_graph(event.at),
            "userDisplayName": user.display_name if user else None,
            "userPrincipalName": user.user_principal_name if user else None,
            "userId": d["user_id"],
            "appId": app[1],
            "appDisplayName": app[0],
            "ipAddress": d["ip"],
            "clientAppUsed": app[4],
            "correlationId": d["correlation_id"],
            "conditionalAccessStatus": "success" if d["admin"] else "notApplied",
            "isInteractive": True,
            "riskDetail": "none",
            "riskLevelAggregated": "none",
            "riskLevelDuringSignIn": "none",
            "riskState": "none",
            "riskEventTypes": [],
            "resourceDisplayName": app[2],
            "resourceId": app[3],
            "status": {
                "errorCode": d["error_code"],
                "failureReason": d["failure_reason"],
                "additionalDetails": details,
            },
            "deviceDetail": {
                "deviceId": "",
                "displayName": None,
                "operatingSystem": d["os"],
                "browser": d["browser"],
                "isCompliant": None,
                "isManaged": None,
                "trustType": None,
            },
            "location": {
                "city": d["city"],
                "state": d["state"],
                "countryOrRegion": d["country"],
                "geoCoordinates": {
                    "altitude": None,
                    "latitude": d["lat"],
                    "longitude": d["lon"],
                },
            },
            "appliedConditionalAccessPolicies": policies,
        }

    def graph_directory_audit(self, event: ActivityEvent) -> dict[str, Any]:
        """``microsoft.graph.directoryAudit`` shaped like the docs' examples."""
        d = self.details(event)
        name, category, operation, _ = d["activity"]
        actor: User | None = d["actor"]
        if d["app_name"]:
            sp = d["service_principal"]
            initiated: dict[str, Any] = {
                "user": None,
                "app": {
                    "appId": sp.properties.get("appId") if sp else None,
                    "displayName": d["app_name"],
                    "servicePrincipalId": sp.id if sp else None,
                    "servicePrincipalName": None,
                },
            }
        elif d["system"]:
            initiated = {
                "user": {
                    "id": NIL_ID,
                    "displayName": None,
                    "userPrincipalName": None,
                    "ipAddress": None,
                    "userType": None,
                    "homeTenantId": None,
                    "homeTenantName": None,
                },
                "app": None,
            }
        else:
            initiated = {
                "user": {
                    "id": d["actor_id"],
                    "displayName": None,  # Entra leaves the actor's displayName empty
                    "userPrincipalName": actor.user_principal_name if actor else None,
                    "ipAddress": d["ip"],
                    "userType": None,
                    "homeTenantId": None,
                    "homeTenantName": None,
                },
                "app": None,
            }
        target: User | None = d["target_user"]
        targets: list[dict[str, Any]] = []
        group = d["target_group"]
        if group is not None:
            targets.append(
                {
                    "id": group.id,
                    "displayName": group.display_name,
                    "type": "Group",
                    "userPrincipalName": None,
                    "groupType": "unifiedGroups" if "Unified" in group.group_types else "azureAD",
                    "modifiedProperties": [
                        {
                            "displayName": "Group.DisplayName",
                            "oldValue": None,
                            "newValue": f'"{group.display_name}"',
                        },
                    ],
                }
            )
        if target is not None:
            modified = []
            if name == "Update user":
                modified = [
                    {
                        "displayName": "JobTitle",
                        "oldValue": f'["{target.job_title}"]',
                        "newValue": f'["Senior {target.job_title}"]',
                    },
                    {
                        "displayName": "Included Updated Properties",
                        "oldValue": None,
                        "newValue": '"JobTitle"',
                    },
                ]
            elif name == "Disable account":
                modified = [
                    {"displayName": "AccountEnabled", "oldValue": "[true]", "newValue": "[false]"}
                ]
            targets.append(
                {
                    "id": target.id,
                    "displayName": None,
                    "type": "User",
                    "userPrincipalName": target.user_principal_name,
                    "groupType": None,
                    "modifiedProperties": modified,
                }
            )
        success = d["result"] == "success"
        return {
            "id": self.graph_id(event),
            "category": category,
            "correlationId": d["correlation_id"],
            "result": d["result"],
            "resultReason": "" if success else "Microsoft.Online.Workflows.ObjectNotFound",
            "activityDisplayName": name,
            "activityDateTime": iso_graph(event.at),
            "loggedByService": "Core Directory",
            "operationType": operation,
            "initiatedBy": initiated,
            "targetResources": targets,
            "additionalDetails": (
                [{"key": "User-Agent", "value": d["user_agent"]}]
                if not d["app_name"] and not d["system"]
                else []
            ),
        }

    def management_record(self, event: ActivityEvent) -> dict[str, Any]:
        """One record of the Management Activity API's common schema (+ workload fields)."""
        d = self.details(event)
        tenant = self.org.tenant_id
        base: dict[str, Any] = {
            "CreationTime": iso_management(event.at),
            "Id": event.id,
            "OrganizationId": tenant,
        }
        if event.kind == SIGN_IN:
            user: User | None = d["user"]
            upn = user.user_principal_name.lower() if user else ""
            ok = d["success"]
            record = {
                **base,
                "Operation": "UserLoggedIn" if ok else "UserLoginFailed",
                "RecordType": 15,
                "ResultStatus": "Success" if ok else "Failed",
                "UserKey": d["user_id"],
                "UserType": 0,
                "Version": 1,
                "Workload": "AzureActiveDirectory",
                "ClientIP": d["ip"],
                "ObjectId": d["app"][3],
                "UserId": upn,
                "AzureActiveDirectoryEventType": 1,
                "ExtendedProperties": [
                    {"Name": "ResultStatusDetail", "Value": "Success" if ok else "Redirect"},
                    {"Name": "UserAgent", "Value": d["user_agent"]},
                    {"Name": "RequestType", "Value": "OAuth2:Authorize"},
                ],
                "ModifiedProperties": [],
                "Actor": [{"ID": d["user_id"], "Type": 0}, {"ID": upn, "Type": 5}],
                "ActorContextId": tenant,
                "ActorIpAddress": d["ip"],
                "InterSystemsId": d["correlation_id"],
                "IntraSystemId": event.id,
                "SupportTicketId": "",
                "Target": [{"ID": d["app"][3], "Type": 0}],
                "TargetContextId": tenant,
                "ApplicationId": d["app"][1],
                "DeviceProperties": [
                    {"Name": "OS", "Value": d["os"]},
                    {"Name": "BrowserType", "Value": d["browser"].split(" ")[0]},
                    {"Name": "IsCompliantAndManaged", "Value": "False"},
                ],
                "ErrorNumber": str(d["error_code"]),
            }
            if not ok:
                record["LogonError"] = (
                    "InvalidUserNameOrPassword"
                    if d["error_code"] == 50126
                    else "UserStrongAuthClientAuthNRequired"
                )
            return record
        if event.kind == DIRECTORY_AUDIT:
            graph = self.graph_directory_audit(event)
            actor = d["actor"]
            by_app, by_system = bool(d["app_name"]), d["system"]
            actor_upn = actor.user_principal_name.lower() if actor else ""
            targets = graph["targetResources"]
            if by_system:
                user_key, user_type = NIL_ID, 4
            elif by_app:
                sp = d["service_principal"]
                user_key, user_type = (sp.properties.get("appId", "") if sp else ""), 5
            else:
                user_key, user_type = f"{d['actor_id']}", 2
            return {
                **base,
                "Operation": graph["activityDisplayName"] + ".",
                "RecordType": 8,
                "ResultStatus": "Success" if graph["result"] == "success" else "Failure",
                "UserKey": user_key,
                "UserType": user_type,
                "Version": 1,
                "Workload": "AzureActiveDirectory",
                "ClientIP": "" if by_app or by_system else d["ip"],
                "ObjectId": targets[-1].get("userPrincipalName") or targets[-1]["id"]
                if targets
                else "",
                "UserId": (
                    f"ServicePrincipal_{d['service_principal'].id}"
                    if by_app and d["service_principal"]
                    else actor_upn
                ),
                "AzureActiveDirectoryEventType": 1,
                "ExtendedProperties": [
                    {"Name": "additionalDetails", "Value": "{}"},
                    {"Name": "extendedAuditEventCategory", "Value": graph["category"]},
                ],
                "ModifiedProperties": [
                    {
                        "Name": m["displayName"],
                        "NewValue": m["newValue"] or "",
                        "OldValue": m["oldValue"] or "",
                    }
                    for t in targets
                    for m in t["modifiedProperties"]
                ],
                "Actor": (
                    [{"ID": d["app_name"], "Type": 1}]
                    if by_app
                    else [{"ID": NIL_ID, "Type": 2}]
                    if by_system
                    else [{"ID": actor_upn, "Type": 5}, {"ID": d["actor_id"], "Type": 2}]
                ),
                "ActorContextId": tenant,
                "InterSystemsId": d["correlation_id"],
                "IntraSystemId": event.id,
                "SupportTicketId": "",
                "Target": [{"ID": t["id"], "Type": 2} for t in targets],
                "TargetContextId": tenant,
            }
        if event.kind == FILE:
            user = d["user"]
            # SharePoint names people by their UPN in lower case (guests: "#ext#"); service
            # identities as they are.
            if d["service"]:
                user_id = str(d["actor"])
                user_key = SERVICE_IDENTITIES[user_id]
            else:
                user_id = (
                    user.user_principal_name.lower()
                    if user is not None
                    else str(d["actor"]).lower()
                )
                user_key = (
                    f"i:0h.f|membership|{user.id}@live.com"
                    if user is not None and not d["external"]
                    else f"urn:spo:guest#{user_id}"
                )
            file_name = d["file_name"]
            ext = file_name.rsplit(".", 1)[-1] if "." in file_name else ""
            return {
                **base,
                "Operation": d["operation"],
                "RecordType": 6,
                "ResultStatus": "Succeeded",
                "UserKey": user_key,
                "UserType": 0,
                "Version": 1,
                "Workload": "OneDrive" if d["onedrive"] else "SharePoint",
                "ClientIP": d["ip"],
                "ObjectId": f"{d['site_url']}{d['folder']}/{file_name}",
                "UserId": user_id,
                "CorrelationId": d["correlation_id"],
                "EventSource": "SharePoint",
                "ItemType": "File",
                "ListId": d["site_guid"],
                "ListItemUniqueId": d["item_guid"],
                "Site": d["site_guid"],
                "UserAgent": d["user_agent"],
                "WebId": d["site_guid"],
                "GeoLocation": "NAM",
                "IsManagedDevice": not d["external"],
                "SourceFileExtension": ext,
                "SiteUrl": d["site_url"],
                "SourceFileName": file_name,
                "SourceRelativeUrl": d["folder"],
            }
        if event.kind == EXCHANGE:
            user = d["user"]
            upn = user.user_principal_name if user else ""
            roll, edge = d["op_index"], 0.0
            op, record_type = _EXCHANGE_OPS[0][:2]
            for name, rtype, weight in _EXCHANGE_OPS:
                edge += weight
                if roll < edge:
                    op, record_type = name, rtype
                    break
            record = {
                **base,
                "Operation": op,
                "RecordType": record_type,
                "ResultStatus": "Succeeded",
                "UserKey": d["actor"],
                "UserType": 0,
                "Version": 1,
                "Workload": "Exchange",
                "ClientIP": d["ip"],
                "UserId": upn,
                "AppId": "00000002-0000-0ff1-ce00-000000000000",
                "ClientIPAddress": d["ip"],
                "ClientInfoString": "Client=OWA;Action=ViaProxy",
                "ExternalAccess": False,
                "InternalLogonType": 0,
                "LogonType": 0,
                "LogonUserSid": "S-1-5-21-" + str(event.seed % 10**10),
                "MailboxGuid": d["correlation_id"],
                "MailboxOwnerUPN": upn,
                "OrganizationName": self.org.initial_domain,
                "OriginatingServer": "BN0PR04MB8000 (15.20.8207.017)",
            }
            if op == "MailItemsAccessed":
                record["OperationProperties"] = [
                    {"Name": "MailAccessType", "Value": "Bind"},
                    {"Name": "IsThrottled", "Value": "False"},
                ]
                record["OperationCount"] = d["count"]
            elif op == "Send":
                record["Item"] = {
                    "Id": d["correlation_id"],
                    "InternetMessageId": f"<{event.id[:8]}@{self.org.default_domain}>",
                    "ParentFolder": {"Name": "Drafts", "Path": "\\Drafts"},
                    "Subject": "Re: weekly sync",
                }
            return record
        user = d["user"]
        op = _TEAMS_OPS[int(d["op_index"] * len(_TEAMS_OPS))]
        return {
            **base,
            "Operation": op,
            "RecordType": 25,
            "UserKey": d["actor"],
            "UserType": 0,
            "Version": 1,
            "Workload": "MicrosoftTeams",
            "ClientIP": d["ip"],
            "UserId": user.user_principal_name if user else "",
            "CommunicationType": "Channel" if d["count"] % 2 else "OneOnOne",
            "ItemName": "General",
            "TeamName": (user.department if user and user.department else "All Company"),
            "TeamGuid": f"19:{event.id.replace('-', '')[:32]}@thread.tacv2",
            "ResultStatus": "Succeeded",
        }
