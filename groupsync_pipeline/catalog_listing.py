"""The groups of the connected apps as stored by the last catalog refresh, for `groupsync groups`.

A person picks a group here, then asks for it with `groupsync import-group`.
"""

from __future__ import annotations

import duckdb

from groupsync_pipeline.analyst_data import NoDataError
from groupsync_pipeline.investigation import Found
from groupsync_pipeline.sql_shell import result_frame

CATALOG_COLUMNS = ("connection", "name", "id", "kind", "people", "imported", "last_synced_at")


def find_catalog_groups(
    conn: duckdb.DuckDBPyConnection,
    *,
    connections: list[str] | None = None,
    search: str | None = None,
    imported: bool | None = None,
    limit: int = 0,
) -> Found:
    """Catalog groups by name; ``imported``: only imported (True) or not imported (False)."""
    stored = {
        row[0]
        for row in conn.execute(
            "SELECT DISTINCT connection FROM group_catalog "
            "WHERE $names IS NULL OR list_contains($names, connection)",
            {"names": connections},
        ).fetchall()
    }
    missing = sorted(set(connections or []) - stored)
    if missing or not stored:
        which = ", ".join(repr(name) for name in missing) or "any connection"
        raise NoDataError(f"no stored group catalog for {which} yet")
    params: dict[str, object] = {"names": connections, "search": search, "imported": imported}
    limit_sql = ""
    if limit:
        limit_sql = "LIMIT $limit"
        params["limit"] = limit + 1  # one more row tells whether more match
    cursor = conn.execute(
        f"""
        SELECT c.connection, c.name, c.remote_group_id AS id, c.kind,
               c.remote_member_count AS people, g.group_id IS NOT NULL AS imported,
               g.last_synced_at
        FROM group_catalog AS c
        LEFT JOIN user_groups AS g
          ON g.type = 'imported' AND g.deleted_at IS NULL
         AND g.connection = c.connection AND g.remote_group_id = c.remote_group_id
        WHERE ($names IS NULL OR list_contains($names, c.connection))
          -- contains(), not LIKE: '%' and '_' in what people type are plain characters
          AND ($search IS NULL OR contains(lower(c.name), lower($search))
               OR contains(lower(c.remote_group_id), lower($search)))
          AND ($imported IS NULL OR (g.group_id IS NOT NULL) = $imported)
        ORDER BY lower(c.name), c.name, c.connection, c.remote_group_id
        {limit_sql}
        """,
        params,
    )
    rows = cursor.fetchall()
    more = bool(limit) and len(rows) > limit
    frame = result_frame(list(CATALOG_COLUMNS), rows[:limit] if more else rows)
    return Found(frame, more)
