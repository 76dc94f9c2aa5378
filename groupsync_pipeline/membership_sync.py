"""The hourly re-sync of every imported group of a connection: the work behind the schedule.

Microsoft Graph's groups delta query reports only what changed since the saved deltaLink, so an
hourly sync costs requests in proportion to the changes, not to group sizes. A full read (a new
delta chain from scratch) happens on the first sync, when the app rejects the saved state, once
a day (``full_sync_every``: catches what deltas can miss, such as permanently deleted users), to
verify a held shrink, or when asked. Everything read is staged first; the lake changes in
one transaction at the end, so a sync that fails midway changes nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from groupsync_pipeline.config import Connection, env_number
from groupsync_pipeline.connected_apps import api_root, open_connector
from groupsync_pipeline.connectors.base import (
    Account,
    Connector,
    DeltaExpiredError,
    UnreadableAccount,
)
from groupsync_pipeline.storage.control import ControlStore
from groupsync_pipeline.storage.lake import Lake
from groupsync_pipeline.storage.sync_writes import (
    DeltaStaging,
    RoundResult,
    ShrinkPolicy,
    apply_round,
    imported_groups,
    resolve_round,
)

Log = Callable[[str], None]
DEFAULT_FULL_SYNC_EVERY = timedelta(hours=24)
SHRINK_LIMIT_ENV = "GROUPSYNC_SHRINK_LIMIT"  # share of members a sync may remove (0-1)
SHRINK_MIN_MEMBERS_ENV = "GROUPSYNC_SHRINK_MIN_MEMBERS"  # smaller losses are never held
FULL_SYNC_HOURS_ENV = "GROUPSYNC_FULL_SYNC_HOURS"


def sync_settings_from_env(
    environ: Mapping[str, str] = os.environ,
) -> tuple[ShrinkPolicy, timedelta]:
    """The shrink safeguard and the full-resync period, from the environment."""
    default = ShrinkPolicy()

    def number(name: str, fallback: float, low: float, high: float) -> float:
        return env_number(environ, name, fallback, low, high)

    share = number(SHRINK_LIMIT_ENV, default.share, 0.0, 1.0)
    minimum = int(number(SHRINK_MIN_MEMBERS_ENV, default.min_members, 0, 1e9))
    hours = number(FULL_SYNC_HOURS_ENV, DEFAULT_FULL_SYNC_EVERY.total_seconds() / 3600, 1, 24 * 6)
    return ShrinkPolicy(share=share, min_members=minimum), timedelta(hours=hours)


@dataclass
class ConnectionSyncOutcome:
    connection: str
    mode: str  # delta | full | skipped
    full_reason: str | None = None
    pages: int = 0
    changed_groups: int = 0  # group objects the app reported
    groups_synced: int = 0
    joined: int = 0
    left: int = 0
    held: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)
    accounts_fetched: int = 0
    # People the app would not give details of: account id -> status and error code. They
    # are recorded as members without details and asked for again at the next sync.
    unreadable: dict[str, str] = field(default_factory=dict)
    duration_seconds: float = 0.0


def _stored_link(link: str, graph_url: str) -> str:
    """Keep a link relative to the app's API root when it is under it.

    The embedded sandbox listens on a new port in every run; a real tenant's links are always
    under its API root, so storing the path keeps them valid in both cases. Which API root a
    stored link belongs to is kept beside it (``api_root``) and checked before it is used.
    """
    prefix = graph_url.rstrip("/") + "/"
    return link[len(prefix) - 1 :] if link.startswith(prefix) else link


def _usable_link(stored: str, graph_url: str) -> str:
    return graph_url.rstrip("/") + stored if stored.startswith("/") else stored


def _read_round(
    connector: Connector, staging: DeltaStaging, link: str | None, log: Log, every: int
) -> str:
    """Stream one delta round into staging; returns the app's new deltaLink."""
    final: str | None = None
    for page in connector.group_delta(link):
        staging.add(page)
        if staging.pages % every == 0:
            log(
                f"{staging.pages} delta pages read: {staging.objects} group objects, "
                f"{staging.edge_ops} membership entries so far"
            )
        if page.delta_link is not None:
            final = page.delta_link
    if final is None:  # the connector guarantees it; never save a state that would lose changes
        raise RuntimeError("the delta round ended without a deltaLink")
    return final


