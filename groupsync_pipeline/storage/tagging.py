"""Tag activities with the groups their actor belonged to, from the membership history.

The rule, applied once per activity when it is first tagged and never revisited:

    an activity is tagged with group G when
        the actor had a membership interval in G with valid_from <= occurred_at < valid_to
        (valid_to NULL: still a member), and
        G's imported_at (automatic groups: when groupsync created it) <= occurred_at.

Intervals are half-open, so a join at exactly the activity's time tags it and a leave at
exactly that time does not; an import committed at exactly that time tags it. History is what
groupsync knew: intervals open and close when a sync commits, not when the app changed.

Tagging is incremental: activities with an id above ``_tagging_state.tagged_through`` are
tagged in one set-based INSERT ... SELECT (a hash join on the actor, then the interval test),
so no Python touches a row. Tags are stored by the group's integer ``group_key``; the view
``activity_groups`` shows them by ``group_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

# One statement. The memberships that overlap the batch's time span (with their group's key and
# import time) are materialized first and the new activities joined to them by actor, then the
# interval test: inside the write transaction the new rows have no statistics, and left to
# itself the planner joined user_groups to the activities on imported_at <= occurred_at first
# (26.6M intermediate rows for 20,000 activities: 29 s instead of 0.5 s, bench/scale.py).
# coalesce(valid_to, 'infinity') keeps the predicate a plain range test (no OR).
_TAG_SQL = """
INSERT INTO _activity_group_keys (activity_id, group_key, occurred_on)
WITH m AS MATERIALIZED (
    SELECT m.connection, m.account_id, m.valid_from,
           coalesce(m.valid_to, 'infinity'::TIMESTAMPTZ) AS valid_to, g.group_key, g.imported_at
    FROM group_memberships AS m
    JOIN user_groups AS g ON g.group_id = m.group_id
    WHERE m.valid_from <= $latest AND coalesce(m.valid_to, 'infinity'::TIMESTAMPTZ) > $earliest
      AND g.imported_at <= $latest
)
SELECT a.activity_id, m.group_key, {utc_day}
FROM activities AS a
JOIN m
  ON m.connection = a.connection
 AND m.account_id = a.actor_account_id
 AND m.valid_from <= a.occurred_at
 AND a.occurred_at < m.valid_to
 AND m.imported_at <= a.occurred_at
WHERE a.activity_id > $after AND a.activity_id <= $through
"""
# The UTC day of a TIMESTAMPTZ by arithmetic on its microseconds: `(ts AT TIME ZONE 'UTC')::DATE`
# goes through ICU's time zones and cost 5.6 s of the 10.2 s it took to tag 10M activities
# (41.7M tags, bench/tagging.py); this costs 0.2 s. floor, not //: a day before 1970 too.
UTC_DAY = "('1970-01-01'::DATE + floor(epoch_us({ts}) / 86400000000)::INTEGER)"
_TAG_SQL = _TAG_SQL.format(utc_day=UTC_DAY.format(ts="a.occurred_at"))


@dataclass(frozen=True)
class TaggingResult:
    activities: int  # activities tagged in this call (with or without any group)
    tags: int  # (activity, group) rows written
    tagged_through: int  # the highest activity_id tagged so far


def tagged_through(conn: duckdb.DuckDBPyConnection) -> int:
    row = conn.execute("SELECT max(tagged_through) FROM _tagging_state").fetchall()[0]
    return int(row[0] or 0)


def tag_new_activities(conn: duckdb.DuckDBPyConnection) -> TaggingResult:
    """Tag the activities not tagged yet. Runs inside the caller's transaction."""
    after = tagged_through(conn)
    through, count, earliest, latest = conn.execute(
        "SELECT max(activity_id), count(*), min(occurred_at), max(occurred_at) FROM activities"
        " WHERE activity_id > $after",
        {"after": after},
    ).fetchall()[0]
    if not count:
        return TaggingResult(0, 0, after)
    tags = conn.execute(
        _TAG_SQL,
        {"after": after, "through": through, "earliest": earliest, "latest": latest},
    ).fetchall()[0][0]
    conn.execute("DELETE FROM _tagging_state")
    conn.execute("INSERT INTO _tagging_state VALUES ($through)", {"through": through})
    return TaggingResult(int(count), int(tags), int(through))
