"""Writes for audit activities: staging, de-duplicated merge, automatic groups, tagging.

An ingest streams every event it reads into a private staging file (bounded memory), then
merges in one transaction: events already stored are dropped on (connection, source, event_id),
actors are resolved to accounts, the automatic groups are brought up to date, and only then
are the new activities tagged, so an activity is tagged with the groups as they stood when it
arrived, once.

Actors named only by a sign-in name (file events) are resolved from what the lake knows
(``unknown_actor_names`` tells the ingest which names it does not); the ingest looks those up
in the app's directory before the merge, never inside it, and hands the answer over as an
``ActorLookup``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd

from groupsync_pipeline.config import Connection
from groupsync_pipeline.connectors.base import Account, Activity, ConnectorError
from groupsync_pipeline.storage.lake import open_staging_file, remove_staging_file, sql_text
from groupsync_pipeline.storage.tagging import (
    UTC_DAY,
    TaggingResult,
    tag_new_activities,
    tagged_through,
)
from groupsync_pipeline.storage.writes import (
    NEXT_GROUP_KEY,
    record_connection,
    replace_current_members,
    upsert_incoming_accounts,
)

_STAGED_DDL = """
CREATE TABLE IF NOT EXISTS staged_activities (
    source VARCHAR NOT NULL, event_id VARCHAR NOT NULL, occurred_at TIMESTAMPTZ NOT NULL,
    actor_account_id VARCHAR, actor_email VARCHAR, action VARCHAR NOT NULL,
    object_name VARCHAR, object_id VARCHAR, ip_address VARCHAR, country VARCHAR, city VARCHAR,
    user_agent VARCHAR, success BOOLEAN, raw VARCHAR, actor_type VARCHAR
)
"""

# The automatic groups every connection gets: (suffix of the group id, name).
EXTERNAL_GROUP = ("auto:external", "External")
ADMIN_GROUP_NAMES = {
    "office365": "Office 365 administrators",
    "google_workspace": "G Suite administrators",
    "box": "Box administrators",
    "dropbox": "Dropbox administrators",
}


# The id space an event id belongs to: the Management Activity API's content types share one
# (a record Id is unique across them), each Graph log has its own.
_ID_SPACE = (
    "CASE WHEN {t}.source LIKE 'Audit.%' OR {t}.source LIKE 'DLP.%' THEN 'management' "
    "ELSE {t}.source END"
)


def automatic_group_id(connection: str, suffix: str) -> str:
    return f"{connection}:{suffix}"


class ActivityStaging:
    """Streams activity pages into a private DuckDB file in chunks, so memory stays bounded."""

    def __init__(self, path: Path, chunk_rows: int = 50_000) -> None:
        self.path = path
        self.chunk_rows = chunk_rows
        self._buffer: list[Activity] = []
        self.rows = 0
        self.pages = 0
        self._conn = open_staging_file(path, _STAGED_DDL)
        self._closed = False

    def add(self, page: list[Activity]) -> None:
        self.pages += 1
        self._buffer.extend(page)
        self.rows += len(page)
        if len(self._buffer) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        frame = pd.DataFrame.from_records(self._buffer, columns=Activity._fields).astype(
            {"success": "boolean"}
        )
        frame["occurred_at"] = pd.to_datetime(frame["occurred_at"], utc=True)
        self._conn.register("chunk", frame)
        self._conn.execute("INSERT INTO staged_activities BY NAME SELECT * FROM chunk")
        self._conn.unregister("chunk")
        self._buffer = []

    def actor_names(self) -> list[str]:
        """Sign-in names (lower case) of people in the staged events that name no account and
        whose name no staged event pairs with an account id: what the lake may not know."""
        self.flush()
        rows = self._conn.execute(
            """
            SELECT DISTINCT lower(actor_email) AS name FROM staged_activities
            WHERE actor_account_id IS NULL AND actor_email IS NOT NULL
              AND coalesce(actor_type, 'user') = 'user'
            EXCEPT
            SELECT lower(actor_email) FROM staged_activities
            WHERE actor_account_id IS NOT NULL AND actor_email IS NOT NULL
            ORDER BY name
            """
        ).fetchall()
        return [row[0] for row in rows]

    def discard(self, source: str) -> None:
        """Forget what was staged from one source (its read failed part way)."""
        self.flush()
        self._conn.execute("DELETE FROM staged_activities WHERE source = ?", [source])
        self.rows = self._conn.execute("SELECT count(*) FROM staged_activities").fetchall()[0][0]

    def close(self) -> None:
        """Write what is buffered and close the file for the merge to read (idempotent)."""
        if self._closed:
            return
        self.flush()
        self._conn.close()
        self._closed = True

    def remove(self) -> None:
        self._buffer = []
        try:
            self._conn.close()
        finally:
            remove_staging_file(self.path)


@dataclass(frozen=True)
class SourceRead:
    """What one audit log's read covered, to be saved with the merge."""

    source: str
    read_until: datetime
    events_read: int
    gap_before: datetime | None = None  # the app no longer had events back to the last read


