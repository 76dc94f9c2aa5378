"""Writes to the lake: catalog snapshots, connected apps, and group imports.

Everything is bulk-loaded from DataFrames; nothing is inserted row by row.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pandas as pd

from groupsync_pipeline import json_text
from groupsync_pipeline.config import Connection
from groupsync_pipeline.connectors.base import (
    MEMBER_ROW_COLUMNS,
    Account,
    MemberPage,
    RemoteGroup,
)
from groupsync_pipeline.storage.extensions import offline_connection
from groupsync_pipeline.storage.lake import sql_text

# user_groups.group_key for a new group: the next unused number. Safe because writers hold the
# lake's writer lock (storage/lake.py); keys are never reused, as groups are never deleted.
NEXT_GROUP_KEY = "(SELECT coalesce(max(group_key), 0) + 1 FROM user_groups)"


def imported_group_id(connection: str, remote_group_id: str) -> str:
    return f"{connection}:{remote_group_id}"


def record_connection(
    conn: duckdb.DuckDBPyConnection,
    connection: Connection,
    now: datetime,
    tenant_id: str | None = None,
) -> None:
    conn.execute(
        """
        MERGE INTO connected_apps AS c
        USING (SELECT ?::VARCHAR AS connection, ?::VARCHAR AS app, ?::VARCHAR AS tenant_id,
                      ?::TIMESTAMPTZ AS first_seen_at) AS n
        ON c.connection = n.connection
        WHEN MATCHED THEN UPDATE SET app = n.app, tenant_id = coalesce(n.tenant_id, c.tenant_id)
        WHEN NOT MATCHED THEN INSERT (connection, app, tenant_id, first_seen_at)
            VALUES (n.connection, n.app, n.tenant_id, n.first_seen_at)
        """,
        [connection.name, connection.app, tenant_id or connection.tenant_id or None, now],
    )


def catalog_frame(
    connection: Connection, groups: Iterable[RemoteGroup], now: datetime
) -> pd.DataFrame:
    rows = [
        (
            connection.app,
            connection.name,
            g.remote_id,
            g.name,
            g.description,
            g.mail,
            g.kind,
            g.member_count,
            now,
        )
        for g in groups
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "app",
            "connection",
            "remote_group_id",
            "name",
            "description",
            "mail",
            "kind",
            "remote_member_count",
            "seen_at",
        ],
    ).astype({"remote_member_count": "Int64"})


def replace_catalog(
    conn: duckdb.DuckDBPyConnection, connection: Connection, catalog: pd.DataFrame, now: datetime
) -> None:
    """The connection's catalog becomes exactly ``catalog`` (one transaction)."""
    record_connection(conn, connection, now)
    conn.execute("DELETE FROM group_catalog WHERE connection = ?", [connection.name])
    conn.register("incoming_catalog", catalog)
    try:
        conn.execute(
            "INSERT INTO group_catalog BY NAME SELECT DISTINCT ON (remote_group_id) * "
            "FROM incoming_catalog"
        )
    finally:
        conn.unregister("incoming_catalog")
    conn.execute(
        "UPDATE connected_apps SET catalog_refreshed_at = ? WHERE connection = ?",
        [now, connection.name],
    )


