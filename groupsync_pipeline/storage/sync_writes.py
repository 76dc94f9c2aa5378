"""Hourly membership sync in DuckDB: stage a delta round, resolve it, apply it with history.

A round from the app (a delta since the last sync, or a full read that starts a new chain) is
streamed to a private staging file. ``resolve_round`` then works out, in the staging file and
against a read-only view of the lake, each group's direct members after the round and the
people in every imported group (the transitive closure over nested groups, a recursive CTE).
``apply_round`` makes the lake match in one transaction: intervals open and close at the
sync time, held shrinks are left alone, deleted groups are marked deleted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import pandas as pd

from groupsync_pipeline.config import Connection
from groupsync_pipeline.connectors.base import Account, DeltaPage
from groupsync_pipeline.storage.lake import (
    Lake,
    open_staging_file,
    remove_staging_file,
    sql_text,
)
from groupsync_pipeline.storage.writes import record_connection

_STAGING_DDL = """
CREATE TABLE IF NOT EXISTS group_objects (
    seq BIGINT NOT NULL, remote_id VARCHAR NOT NULL, name VARCHAR, description VARCHAR,
    mail VARCHAR, kind VARCHAR, removed VARCHAR,
    description_cleared BOOLEAN NOT NULL, mail_cleared BOOLEAN NOT NULL
);
CREATE TABLE IF NOT EXISTS edge_ops (
    seq BIGINT NOT NULL, parent_id VARCHAR NOT NULL, member_id VARCHAR NOT NULL,
    member_type VARCHAR NOT NULL, op VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS fetched_accounts (
    account_id VARCHAR NOT NULL, email VARCHAR, display_name VARCHAR,
    user_principal_name VARCHAR, user_type VARCHAR, is_external BOOLEAN NOT NULL, enabled BOOLEAN
);
CREATE TABLE IF NOT EXISTS missing_accounts (account_id VARCHAR NOT NULL);
"""

_OBJECT_COLUMNS = [
    "seq",
    "remote_id",
    "name",
    "description",
    "mail",
    "kind",
    "removed",
    "description_cleared",
    "mail_cleared",
]
_EDGE_COLUMNS = ["seq", "parent_id", "member_id", "member_type", "op"]


class DeltaStaging:
    """Streams delta pages into a private DuckDB file in chunks, in the order they came."""

    def __init__(self, path: Path, chunk_rows: int = 50_000) -> None:
        self.path = path
        self.chunk_rows = chunk_rows
        self.pages = 0
        self.objects = 0
        self.edge_ops = 0
        self._objects: list[tuple] = []
        self._edges: list[tuple] = []
        self.conn = open_staging_file(path, _STAGING_DDL)

    def add(self, page: DeltaPage) -> None:
        self.pages += 1
        for change in page.changes:
            self.objects += 1
            seq = self.objects  # later pages win: a group can repeat with more members
            self._objects.append(
                (
                    seq,
                    change.remote_id,
                    change.name,
                    change.description,
                    change.mail,
                    change.kind,
                    change.removed,
                    "description" in change.cleared,
                    "mail" in change.cleared,
                )
            )
            for ref in change.members_removed:
                self._edges.append((seq, change.remote_id, ref.member_id, ref.member_type, "-"))
            for ref in change.members_added:
                self._edges.append((seq, change.remote_id, ref.member_id, ref.member_type, "+"))
        self.edge_ops = self.edge_ops + sum(
            len(c.members_added) + len(c.members_removed) for c in page.changes
        )
        if len(self._edges) + len(self._objects) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        for table, rows, columns in (
            ("group_objects", self._objects, _OBJECT_COLUMNS),
            ("edge_ops", self._edges, _EDGE_COLUMNS),
        ):
            if not rows:
                continue
            frame = pd.DataFrame.from_records(rows, columns=columns)
            self.conn.register("chunk", frame)
            self.conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM chunk")
            self.conn.unregister("chunk")
        self._objects = []
        self._edges = []

    def add_accounts(self, accounts: Iterable[Account], missing: Iterable[str]) -> None:
        frame = pd.DataFrame.from_records(list(accounts), columns=Account._fields).astype(
            {"is_external": "bool", "enabled": "boolean"}
        )
        if not frame.empty:
            self.conn.register("chunk", frame)
            self.conn.execute("INSERT INTO fetched_accounts BY NAME SELECT * FROM chunk")
            self.conn.unregister("chunk")
        gone = pd.DataFrame({"account_id": list(missing)}, dtype="object")
        if not gone.empty:
            self.conn.register("chunk", gone)
            self.conn.execute("INSERT INTO missing_accounts SELECT account_id FROM chunk")
            self.conn.unregister("chunk")

    def close(self) -> None:
        self.flush()
        self.conn.close()

    def remove(self) -> None:
        self.conn.close()
        remove_staging_file(self.path)


def resolve_round(
    staging: DeltaStaging,
    lake: Lake,
    connection: str,
    full: bool,
    imported_remote_ids: list[str],
    deleted_remote_ids: Sequence[str] = (),
) -> list[str]:
    """Work out direct members after the round and imported groups' people, in staging.

    ``deleted_remote_ids`` are imported groups already marked deleted: one the round shows
    again (Graph restores soft-deleted groups for 30 days) is synced again.
    Must run under the lake's shared lock. Returns the ids of people in imported groups
    whose account details the lake does not have yet (to fetch from the app).
    """
    staging.flush()
    conn = staging.conn
    lake.attach(conn, "wh", read_only=True)
    try:
        frame = pd.DataFrame(
            {
                "remote_id": [*imported_remote_ids, *deleted_remote_ids],
                "was_deleted": [False] * len(imported_remote_ids)
                + [True] * len(deleted_remote_ids),
            }
        ).astype({"remote_id": "object", "was_deleted": "bool"})
        conn.register("imported_frame", frame)
        conn.execute(
            "CREATE OR REPLACE TABLE known_imported AS SELECT remote_id, was_deleted "
            "FROM imported_frame"
        )
        conn.unregister("imported_frame")
        # The last word on each group object: later pages repeat a group with more members.
        # A property an object does not carry says nothing; one carried as null clears it
        # (has_description / has_mail: some object of the round carried it).
        conn.execute(
            """
            CREATE OR REPLACE TABLE last_objects AS
            SELECT remote_id,
                   arg_max(name, seq) FILTER (WHERE name IS NOT NULL) AS name,
                   arg_max_null(description, seq)
                       FILTER (WHERE description IS NOT NULL OR description_cleared)
                       AS description,
                   bool_or(description IS NOT NULL OR description_cleared) AS has_description,
                   arg_max_null(mail, seq) FILTER (WHERE mail IS NOT NULL OR mail_cleared)
                       AS mail,
                   bool_or(mail IS NOT NULL OR mail_cleared) AS has_mail,
                   arg_max(kind, seq) FILTER (WHERE kind IS NOT NULL) AS kind,
                   arg_max_null(removed, seq) AS removed
            FROM group_objects GROUP BY remote_id
            """
        )
        conn.execute(
            "CREATE OR REPLACE TABLE removed_groups AS "
            "SELECT remote_id FROM last_objects WHERE removed IS NOT NULL"
        )
        # The imported groups to sync: the live ones, and deleted ones the app shows again.
        conn.execute(
            """
            CREATE OR REPLACE TABLE imported AS
            SELECT remote_id FROM known_imported WHERE NOT was_deleted
               OR remote_id IN (SELECT remote_id FROM last_objects WHERE removed IS NULL)
            """
        )
        conn.execute(
            """
            CREATE OR REPLACE TABLE last_ops AS
            SELECT parent_id, member_id, arg_max(member_type, seq) AS member_type,
                   arg_max(op, seq) AS op
            FROM edge_ops GROUP BY parent_id, member_id
            """
        )
        if full:
            base = "SELECT parent_id, member_id, member_type FROM last_ops WHERE op = '+'"
        else:
            base = """
                SELECT parent_id, member_id, member_type FROM wh._remote_direct_members AS e
                WHERE connection = $connection AND NOT EXISTS (
                    SELECT 1 FROM last_ops AS o
                    WHERE o.parent_id = e.parent_id AND o.member_id = e.member_id)
                UNION ALL
                SELECT parent_id, member_id, member_type FROM last_ops WHERE op = '+'
            """
        params = {"connection": connection} if not full else {}
        conn.execute(
            f"""
            CREATE OR REPLACE TABLE new_edges AS
            SELECT * FROM ({base}) AS edges
            WHERE parent_id NOT IN (SELECT remote_id FROM removed_groups)
              AND member_id NOT IN (SELECT remote_id FROM removed_groups)
            """,
            params,
        )
        # Imported groups gone from the app: absent from a full read, or removed in a delta.
        if full:
            conn.execute(
                """
                CREATE OR REPLACE TABLE deleted_imported AS
                SELECT remote_id FROM imported WHERE remote_id NOT IN (
                    SELECT remote_id FROM last_objects WHERE removed IS NULL)
                """
            )
        else:
            conn.execute(
                "CREATE OR REPLACE TABLE deleted_imported AS SELECT remote_id FROM imported "
                "WHERE remote_id IN (SELECT remote_id FROM removed_groups)"
            )
        # Everyone reachable from each imported group through nested groups. UNION (not
        # UNION ALL) drops rows already found, so a nesting cycle ends the recursion.
        conn.execute(
            """
            CREATE OR REPLACE TABLE closure AS
            WITH RECURSIVE reach(root, member_id, member_type) AS (
                SELECT parent_id, member_id, member_type FROM new_edges
                WHERE parent_id IN (SELECT remote_id FROM imported)
                  AND parent_id NOT IN (SELECT remote_id FROM deleted_imported)
                UNION
                SELECT r.root, e.member_id, e.member_type
                FROM reach AS r JOIN new_edges AS e
                  ON e.parent_id = r.member_id AND r.member_type = 'group'
            )
            SELECT root, member_id, member_type FROM reach WHERE member_id <> root
            """
        )
        unknown = conn.execute(
            """
            SELECT DISTINCT member_id FROM closure
            WHERE member_type = 'user' AND member_id NOT IN (
                SELECT account_id FROM wh.accounts WHERE connection = $connection)
            ORDER BY member_id
            """,
            {"connection": connection},
        ).fetchall()
    finally:
        conn.execute("DETACH wh")
    return [row[0] for row in unknown]


@dataclass(frozen=True)
class GroupSyncStats:
    group_id: str
    remote_id: str
    name: str
    before: int
    after: int
    joined: int
    left: int
    nested_groups: int


@dataclass(frozen=True)
class Hold:
    group_id: str
    detected_at: datetime
    mode: str


@dataclass
class RoundResult:
    synced: list[GroupSyncStats] = field(default_factory=list)
    held: list[GroupSyncStats] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)  # (group_id, how)
    deleted: list[str] = field(default_factory=list)
    new_accounts: int = 0

    @property
    def joined(self) -> int:
        return sum(s.joined for s in self.synced)

    @property
    def left(self) -> int:
        return sum(s.left for s in self.synced)


@dataclass(frozen=True)
class ShrinkPolicy:
    """A sync may not remove more than ``share`` of a group's members (and ``min_members``+)."""

    share: float = 0.5
    min_members: int = 5

    def is_shrink(self, before: int, left: int) -> bool:
        return before > 0 and left >= self.min_members and left / before > self.share


def apply_round(
    conn: duckdb.DuckDBPyConnection,
    *,
    staging: DeltaStaging,
    connection: Connection,
    full: bool,
    full_reason: str | None,
    delta_link: str,
    api_root: str,
    pages: int,
    run_id: str | None,
    duration_seconds: float,
    now: datetime,
    policy: ShrinkPolicy,
    confirmations: dict[str, datetime],
) -> RoundResult:
    """Make the lake match the resolved round, in the caller's transaction."""
    staging.close()
    mode = "full" if full else "delta"
    name = connection.name
    record_connection(conn, connection, now)
    conn.execute(f"ATTACH {sql_text(str(staging.path))} AS stage (READ_ONLY)")
    # Lake.write() detaches it after the transaction (DuckDB refuses to inside it).
    result = _apply(conn, name, full, mode, now, policy, confirmations, run_id)
    _record_syncs(conn, result, now, run_id, pages, duration_seconds, mode)
    conn.execute("DELETE FROM _remote_direct_members WHERE connection = ?", [name])
    conn.execute(
        "INSERT INTO _remote_direct_members SELECT $connection, parent_id, member_id, "
        "member_type FROM stage.new_edges",
        {"connection": name},
    )
    _update_catalog(conn, connection, full, now)
    conn.execute(
        """
        MERGE INTO connection_sync_state AS s
        USING (SELECT $connection::VARCHAR AS connection, $link::VARCHAR AS delta_link,
                      $now::TIMESTAMPTZ AS now, $reason::VARCHAR AS reason,
                      $api_root::VARCHAR AS api_root, $full::BOOLEAN AS full) AS n
        ON s.connection = n.connection
        WHEN MATCHED THEN UPDATE SET delta_link = n.delta_link, api_root = n.api_root,
            last_synced_at = n.now,
            chain_started_at = CASE WHEN n.full THEN n.now ELSE s.chain_started_at END,
            last_full_sync_at = CASE WHEN n.full THEN n.now ELSE s.last_full_sync_at END,
            last_full_sync_reason = CASE WHEN n.full THEN n.reason
                                         ELSE s.last_full_sync_reason END
        WHEN NOT MATCHED THEN INSERT (connection, delta_link, chain_started_at,
            last_synced_at, last_full_sync_at, last_full_sync_reason, api_root)
            VALUES (n.connection, n.delta_link, n.now, n.now, n.now, n.reason, n.api_root)
        """,
        {
            "connection": name,
            "link": delta_link,
            "api_root": api_root,
            "now": now,
            "reason": full_reason,
            "full": full,
        },
    )
    return result


def _apply(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    full: bool,
    mode: str,
    now: datetime,
    policy: ShrinkPolicy,
    confirmations: dict[str, datetime],
    run_id: str | None,
) -> RoundResult:
    result = RoundResult()
    params = {"prefix": f"{name}:"}
    conn.execute(
        """
        CREATE OR REPLACE TEMP TABLE sync_groups AS
        SELECT g.group_id, g.remote_group_id AS remote_id, g.name
        FROM user_groups AS g
        WHERE g.type = 'imported' AND g.connection = $connection
          AND g.remote_group_id IN (SELECT remote_id FROM stage.imported)
        """,
        {"connection": name},
    )
    conn.execute(
        """
        CREATE OR REPLACE TEMP TABLE target AS
        SELECT DISTINCT $prefix || c.root AS group_id, c.member_id AS account_id
        FROM stage.closure AS c
        WHERE c.member_type = 'user'
          AND c.member_id NOT IN (SELECT account_id FROM stage.missing_accounts)
        """,
        params,
    )
    conn.execute(
        """
        CREATE OR REPLACE TEMP TABLE current_members AS
        SELECT m.group_id, m.account_id FROM group_memberships AS m
        WHERE m.connection = $connection AND m.valid_to IS NULL
          AND m.group_id IN (SELECT group_id FROM sync_groups)
        """,
        {"connection": name},
    )
    stats = conn.execute(
        """
        WITH before AS (SELECT group_id, count(*) AS n FROM current_members GROUP BY 1),
        after AS (SELECT group_id, count(*) AS n FROM target GROUP BY 1),
        joins AS (SELECT group_id, count(*) AS n FROM target
                  ANTI JOIN current_members USING (group_id, account_id) GROUP BY 1),
        leaves AS (SELECT group_id, count(*) AS n FROM current_members
                   ANTI JOIN target USING (group_id, account_id) GROUP BY 1),
        nested AS (SELECT $prefix || root AS group_id, count(*) AS n FROM stage.closure
                   WHERE member_type = 'group' GROUP BY 1)
        SELECT s.group_id, s.remote_id, coalesce(o.name, s.name),
               coalesce(before.n, 0), coalesce(after.n, 0), coalesce(joins.n, 0),
               coalesce(leaves.n, 0), coalesce(nested.n, 0)
        FROM sync_groups AS s
        LEFT JOIN stage.last_objects AS o ON o.remote_id = s.remote_id
        LEFT JOIN before USING (group_id) LEFT JOIN after USING (group_id)
        LEFT JOIN joins USING (group_id) LEFT JOIN leaves USING (group_id)
        LEFT JOIN nested USING (group_id)
        WHERE s.remote_id NOT IN (SELECT remote_id FROM stage.deleted_imported)
        ORDER BY s.group_id
        """,
        {"prefix": f"{name}:"},
    ).fetchall()
    holds = {
        row[0]: Hold(row[0], row[1], row[2])
        for row in conn.execute(
            "SELECT group_id, max(detected_at), arg_max(mode, detected_at) "
            "FROM membership_holds WHERE status = 'held' GROUP BY group_id"
        ).fetchall()
    }
    apply_ids: list[str] = []
    for group_id, remote_id, group_name, before, after, joined, left, nested in stats:
        group = GroupSyncStats(group_id, remote_id, group_name, before, after, joined, left, nested)
        hold = holds.get(group_id)
        if policy.is_shrink(before, left):
            confirmed = confirmations.get(group_id)
            if hold is not None and confirmed is not None and confirmed > hold.detected_at:
                result.released.append((group_id, "confirmed"))
            elif hold is not None and full and hold.detected_at < now:
                result.released.append((group_id, "agreed"))
            else:
                result.held.append(group)
                if hold is None:
                    conn.execute(
                        "INSERT INTO membership_holds VALUES (?, ?, ?, ?, ?, ?, ?, 'held', NULL)",
                        [group_id, now, run_id, mode, before, after, left],
                    )
                continue
        elif hold is not None:
            result.released.append((group_id, "withdrawn"))
        apply_ids.append(group_id)
        result.synced.append(group)
    for group_id, how in result.released:
        conn.execute(
            "UPDATE membership_holds SET status = ?, resolved_at = ? "
            "WHERE group_id = ? AND status = 'held'",
            [how, now, group_id],
        )
    conn.register("apply_frame", pd.DataFrame({"group_id": apply_ids}, dtype="object"))
    conn.execute("CREATE OR REPLACE TEMP TABLE apply_groups AS SELECT group_id FROM apply_frame")
    conn.unregister("apply_frame")
    result.new_accounts = conn.execute(
        """
        INSERT INTO accounts (connection, account_id, email, display_name, user_principal_name,
                              user_type, is_external, enabled, first_seen_at, last_seen_at)
        SELECT DISTINCT ON (account_id) $connection, account_id, email, display_name,
               user_principal_name, user_type, is_external, enabled, $now, $now
        FROM stage.fetched_accounts
        WHERE account_id NOT IN (SELECT account_id FROM accounts WHERE connection = $connection)
        """,
        {"connection": name, "now": now},
    ).fetchall()[0][0]
    conn.execute(
        """
        UPDATE group_memberships SET valid_to = $now
        WHERE valid_to IS NULL AND group_id IN (SELECT group_id FROM apply_groups)
          AND NOT EXISTS (SELECT 1 FROM target AS t
              WHERE t.group_id = group_memberships.group_id
                AND t.account_id = group_memberships.account_id)
        """,
        {"now": now},
    )
    conn.execute(
        """
        INSERT INTO group_memberships (group_id, connection, account_id, valid_from, valid_to)
        SELECT t.group_id, $connection, t.account_id, $now, NULL
        FROM target AS t
        WHERE t.group_id IN (SELECT group_id FROM apply_groups)
          AND NOT EXISTS (SELECT 1 FROM current_members AS c
              WHERE c.group_id = t.group_id AND c.account_id = t.account_id)
        """,
        {"connection": name, "now": now},
    )
    for group in result.synced:
        conn.execute(
            "UPDATE user_groups SET name = ?, last_synced_at = ?, member_count = ?, "
            "deleted_at = NULL WHERE group_id = ?",
            [group.name, now, group.after, group.group_id],
        )
    deleted = conn.execute(
        """
        SELECT s.group_id FROM sync_groups AS s
        WHERE s.remote_id IN (SELECT remote_id FROM stage.deleted_imported) ORDER BY 1
        """
    ).fetchall()
    for (group_id,) in deleted:
        left = conn.execute(
            "UPDATE group_memberships SET valid_to = ? WHERE group_id = ? AND valid_to IS NULL",
            [now, group_id],
        ).fetchall()[0][0]
        conn.execute(
            "UPDATE user_groups SET deleted_at = ?, last_synced_at = ?, member_count = 0 "
            "WHERE group_id = ?",
            [now, now, group_id],
        )
        conn.execute(
            "UPDATE membership_holds SET status = 'withdrawn', resolved_at = ? "
            "WHERE group_id = ? AND status = 'held'",
            [now, group_id],
        )
        result.deleted.append(group_id)
        result.synced.append(GroupSyncStats(group_id, "", "", left, 0, 0, left, 0))
    return result


def _record_syncs(
    conn: duckdb.DuckDBPyConnection,
    result: RoundResult,
    now: datetime,
    run_id: str | None,
    pages: int,
    duration_seconds: float,
    mode: str,
) -> None:
    rows = [
        (
            s.group_id,
            now,
            run_id,
            s.after,
            s.joined,
            s.left,
            None,
            json.dumps({"group": s.nested_groups} if s.nested_groups else {}),
            s.nested_groups,
            pages,
            duration_seconds,
            mode,
        )
        for s in result.synced
    ]
    if not rows:
        return
    frame = pd.DataFrame.from_records(
        rows,
        columns=[
            "group_id",
            "synced_at",
            "run_id",
            "members",
            "joined",
            "left",
            "remote_member_count",
            "other_members",
            "nested_groups",
            "pages",
            "duration_seconds",
            "mode",
        ],
    ).astype({"remote_member_count": "Int64"})
    conn.register("sync_rows", frame)
    try:
        conn.execute("INSERT INTO group_syncs BY NAME SELECT * FROM sync_rows")
    finally:
        conn.unregister("sync_rows")


def _update_catalog(
    conn: duckdb.DuckDBPyConnection, connection: Connection, full: bool, now: datetime
) -> None:
    """Keep the catalog current from the round: new, renamed and deleted groups."""
    name = connection.name
    params = {"connection": name, "now": now, "app": connection.app}
    if full:
        conn.execute(
            """
            DELETE FROM group_catalog WHERE connection = $connection AND remote_group_id NOT IN (
                SELECT remote_id FROM stage.last_objects WHERE removed IS NULL)
            """,
            {"connection": name},
        )
    conn.execute(
        "DELETE FROM group_catalog WHERE connection = $connection "
        "AND remote_group_id IN (SELECT remote_id FROM stage.removed_groups)",
        {"connection": name},
    )
    conn.execute(
        """
        UPDATE group_catalog SET name = coalesce(o.name, group_catalog.name),
            description = CASE WHEN o.has_description THEN o.description
                               ELSE group_catalog.description END,
            mail = CASE WHEN o.has_mail THEN o.mail ELSE group_catalog.mail END,
            kind = coalesce(o.kind, group_catalog.kind), seen_at = $now
        FROM stage.last_objects AS o
        WHERE group_catalog.connection = $connection
          AND group_catalog.remote_group_id = o.remote_id AND o.removed IS NULL
        """,
        {"connection": name, "now": now},
    )
    conn.execute(
        """
        INSERT INTO group_catalog (app, connection, remote_group_id, name, description, mail,
                                   kind, remote_member_count, seen_at)
        SELECT $app, $connection, o.remote_id, coalesce(o.name, o.remote_id), o.description,
               o.mail, o.kind, NULL, $now
        FROM stage.last_objects AS o
        WHERE o.removed IS NULL AND o.remote_id NOT IN (
            SELECT remote_group_id FROM group_catalog WHERE connection = $connection)
        """,
        params,
    )


def imported_groups(
    conn: duckdb.DuckDBPyConnection, connection: str
) -> tuple[list[str], list[str]]:
    """Remote ids of the connection's imported groups: (live, marked deleted)."""
    rows = conn.execute(
        "SELECT remote_group_id, deleted_at IS NOT NULL FROM user_groups "
        "WHERE type = 'imported' AND connection = ? ORDER BY group_id",
        [connection],
    ).fetchall()
    return [r[0] for r in rows if not r[1]], [r[0] for r in rows if r[1]]