@dataclass(frozen=True)
class ActorLookup:
    """What the app's directory said about the sign-in names this ingest did not know.

    ``accounts``: directory accounts found by sign-in name or email; ``absent``: names (lower
    case) no directory account has: only these may become outside people's accounts.
    """

    accounts: Sequence[Account] = ()
    absent: frozenset[str] = frozenset()
    asked: int = 0  # names looked up


class DuplicateActivityError(ConnectorError):
    """The merge would store an event twice: nothing is written. A ConnectorError: it is
    what the app sent that breaks the rule, so that connection fails and the others go on."""


@dataclass
class ActivityMergeResult:
    received: int = 0  # staged events, repeats included
    new: int = 0  # stored for the first time
    resolved_actors: int = 0  # new activities whose account was found from a name or email
    unresolved_actors: int = 0  # new activities by a named person whose account is unknown
    located: int = 0  # new activities given the country of a sign-in from the same address
    external_joined: int = 0
    admins_joined: int = 0
    admins_left: int = 0
    new_by_source: dict[str, int] = field(default_factory=dict)
    late_by_source: dict[str, int] = field(default_factory=dict)  # caught by the overlap
    tagging: TaggingResult = field(default_factory=lambda: TaggingResult(0, 0, 0))


def ensure_automatic_groups(
    conn: duckdb.DuckDBPyConnection, connection: Connection, now: datetime
) -> dict[str, str]:
    """Create the connection's automatic groups if new; returns {kind: group_id}.

    ``imported_at`` of an automatic group is when groupsync created it: tags start there.
    """
    groups = {
        "external": (automatic_group_id(connection.name, EXTERNAL_GROUP[0]), EXTERNAL_GROUP[1])
    }
    admin_name = ADMIN_GROUP_NAMES.get(connection.app)
    if admin_name:
        groups["administrators"] = (automatic_group_id(connection.name, "auto:admins"), admin_name)
    for group_id, name in groups.values():
        conn.execute(
            f"""
            INSERT INTO user_groups (group_id, name, type, connection, remote_group_id,
                            imported_at, last_synced_at, member_count, deleted_at, group_key)
            SELECT $group_id, $name, 'automatic', $connection, NULL, $now, NULL, 0, NULL,
                   {NEXT_GROUP_KEY}
            WHERE NOT EXISTS (SELECT 1 FROM user_groups WHERE group_id = $group_id)
            """,
            {"group_id": group_id, "name": name, "connection": connection.name, "now": now},
        )
    return {kind: group_id for kind, (group_id, _) in groups.items()}