class MemberStaging:
    """Streams member pages to a private file as the app listed them (bounded memory).

    ``read`` then goes over them once, in DuckDB, with the connector's ``member_rows_sql``,
    into a Parquet file of rows the merge loads: no Python object per member.
    """

    def __init__(self, path: Path) -> None:
        # One JSON array of every item listed: DuckDB reads its elements one by one. (A line
        # per page made DuckDB hold every page's parsed document: 230 MB for 100,000 members.)
        self.items_path = path.with_suffix(".members.json")
        self.rows_path = path.with_suffix(".members.parquet")
        self.pages = 0
        self.listed = 0  # items listed, people or not
        self.rows = 0  # people (kind "user"), repeats included
        self.other_members: Counter[str] = Counter()
        self._preview = pd.DataFrame(columns=["email", "display_name", "user_type"])
        self._read = False
        self._file = self.items_path.open("wb")
        self._file.write(b"[")

    def add(self, page: MemberPage) -> None:
        self.pages += 1
        if page.items:
            text = json_text.dump(page.items)  # "[a,b]": its elements join the file's array
            self._file.write((b"," if self.listed else b"") + text[1:-1])
            self.listed += len(page.items)

    def read(self, member_rows_sql: str) -> None:
        """Read the staged items into member rows; counts and the preview are set from them."""
        self._file.write(b"]")
        self._file.close()
        rows = f"read_parquet({sql_text(str(self.rows_path))}, file_row_number = true)"
        conn = offline_connection()
        try:
            conn.execute(
                "CREATE TEMP VIEW member_items AS SELECT json AS item FROM "
                f"read_json_objects({sql_text(str(self.items_path))}, format = 'array')"
            )
            # The rows keep the listing's order (file_row_number): no ORDER BY needed.
            conn.execute(
                f"COPY (SELECT {', '.join(MEMBER_ROW_COLUMNS)} FROM ({member_rows_sql})) "
                f"TO {sql_text(str(self.rows_path))} (FORMAT parquet)"
            )
            counts = conn.execute(f"SELECT kind, count(*) FROM {rows} GROUP BY kind").fetchall()
            for kind, count in counts:
                if kind == "user":
                    self.rows = int(count)
                else:
                    self.other_members[str(kind)] += int(count)
            self._preview = conn.execute(
                f"SELECT email, display_name, user_type FROM {rows} WHERE kind = 'user' "
                "ORDER BY file_row_number LIMIT 10"
            ).df()
        finally:
            conn.close()
        self._read = True

    def incoming_sql(self) -> str:
        """A SELECT of the staged people, one row per account (its first listing)."""
        if not self._read:
            raise RuntimeError("MemberStaging.read() must run before the merge")
        return (
            f"SELECT DISTINCT ON (account_id) {', '.join(Account._fields)} "
            f"FROM read_parquet({sql_text(str(self.rows_path))}, file_row_number = true) "
            "WHERE kind = 'user' ORDER BY account_id, file_row_number"
        )

    def preview(self, limit: int = 10) -> pd.DataFrame:
        """The first members listed, for a look at what was imported."""
        return self._preview.head(limit)

    def remove(self) -> None:
        self._file.close()
        for path in (self.items_path, self.rows_path):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SyncResult:
    group_id: str
    members: int
    joined: int
    left: int
    synced_at: datetime


def merge_group_members(
    conn: duckdb.DuckDBPyConnection,
    *,
    connection: Connection,
    group: RemoteGroup,
    staging: MemberStaging,
    run_id: str | None,
    duration_seconds: float,
    now: datetime,
) -> SyncResult:
    """Make the group's current members equal the staged ones, keeping history.

    Joins open an interval at ``now``, leaves close one at ``now``; members who stayed are
    untouched, so re-running the same import changes no membership.
    """
    group_id = imported_group_id(connection.name, group.remote_id)
    record_connection(conn, connection, now)
    # One row per account: a vendor page may repeat someone.
    conn.execute(f"CREATE OR REPLACE TEMP TABLE incoming AS {staging.incoming_sql()}")
    members = conn.execute("SELECT count(*) FROM incoming").fetchall()[0][0]
    upsert_incoming_accounts(conn, connection.name, now)
    joined, left = replace_current_members(conn, group_id, connection.name, now)
    conn.execute(
        f"""
        MERGE INTO user_groups AS g
        USING (SELECT $group_id::VARCHAR AS group_id, $name::VARCHAR AS name,
                      $connection::VARCHAR AS connection, $remote_id::VARCHAR AS remote_group_id,
                      $now::TIMESTAMPTZ AS now, $members::BIGINT AS member_count) AS n
        ON g.group_id = n.group_id
        WHEN MATCHED THEN UPDATE SET name = n.name, last_synced_at = n.now,
            member_count = n.member_count, deleted_at = NULL
        WHEN NOT MATCHED THEN INSERT (group_id, name, type, connection, remote_group_id,
                imported_at, last_synced_at, member_count, deleted_at, group_key)
            VALUES (n.group_id, n.name, 'imported', n.connection, n.remote_group_id, n.now,
                    n.now, n.member_count, NULL, {NEXT_GROUP_KEY})
        """,
        {
            "group_id": group_id,
            "name": group.name,
            "connection": connection.name,
            "remote_id": group.remote_id,
            "now": now,
            "members": members,
        },
    )
    conn.execute(
        """
        INSERT INTO group_syncs (group_id, synced_at, run_id, members, joined, "left",
            remote_member_count, other_members, nested_groups, pages, duration_seconds, mode)
        VALUES ($group_id, $now, $run_id, $members, $joined, $left,
            $remote_count, $other, $nested, $pages, $duration, 'import')
        """,
        {
            "group_id": group_id,
            "now": now,
            "run_id": run_id,
            "members": members,
            "joined": joined,
            "left": left,
            "remote_count": group.member_count,
            "other": json.dumps(dict(sorted(staging.other_members.items()))),
            "nested": staging.other_members.get("group", 0),
            "pages": staging.pages,
            "duration": duration_seconds,
        },
    )
    conn.execute("DROP TABLE incoming")
    return SyncResult(group_id=group_id, members=members, joined=joined, left=left, synced_at=now)


