"""Asset checks on imported memberships and audit-log reads, read from the lake."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.activity_assets import activities
from groupsync_pipeline.defs.assets import imported_group_members
from groupsync_pipeline.defs.resources import LakeResource

# Each imported group's current member count against the app's own count at its last sync.
_COUNT_MISMATCHES = """
SELECT g.group_id, g.name, g.member_count, s.remote_member_count
FROM user_groups AS g
JOIN (SELECT group_id, arg_max_null(remote_member_count, synced_at) AS remote_member_count
      FROM group_syncs GROUP BY group_id) AS s USING (group_id)
WHERE g.type = 'imported' AND g.deleted_at IS NULL
  AND s.remote_member_count IS NOT NULL AND s.remote_member_count <> g.member_count
ORDER BY g.name
"""

_DUPLICATE_MEMBERS = """
SELECT group_id, account_id, count(*) AS open_intervals
FROM group_memberships WHERE valid_to IS NULL
GROUP BY group_id, account_id HAVING count(*) > 1
ORDER BY group_id, account_id
"""


@dg.asset_check(
    asset=imported_group_members,
    description="Every imported group holds as many members as the app reported.",
)
def member_count_matches_remote(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.get().read() as conn:
        rows = conn.execute(_COUNT_MISMATCHES).fetchall()
        groups = conn.execute("SELECT count(*) FROM user_groups WHERE type = 'imported'").fetchall()
    return dg.AssetCheckResult(
        passed=not rows,
        metadata={
            "groups_checked": groups[0][0],
            "mismatches": dg.MetadataValue.json(
                [
                    {"group_id": r[0], "name": r[1], "stored": r[2], "remote": r[3]}
                    for r in rows[:50]
                ]
            ),
        },
    )


@dg.asset_check(
    asset=imported_group_members,
    description="No account is a current member of the same group twice.",
)
def no_duplicate_members(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.get().read() as conn:
        rows = conn.execute(_DUPLICATE_MEMBERS).fetchall()
    return dg.AssetCheckResult(
        passed=not rows,
        metadata={
            "duplicates": len(rows),
            "examples": dg.MetadataValue.json(
                [{"group_id": r[0], "account_id": r[1], "open_intervals": r[2]} for r in rows[:20]]
            ),
        },
    )


_HELD_SHRINKS = """
SELECT h.group_id, g.name, h.detected_at, h.mode, h.members_before, h.members_after, h."left"
FROM membership_holds AS h JOIN user_groups AS g USING (group_id)
WHERE h.status = 'held' ORDER BY h.detected_at
"""


@dg.asset_check(
    asset=imported_group_members,
    description="No group has a sync held back for losing too many members at once "
    "(confirm with `groupsync confirm-shrink GROUP`, or the next full sync decides).",
)
def no_held_shrinks(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.get().read() as conn:
        rows = conn.execute(_HELD_SHRINKS).fetchall()
    return dg.AssetCheckResult(
        passed=not rows,
        metadata={
            "held_groups": len(rows),
            "holds": dg.MetadataValue.json(
                [
                    {
                        "group_id": r[0],
                        "name": r[1],
                        "detected_at": r[2].isoformat(),
                        "seen_by": r[3],
                        "members_before": r[4],
                        "members_after": r[5],
                        "would_remove": r[6],
                    }
                    for r in rows[:50]
                ]
            ),
        },
    )


@dg.asset_check(
    asset=activities,
    description="Every audit log (and the admin-role and domain reads) was read by the last "
    "activity ingest; a failing one keeps its place and is read again next time.",
)
def audit_logs_read(lake: LakeResource) -> dg.AssetCheckResult:
    with lake.get().read() as conn:
        failing = conn.execute(
            "SELECT connection, source, last_error, last_error_at, read_until "
            "FROM activity_sources_state WHERE last_error IS NOT NULL ORDER BY 1, 2"
        ).fetchall()
        sources = conn.execute("SELECT count(*) FROM activity_sources_state").fetchall()[0][0]
    return dg.AssetCheckResult(
        passed=not failing,
        metadata={
            "reads_checked": sources,
            "failing": dg.MetadataValue.json(
                [
                    {
                        "connection": connection,
                        "source": source,
                        "error": error,
                        "since": str(when),
                        "events_read_until": str(until) if until else None,
                    }
                    for connection, source, error, when, until in failing
                ]
            ),
        },
    )