def _load_accounts(conn: duckdb.DuckDBPyConnection, accounts: list[Account]) -> None:
    """The temp table ``incoming`` that upsert_incoming_accounts reads, one row per account."""
    frame = pd.DataFrame.from_records(accounts, columns=Account._fields).astype(
        {"is_external": "bool", "enabled": "boolean", "account_id": "str"}
    )
    conn.register("accounts_frame", frame)
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE incoming AS "
        "SELECT DISTINCT ON (account_id) * FROM accounts_frame"
    )
    conn.unregister("accounts_frame")


def merge_activities(
    conn: duckdb.DuckDBPyConnection,
    *,
    connection: Connection,
    staging: ActivityStaging,
    reads: list[SourceRead],
    verified_domains: list[str] | None,
    admins: list[Account] | None,
    now: datetime,
    errors: dict[str, str] | None = None,
    actor_lookup: ActorLookup | None = None,
) -> ActivityMergeResult:
    """Store the staged events not stored yet, update automatic groups, tag the new ones.

    Runs inside the caller's transaction. ``admins`` None: the admin list could not be read,
    so the administrators group is left as it was. ``verified_domains`` None or empty: only
    guests and #EXT# accounts count as external. ``errors``: what could not be read this time
    ({source or "administrators" / "domains" / "users": error}), recorded in
    activity_sources_state without moving its watermark; a source read successfully has its
    error cleared. ``actor_lookup``: the directory's answer for the names the lake did
    not know; None when it could not be asked, so those names stay without an account.
    Raises DuplicateActivityError rather than store an event twice.
    """
    staging.close()
    result = ActivityMergeResult()
    record_connection(conn, connection, now)
    groups = ensure_automatic_groups(conn, connection, now)

    if admins is not None and "administrators" in groups:
        _load_accounts(conn, admins)
        # Role listings carry few properties: never blank what a full user read stored.
        upsert_incoming_accounts(conn, connection.name, now, keep_known=True)
        result.admins_joined, result.admins_left = replace_current_members(
            conn, groups["administrators"], connection.name, now
        )
        conn.execute("DROP TABLE incoming")
        conn.execute(
            "UPDATE user_groups SET last_synced_at = ? WHERE group_id = ?",
            [now, groups["administrators"]],
        )
    if actor_lookup is not None and actor_lookup.accounts:
        _load_accounts(conn, list(actor_lookup.accounts))
        upsert_incoming_accounts(conn, connection.name, now)
        conn.execute("DROP TABLE incoming")

    conn.execute(f"ATTACH {sql_text(str(staging.path))} AS activity_staging (READ_ONLY)")
    # Lake.write() detaches it after the transaction (DuckDB refuses to inside it).
    # One row per event: a window can hand the same event over twice.
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE incoming_activities AS "
        f"SELECT DISTINCT ON ({_ID_SPACE.format(t='s')}, event_id) * "
        f"FROM activity_staging.staged_activities AS s"
    )
    received, earliest = conn.execute(
        "SELECT count(*), min(occurred_at) FROM incoming_activities"
    ).fetchall()[0]
    result.received = staging.rows
    if received:
        # A repeat has the same time as the stored event: only stored rows from the batch's
        # earliest time on need checking (the scan skips older row groups by their min/max).
        conn.execute(
            f"""
            DELETE FROM incoming_activities AS i
            WHERE EXISTS (
                SELECT 1 FROM activities AS e
                WHERE e.connection = $connection AND e.occurred_at >= $earliest
                  AND e.event_id = i.event_id
                  AND {_ID_SPACE.format(t="e")} = {_ID_SPACE.format(t="i")}
            )
            """,
            {"connection": connection.name, "earliest": earliest},
        )
        result.resolved_actors = _resolve_actors(conn, connection.name, now)
        result.located = _locate_from_sign_ins(conn, connection.name, earliest)
        result.external_joined = _join_external(
            conn,
            connection.name,
            groups["external"],
            verified_domains or [],
            sorted(actor_lookup.absent) if actor_lookup is not None else [],
            now,
        )
        result.unresolved_actors = conn.execute(
            """
            SELECT count(*) FROM incoming_activities
            WHERE actor_account_id IS NULL AND actor_email IS NOT NULL
              AND coalesce(actor_type, 'user') = 'user'
            """
        ).fetchall()[0][0]
        result.new = conn.execute(
            """
            INSERT INTO activities BY NAME
            SELECT $last_id + row_number() OVER (ORDER BY occurred_at, source, event_id)
                       AS activity_id,
                   $connection AS connection, $app AS app, source, event_id, occurred_at,
                   actor_account_id, actor_email, actor_type, action, object_name, object_id,
                   ip_address, country, city, user_agent, success, raw, $now AS ingested_at
            FROM incoming_activities
            """,
            {
                "connection": connection.name,
                "app": connection.app,
                "now": now,
                "last_id": last_activity_id(conn),
            },
        ).fetchall()[0][0]
        _refuse_repeats(conn, connection.name, earliest)
        remember_sign_in_names(
            conn,
            "(SELECT $connection AS connection, * FROM incoming_activities)",
            {"connection": connection.name},
            since=earliest,
        )
        result.new_by_source = dict(
            conn.execute(
                "SELECT source, count(*) FROM incoming_activities GROUP BY source"
            ).fetchall()
        )
        # New events that happened before the previous read of their log ended: published
        # late, and caught only because each read overlaps the last one.
        result.late_by_source = dict(
            conn.execute(
                """
                SELECT i.source, count(*) FROM incoming_activities AS i
                JOIN activity_sources_state AS s
                  ON s.connection = $connection AND s.source = i.source
                WHERE i.occurred_at < s.read_until
                GROUP BY i.source
                """,
                {"connection": connection.name},
            ).fetchall()
        )
    conn.execute("DROP TABLE IF EXISTS incoming_activities")

    for read in reads:
        conn.execute(
            """
            MERGE INTO activity_sources_state AS s
            USING (SELECT $connection::VARCHAR AS connection, $source::VARCHAR AS source,
                          $until::TIMESTAMPTZ AS read_until, $now::TIMESTAMPTZ AS last_read_at,
                          $read::BIGINT AS events_read, $new::BIGINT AS events_new,
                          $gap::TIMESTAMPTZ AS gap_before) AS n
            ON s.connection = n.connection AND s.source = n.source
            WHEN MATCHED THEN UPDATE SET read_until = n.read_until,
                last_read_at = n.last_read_at, events_read = n.events_read,
                events_new = n.events_new, gap_before = coalesce(n.gap_before, s.gap_before),
                last_error = NULL, last_error_at = NULL
            WHEN NOT MATCHED THEN INSERT (connection, source, read_until, last_read_at,
                events_read, events_new, gap_before)
                VALUES (n.connection, n.source, n.read_until, n.last_read_at, n.events_read,
                        n.events_new, n.gap_before)
            """,
            {
                "connection": connection.name,
                "source": read.source,
                "until": read.read_until,
                "now": now,
                "read": read.events_read,
                "new": result.new_by_source.get(read.source, 0),
                "gap": read.gap_before,
            },
        )
    _record_reads_besides_logs(
        conn,
        connection.name,
        errors or {},
        {
            "administrators": None if admins is None else len(admins),
            "domains": None if verified_domains is None else len(verified_domains),
            "users": None if actor_lookup is None else actor_lookup.asked,
        },
        now,
    )
    conn.execute(
        """
        UPDATE user_groups SET member_count = (
            SELECT count(*) FROM group_memberships AS m
            WHERE m.group_id = user_groups.group_id AND m.valid_to IS NULL)
        WHERE type = 'automatic' AND connection = ?
        """,
        [connection.name],
    )
    result.tagging = tag_new_activities(conn)
    return result