def sync_connection(
    connection: Connection,
    lake: Lake,
    control: ControlStore,
    *,
    run_id: str | None = None,
    log: Log = lambda message: None,
    force_full: bool = False,
    full_sync_every: timedelta = DEFAULT_FULL_SYNC_EVERY,
    policy: ShrinkPolicy | None = None,
    progress_every: int = 10,
) -> ConnectionSyncOutcome:
    """Bring every imported group of ``connection`` up to date with the app."""
    started = time.monotonic()
    policy = policy or ShrinkPolicy()
    with lake.read() as conn:
        live, deleted = imported_groups(conn, connection.name)
        # SELECT *: a lake from before api_root existed lacks it until its next write.
        cursor = conn.execute(
            "SELECT * FROM connection_sync_state WHERE connection = ?", [connection.name]
        )
        rows = cursor.fetchall()
        state = dict(zip([d[0] for d in cursor.description], rows[0], strict=True)) if rows else {}
        open_holds = conn.execute(
            "SELECT count(*) FROM membership_holds h JOIN user_groups g USING (group_id) "
            "WHERE h.status = 'held' AND g.connection = ?",
            [connection.name],
        ).fetchall()[0][0]
    if not live:
        log(f"{connection.name}: no imported groups; nothing to sync")
        return ConnectionSyncOutcome(connection.name, "skipped")
    stored_link, last_full = state.get("delta_link"), state.get("last_full_sync_at")
    root = api_root(connection)
    reason: str | None = None
    if force_full:
        reason = "requested"
    elif stored_link is None:
        reason = "first sync"
    elif state.get("api_root") is None:
        # Saved before the API address was recorded: which API it belongs to is unknown.
        reason = "the API address of the saved state is unknown"
    elif state["api_root"] != root:
        # The saved link belongs to another API address or tenant: it cannot resume here.
        reason = f"the connection's API address changed (was {state['api_root']})"
    elif open_holds:
        reason = "verify held shrink"
    elif last_full is None or datetime.now(UTC) - last_full >= full_sync_every:
        reason = "periodic"
    outcome = ConnectionSyncOutcome(connection.name, "full" if reason else "delta")

    staging = DeltaStaging(lake.staging_path())
    try:
        with open_connector(connection, log=log) as connector:
            graph_url = getattr(connector, "graph_url", "")
            link = None if reason or stored_link is None else _usable_link(stored_link, graph_url)
            try:
                new_link = _read_round(connector, staging, link, log, progress_every)
            except DeltaExpiredError as exc:
                reason = f"delta state expired: {exc}"
                outcome.mode = "full"
                log(f"{connection.name}: {reason}; starting a full resync and a new delta chain")
                staging.remove()
                staging = DeltaStaging(lake.staging_path())
                new_link = _read_round(connector, staging, None, log, progress_every)
            full = reason is not None
            unknown = resolve_round(staging, lake, connection.name, full, live, deleted)
            if unknown:
                log(f"{connection.name}: reading details of {len(unknown)} new members")
                accounts: list[Account] = []
                for person in connector.users_by_id(unknown):
                    if isinstance(person, UnreadableAccount):
                        outcome.unreadable[person.account_id] = person.reason
                    else:
                        accounts.append(person)
                found = {a.account_id for a in accounts} | set(outcome.unreadable)
                # Those not found are gone from the app; the unreadable stay members.
                staging.add_accounts(accounts, [u for u in unknown if u not in found])
                outcome.accounts_fetched = len(accounts)
                if outcome.unreadable:
                    shown = "; ".join(f"{k}: {v}" for k, v in list(outcome.unreadable.items())[:5])
                    log(
                        f"{connection.name}: {len(outcome.unreadable)} people could not be read "
                        f"({shown}{'; ...' if len(outcome.unreadable) > 5 else ''}); recorded as "
                        "members without details, asked again at the next sync"
                    )
        outcome.pages = staging.pages
        outcome.changed_groups = staging.objects
        for attempt in lake.retrying():  # a commit the catalog refused runs again
            with attempt, lake.write() as conn:
                result: RoundResult = apply_round(
                    conn,
                    staging=staging,
                    connection=connection,
                    full=full,
                    full_reason=reason,
                    delta_link=_stored_link(new_link, graph_url),
                    api_root=root,
                    pages=staging.pages,
                    run_id=run_id,
                    duration_seconds=time.monotonic() - started,
                    now=datetime.now(UTC),
                    policy=policy,
                    confirmations=control.shrink_confirmations(),
                )
    finally:
        staging.remove()
    outcome.full_reason = reason
    outcome.groups_synced = len(result.synced)
    outcome.joined = result.joined
    outcome.left = result.left
    outcome.held = [h.group_id for h in result.held]
    outcome.deleted = result.deleted
    outcome.released = result.released
    outcome.duration_seconds = time.monotonic() - started
    log(
        f"{connection.name}: {outcome.mode} sync committed: {outcome.groups_synced} groups, "
        f"+{outcome.joined} / -{outcome.left} memberships from {outcome.pages} pages"
        + (f"; held back: {', '.join(outcome.held)}" if outcome.held else "")
        + (f"; deleted in the app: {', '.join(outcome.deleted)}" if outcome.deleted else "")
    )
    return outcome