def upsert_incoming_accounts(
    conn: duckdb.DuckDBPyConnection, connection: str, now: datetime, *, keep_known: bool = False
) -> None:
    """Insert or refresh the accounts in the temp table ``incoming`` (one row per account).

    ``keep_known``: a NULL in ``incoming`` keeps the stored value (a sparse listing, such as
    the members of an admin role, must not blank what a full user read stored).
    """
    # Cast: a column pandas left all-NULL arrives untyped (INTEGER), which COALESCE refuses.
    keep = "coalesce(CAST(i.{0} AS {1}), accounts.{0})" if keep_known else "i.{0}"
    details = ", ".join(
        f"{column} = {keep.format(column, kind)}"
        for column, kind in (
            ("email", "VARCHAR"),
            ("display_name", "VARCHAR"),
            ("user_principal_name", "VARCHAR"),
            ("user_type", "VARCHAR"),
            ("enabled", "BOOLEAN"),
        )
    )
    external = "(i.is_external OR accounts.is_external)" if keep_known else "i.is_external"
    conn.execute(
        f"""
        UPDATE accounts SET {details}, is_external = {external}, last_seen_at = $now
        FROM incoming AS i
        WHERE accounts.connection = $connection AND accounts.account_id = i.account_id
        """,
        {"connection": connection, "now": now},
    )
    conn.execute(
        """
        INSERT INTO accounts (connection, account_id, email, display_name, user_principal_name,
                              user_type, is_external, enabled, first_seen_at, last_seen_at)
        SELECT $connection, account_id, email, display_name, user_principal_name, user_type,
               is_external, enabled, $now, $now
        FROM incoming
        WHERE account_id NOT IN (SELECT account_id FROM accounts WHERE connection = $connection)
        """,
        {"connection": connection, "now": now},
    )


def replace_current_members(
    conn: duckdb.DuckDBPyConnection, group_id: str, connection: str, now: datetime
) -> tuple[int, int]:
    """Make the group's open intervals match the accounts in ``incoming``: (joined, left).

    Leaves close an interval at ``now`` and joins open one at ``now``; those who stayed keep
    their interval untouched.
    """
    left = conn.execute(
        """
        UPDATE group_memberships SET valid_to = $now
        WHERE group_id = $group_id AND valid_to IS NULL
          AND account_id NOT IN (SELECT account_id FROM incoming)
        """,
        {"group_id": group_id, "now": now},
    ).fetchall()[0][0]
    joined = conn.execute(
        """
        INSERT INTO group_memberships (group_id, connection, account_id, valid_from, valid_to)
        SELECT $group_id, $connection, i.account_id, $now, NULL
        FROM incoming AS i
        WHERE i.account_id NOT IN (
            SELECT account_id FROM group_memberships
            WHERE group_id = $group_id AND valid_to IS NULL
        )
        """,
        {"group_id": group_id, "connection": connection, "now": now},
    ).fetchall()[0][0]
    return int(joined), int(left)