def last_activity_id(conn: duckdb.DuckDBPyConnection) -> int:
    """The highest activity id ever given. Every merge tags what it stores, so it is at least
    ``tagged_through``: the scan reads only the files above it (their id statistics), not the
    whole table, and ids are never given twice even after retention deleted the newest."""
    after = tagged_through(conn)
    row = conn.execute(
        "SELECT max(activity_id) FROM activities WHERE activity_id >= $after", {"after": after}
    ).fetchall()[0]
    return max(int(row[0] or 0), after)


# Accounts groupsync made for outside people seen only in audit logs (no directory account).
_MADE_UP = "(user_type = 'External' AND user_principal_name IS NULL)"
# Who a lower-case sign-in name (or email) in the table ``wanted`` is, best first: 1 an
# account's sign-in name, 2 its email, (3: a pairing of name and id in the batch itself), 4 the
# id the app paired with that name in a stored sign-in of the last 30 days (Graph's own
# retention; kept in _sign_in_names; the latest first, between 4.01 and 4.99 whatever the
# dates say: a sign-in name handed to someone else is theirs from their first sign-in), 5 an
# account made for an outside person. A guest's sign-in name (#EXT#) always belongs to a
# directory account: an account an older release made up for one is not used.
_KNOWN_NAMES = f"""
    SELECT lower(user_principal_name) AS name, account_id, 1 AS rank FROM accounts
    WHERE connection = $connection AND user_principal_name IS NOT NULL
      AND lower(user_principal_name) IN (SELECT name FROM wanted)
    UNION ALL
    SELECT lower(email), account_id, CASE WHEN {_MADE_UP} THEN 5 ELSE 2 END FROM accounts
    WHERE connection = $connection AND email IS NOT NULL
      AND lower(email) IN (SELECT name FROM wanted)
      AND NOT ({_MADE_UP} AND contains(lower(email), '#ext#'))
    UNION ALL
    SELECT name, account_id,
           5 - (least(date_diff('day', $since_day, max(signed_in_on)), 98) + 1) / 100
    FROM _sign_in_names
    WHERE connection = $connection AND signed_in_on >= $since_day
      AND name IN (SELECT name FROM wanted)
    GROUP BY name, account_id
"""
SIGN_IN_PAIRING_DAYS = 30
SIGN_IN_SOURCE = "signIns"  # the log whose events pair a sign-in name with the account id


def _pairing_params(connection: str, now: datetime) -> dict[str, object]:
    """The parameters of ``_KNOWN_NAMES``: pairings from sign-ins of the last 30 UTC days."""
    since = now.astimezone(UTC) - timedelta(days=SIGN_IN_PAIRING_DAYS)
    return {"connection": connection, "since_day": since.date()}


def remember_sign_in_names(
    conn: duckdb.DuckDBPyConnection,
    events: str,
    params: dict[str, object] | None = None,
    since: datetime | None = None,
) -> None:
    """Append to ``_sign_in_names`` the (name, account, day) of the sign-ins in ``events`` (a
    relation with the columns of activities, connection included) it does not hold yet.
    ``since``: no event is older (the check reads only the days from then on)."""
    conn.execute(
        f"""
        INSERT INTO _sign_in_names (connection, name, account_id, signed_in_on)
        SELECT DISTINCT connection, lower(actor_email), actor_account_id,
               {UTC_DAY.format(ts="occurred_at")}
        FROM {events}
        WHERE source = '{SIGN_IN_SOURCE}'
          AND actor_account_id IS NOT NULL AND actor_email IS NOT NULL
        EXCEPT
        SELECT connection, name, account_id, signed_in_on FROM _sign_in_names
        WHERE signed_in_on >= $since_day
        """,
        {
            **(params or {}),
            "since_day": (since.astimezone(UTC).date() if since else date.min),
        },
    )


def unknown_actor_names(
    conn: duckdb.DuckDBPyConnection, connection: str, names: list[str], now: datetime
) -> list[str]:
    """Of these lower-case sign-in names, those the lake cannot tie to an account: the
    ones to look up in the app's directory (before the merge: never network I/O inside it)."""
    if not names:
        return []
    rows = conn.execute(
        f"""
        WITH wanted AS (SELECT DISTINCT unnest($names::VARCHAR[]) AS name)
        SELECT name FROM wanted
        EXCEPT
        SELECT name FROM ({_KNOWN_NAMES})
        ORDER BY name
        """,
        {"names": names, **_pairing_params(connection, now)},
    ).fetchall()
    return [row[0] for row in rows]


def _resolve_actors(conn: duckdb.DuckDBPyConnection, connection: str, now: datetime) -> int:
    """Fill in the account of events that name their actor only by sign-in name or email.

    File events (Management Activity API) carry the person's sign-in name, not the directory
    id: it is matched case-insensitively (see ``_KNOWN_NAMES``; the directory accounts the
    ingest looked up are stored by now). Applications, the system and sharing links are never
    matched to a person.
    """
    conn.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE actor_names AS
        WITH wanted AS (
            SELECT DISTINCT lower(actor_email) AS name FROM incoming_activities
            WHERE actor_account_id IS NULL AND actor_email IS NOT NULL
              AND coalesce(actor_type, 'user') = 'user'
        ),
        known AS (
            {_KNOWN_NAMES}
            UNION ALL
            SELECT lower(actor_email), actor_account_id, 3 FROM incoming_activities
            WHERE actor_account_id IS NOT NULL AND actor_email IS NOT NULL
        )
        SELECT k.name, arg_min(k.account_id, k.rank) AS account_id
        FROM known AS k JOIN wanted AS w ON w.name = k.name
        GROUP BY k.name
        """,
        _pairing_params(connection, now),
    )
    resolved = conn.execute(
        """
        UPDATE incoming_activities AS i SET actor_account_id = n.account_id
        FROM actor_names AS n
        WHERE i.actor_account_id IS NULL AND coalesce(i.actor_type, 'user') = 'user'
          AND lower(i.actor_email) = n.name
        """
    ).fetchall()[0][0]
    conn.execute("DROP TABLE actor_names")
    return int(resolved)


def _join_external(
    conn: duckdb.DuckDBPyConnection,
    connection: str,
    group_id: str,
    verified_domains: list[str],
    not_in_directory: list[str],
    now: datetime,
) -> int:
    """Put the outside people acting in these events into the External group.

    External: an account marked external (guest, #EXT#), a sign-in name carrying #EXT#, an
    "anyone with the link" visitor, or an email whose domain is not one of the organisation's
    verified domains; never an application or the system. A person with no account gets one,
    keyed by their lower-case email, only when the directory said it has nobody by that name
    (``not_in_directory``) or for a sharing link; others stay without one. The membership
    starts at the person's earliest new activity (not before the group existed) and never
    ends: having acted from outside is a fact about the past.
    """
    conn.execute(
        """
        CREATE OR REPLACE TEMP TABLE external_actors AS
        SELECT coalesce(i.actor_account_id, lower(i.actor_email)) AS account_id,
               any_value(i.actor_email) AS email,
               any_value(i.actor_account_id) IS NULL AS email_only,
               min(i.occurred_at) AS first_at
        FROM incoming_activities AS i
        LEFT JOIN accounts AS a
          ON a.connection = $connection AND a.account_id = i.actor_account_id
        WHERE coalesce(i.actor_type, 'user') NOT IN ('application', 'system')
          AND (i.actor_account_id IS NOT NULL
               OR (i.actor_email IS NOT NULL
                   AND (i.actor_type = 'anonymous'
                        OR lower(i.actor_email) IN (SELECT unnest($absent::VARCHAR[])))))
          AND (
            i.actor_type = 'anonymous'
            OR coalesce(a.is_external, false)
            OR contains(lower(coalesce(i.actor_email, a.user_principal_name, '')), '#ext#')
            OR (len($domains) > 0 AND contains(coalesce(i.actor_email, ''), '@')
                AND NOT list_contains($domains,
                                      lower(split_part(i.actor_email, '@', -1))))
          )
        GROUP BY 1
        """,
        {
            "connection": connection,
            "domains": verified_domains,
            "absent": not_in_directory,
        },
    )
    # Outside people with no directory account: keyed by email from now on.
    conn.execute(
        """
        INSERT INTO accounts (connection, account_id, email, display_name, user_principal_name,
                              user_type, is_external, enabled, first_seen_at, last_seen_at)
        SELECT $connection, x.account_id, x.email, NULL, NULL, 'External', true, NULL, $now, $now
        FROM external_actors AS x
        WHERE x.email_only AND x.account_id NOT IN (
            SELECT account_id FROM accounts WHERE connection = $connection)
        """,
        {"connection": connection, "now": now},
    )
    conn.execute(
        """
        UPDATE incoming_activities SET actor_account_id = lower(actor_email)
        WHERE actor_account_id IS NULL
          AND coalesce(actor_type, 'user') NOT IN ('application', 'system')
          AND lower(actor_email) IN (SELECT account_id FROM external_actors WHERE email_only)
        """
    )
    joined = conn.execute(
        """
        INSERT INTO group_memberships (group_id, connection, account_id, valid_from, valid_to)
        SELECT $group_id, $connection, x.account_id, greatest(x.first_at, g.imported_at), NULL
        FROM external_actors AS x, user_groups AS g
        WHERE g.group_id = $group_id
          AND x.account_id NOT IN (
            SELECT account_id FROM group_memberships WHERE group_id = $group_id)
        """,
        {"group_id": group_id, "connection": connection},
    ).fetchall()[0][0]
    conn.execute("DROP TABLE external_actors")
    if joined:
        conn.execute(
            "UPDATE user_groups SET last_synced_at = ? WHERE group_id = ?", [now, group_id]
        )
    return int(joined)


# The dedupe above expects a repeat to carry the stored event's time, so it looks back only
# to the batch's earliest event. The key check does not rely on that: any new event whose key
# is stored twice within this span before the batch's earliest event fails the merge. The
# span is the longest overlap of two reads (24 hours) plus a day, so its cost follows the
# batch, not the store (60 days cost 1 s per ingest at 10 million stored, and grew with it).
REPEAT_CHECK_SPAN = timedelta(days=2)


def _refuse_repeats(conn: duckdb.DuckDBPyConnection, connection: str, earliest: datetime) -> None:
    """The uniqueness of (connection, id space, event_id), checked for the events just stored
    (a unique index costs far more: see README); raises DuplicateActivityError."""
    repeats = conn.execute(
        f"""
        SELECT i.source, i.event_id FROM incoming_activities AS i
        JOIN activities AS e
          ON e.connection = $connection AND e.occurred_at >= $since
         AND e.event_id = i.event_id AND {_ID_SPACE.format(t="e")} = {_ID_SPACE.format(t="i")}
        GROUP BY ALL HAVING count(*) > 1
        ORDER BY 1, 2 LIMIT 5
        """,
        {"connection": connection, "since": earliest - REPEAT_CHECK_SPAN},
    ).fetchall()
    if repeats:
        named = ", ".join(f"{source} {event_id[:80]!r}" for source, event_id in repeats)
        raise DuplicateActivityError(
            f"{connection}: refusing to store events already stored ({named}); nothing was "
            "written. The app sent them again with another time, which the dedupe does not "
            "expect: please report it."
        )


SIGN_IN_LOCATION_WINDOW = "24 hours"


def _locate_from_sign_ins(
    conn: duckdb.DuckDBPyConnection, connection: str, earliest: datetime
) -> int:
    """Give events the app does not geolocate the place of a sign-in from the same address.

    File events and directory audits carry an IP address but no country. The latest
    geolocated sign-in from that address at or before the event, within 24 hours, lends its
    country and city (an as-of join): what "did an admin act from outside the US" needs.
    """
    # Only stored sign-ins from the addresses that need a place take part (a day of a tenant's
    # sign-ins is hundreds of thousands of rows), and the places are found before the UPDATE:
    # 5.5 s of a 9.6 s batch of 20,000 events at 1M stored went here before (bench/scale.py).
    # A temp table, not a CTE, so the planner knows its size (see also asof_loop_join_threshold
    # in lake.py).
    conn.execute(
        """
        CREATE OR REPLACE TEMP TABLE unplaced AS
        SELECT source, event_id, ip_address, occurred_at FROM incoming_activities
        WHERE country IS NULL AND ip_address IS NOT NULL
        """
    )
    conn.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE located AS
        SELECT e.source, e.event_id, s.country, s.city
        FROM unplaced AS e
        ASOF JOIN (
            SELECT ip_address, occurred_at, country, city FROM activities
            WHERE connection = $connection AND source = '{SIGN_IN_SOURCE}'
              AND country IS NOT NULL AND ip_address IS NOT NULL
              AND occurred_at >= $earliest - INTERVAL '{SIGN_IN_LOCATION_WINDOW}'
              AND ip_address IN (SELECT ip_address FROM unplaced)
            UNION ALL
            SELECT ip_address, occurred_at, country, city FROM incoming_activities
            WHERE source = '{SIGN_IN_SOURCE}' AND country IS NOT NULL AND ip_address IS NOT NULL
        ) AS s
          ON s.ip_address = e.ip_address AND e.occurred_at >= s.occurred_at
        WHERE e.occurred_at - s.occurred_at <= INTERVAL '{SIGN_IN_LOCATION_WINDOW}'
        """,
        {"connection": connection, "earliest": earliest},
    )
    located = conn.execute(
        """
        UPDATE incoming_activities AS i SET country = l.country, city = l.city
        FROM located AS l
        WHERE i.source = l.source AND i.event_id = l.event_id
        """
    ).fetchall()[0][0]
    conn.execute("DROP TABLE located")
    conn.execute("DROP TABLE unplaced")
    return int(located)


def _record_reads_besides_logs(
    conn: duckdb.DuckDBPyConnection,
    connection: str,
    errors: dict[str, str],
    reads: dict[str, int | None],
    now: datetime,
) -> None:
    """Errors of this ingest, and the success of the other reads (administrators, domains,
    the directory lookup of actors' sign-in names: {name: items read, None if not read})."""
    for source, error in errors.items():
        conn.execute(
            """
            MERGE INTO activity_sources_state AS s
            USING (SELECT ?::VARCHAR AS connection, ?::VARCHAR AS source,
                          ?::VARCHAR AS last_error, ?::TIMESTAMPTZ AS last_error_at) AS n
            ON s.connection = n.connection AND s.source = n.source
            WHEN MATCHED THEN UPDATE SET last_error = n.last_error,
                last_error_at = n.last_error_at
            WHEN NOT MATCHED THEN INSERT (connection, source, last_error, last_error_at)
                VALUES (n.connection, n.source, n.last_error, n.last_error_at)
            """,
            [connection, source, error, now],
        )
    for source, read in reads.items():
        if read is not None and source not in errors:
            conn.execute(
                """
                MERGE INTO activity_sources_state AS s
                USING (SELECT ?::VARCHAR AS connection, ?::VARCHAR AS source,
                              ?::TIMESTAMPTZ AS last_read_at, ?::BIGINT AS events_read) AS n
                ON s.connection = n.connection AND s.source = n.source
                WHEN MATCHED THEN UPDATE SET last_read_at = n.last_read_at,
                    events_read = n.events_read, last_error = NULL, last_error_at = NULL
                WHEN NOT MATCHED THEN INSERT (connection, source, last_read_at, events_read)
                    VALUES (n.connection, n.source, n.last_read_at, n.events_read)
                """,
                [connection, source, now, read],
            )
