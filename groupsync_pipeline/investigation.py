"""Investigating activity and alerts: filters, parameterized queries, and output formats.

Used by the ``groupsync activities`` and ``groupsync alerts`` commands, the demo and tests. It
reads the analysts' data read-only and briefly (``analyst_data.open_analyst_data``), never the
private lake, so it never blocks the pipeline.

Every value a person types reaches DuckDB as a bound parameter; the SQL text is assembled only
from fixed fragments chosen by which filters are set.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from groupsync_pipeline.analyst_data import AnalystDataError, open_analyst_data
from groupsync_pipeline.connectors.base import close_matches
from groupsync_pipeline.safe_text import csv_formula_safe, for_terminal, json_for_terminal

FORMATS = ("table", "csv", "json")
SEVERITIES = ("low", "medium", "high", "critical")
TABLE_CELL_WIDTH = 40  # long object names and summaries are cut to this in tables only

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
_TIME_HELP = (
    "a duration like 30m, 24h, 7d, 2w, or a UTC date/time like 2026-11-01 or 2026-11-01T10:00Z"
)


class InvestigationError(AnalystDataError):
    """A filter cannot be applied as given; the message says what to type instead."""


class UnknownGroupError(InvestigationError):
    """A --group value names no tracked group."""

    def __init__(self, reference: str, suggestions: list[str]) -> None:
        self.reference = reference
        self.suggestions = suggestions
        hint = f"; did you mean: {', '.join(suggestions)}" if suggestions else ""
        super().__init__(f"no tracked group has the name or id {reference!r}{hint}")


# --- parsing what people type ------------------------------------------------------------


def _parse_time(text: str, now: datetime, option: str, *, end_of_day: bool) -> datetime:
    match = _DURATION.match(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2).lower()
        return now - timedelta(**{_UNITS[unit]: amount})
    stripped = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", stripped):
            day = date.fromisoformat(stripped)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            # A bare --until date means "through that day": `--since D --until D` is day D.
            return start + timedelta(days=1) if end_of_day else start
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise InvestigationError(f"{option} {text!r} is not {_TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # times without an offset are UTC, like the data
    return moment.astimezone(UTC)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """The UTC start (inclusive) for ``--since``: a duration back from ``now`` or a date/time."""
    return _parse_time(text, now or datetime.now(UTC), "--since", end_of_day=False)


def parse_until(text: str, now: datetime | None = None) -> datetime:
    """The UTC end (exclusive) for ``--until``; a bare date includes that whole day."""
    return _parse_time(text, now or datetime.now(UTC), "--until", end_of_day=True)


def parse_duration(text: str, option: str) -> timedelta:
    """A length of time as people type it for ``option``: 30s, 10m, 2h, 1d, 1w."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise InvestigationError(f"{option} {text!r} is not a duration such as 90s, 10m or 2h")
    return timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})


def parse_countries(
    codes: tuple[str, ...] | list[str], option: str = "--country"
) -> tuple[str, ...]:
    """Upper-cased ISO 3166-1 alpha-2 codes (the form activities.country holds)."""
    bad = [code for code in codes if not _COUNTRY.match(code)]
    if bad:
        raise InvestigationError(
            f"{option} {bad[0]!r} is not a two-letter ISO 3166-1 country code (e.g. US, GB, DE)"
        )
    return tuple(code.upper() for code in codes)


# --- filters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivityFilter:
    """Which activities to list. Empty tuples and None mean "no restriction"."""

    groups: tuple[str, ...] = ()  # group names (case-insensitive) or group_ids: ANY of them
    since: datetime | None = None  # occurred_at >= since
    until: datetime | None = None  # occurred_at < until
    actions: tuple[str, ...] = ()  # case-insensitive exact
    countries: tuple[str, ...] = ()  # ISO alpha-2
    countries_not: tuple[str, ...] = ()  # excluded; unknown countries are kept
    actor: str | None = None  # actor email (case-insensitive) or actor_account_id
    connection: str | None = None
    limit: int = 100  # 0: all


@dataclass(frozen=True)
class AlertFilter:
    since: datetime | None = None  # raised_at >= since
    policy: str | None = None
    severity: str | None = None
    limit: int = 100  # 0: all


@dataclass
class Found:
    """Up to ``limit`` rows, newest first, and whether more rows matched."""

    frame: pd.DataFrame
    more: bool


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise InvestigationError(
            f"--since ({since:%Y-%m-%dT%H:%M:%SZ}) must be before --until "
            f"({until:%Y-%m-%dT%H:%M:%SZ})"
        )


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise InvestigationError("--limit must be 0 (all) or more")


# --- reading the snapshot -----------------------------------------------------------------


@contextmanager
def open_snapshot(data_dir: Path, table: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """``open_analyst_data`` for ``data_dir``."""
    with open_analyst_data(data_dir, table) as conn:
        yield conn


def resolve_groups(conn: duckdb.DuckDBPyConnection, references: tuple[str, ...]) -> list[str]:
    """The group_ids the references name (a name may name several groups, in several apps)."""
    rows = conn.execute("SELECT group_id, name FROM user_groups").fetchall()
    resolved: list[str] = []
    for reference in references:
        matched = [
            group_id
            for group_id, name in rows
            if group_id == reference or name.casefold() == reference.casefold()
        ]
        if not matched:
            by_name = close_matches(reference, {f"{n} ({g})": n for g, n in rows})
            by_id = close_matches(reference, {f"{n} ({g})": g for g, n in rows})
            raise UnknownGroupError(reference, list(dict.fromkeys(by_name + by_id))[:5])
        resolved.extend(g for g in matched if g not in resolved)
    return resolved


def _utc(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """Timestamps as tz-aware UTC whatever the session time zone was."""
    for column in columns:
        series = pd.to_datetime(frame[column])
        if series.dt.tz is None:
            series = series.dt.tz_localize("UTC")
        frame[column] = series.dt.tz_convert("UTC")
    return frame


def _page(frame: pd.DataFrame, limit: int) -> Found:
    more = bool(limit) and len(frame) > limit
    return Found(frame.head(limit).reset_index(drop=True) if more else frame, more)


ACTIVITY_COLUMNS = (
    "activity_id",
    "occurred_at",
    "connection",
    "actor_email",
    "action",
    "object_name",
    "ip_address",
    "country",
    "city",
    "success",
    "groups",
)


def find_activities(conn: duckdb.DuckDBPyConnection, flt: ActivityFilter) -> Found:
    """Activities matching ``flt``, newest first, each with its tagged groups' names."""
    _check_range(flt.since, flt.until)
    _check_limit(flt.limit)
    where: list[str] = []
    params: dict[str, Any] = {}
    if flt.groups:
        params["group_ids"] = resolve_groups(conn, flt.groups)
        where.append(
            "a.activity_id IN (SELECT k.activity_id FROM _activity_group_keys AS k "
            "JOIN user_groups AS g USING (group_key) WHERE list_contains($group_ids, g.group_id))"
        )
    if flt.since is not None:
        where.append("a.occurred_at >= $since")
        params["since"] = flt.since
    if flt.until is not None:
        where.append("a.occurred_at < $until")
        params["until"] = flt.until
    if flt.actions:
        where.append("list_contains($actions, lower(a.action))")
        params["actions"] = [action.lower() for action in flt.actions]
    if flt.countries:
        where.append("list_contains($countries, upper(a.country))")
        params["countries"] = list(parse_countries(flt.countries))
    if flt.countries_not:
        # An unknown location is kept: that is exactly what an investigator wants to see.
        where.append(
            "(nullif(a.country, '') IS NULL OR NOT list_contains($countries_not, upper(a.country)))"
        )
        params["countries_not"] = list(parse_countries(flt.countries_not, "--country-not"))
    if flt.actor is not None:
        where.append("(lower(a.actor_email) = lower($actor) OR a.actor_account_id = $actor)")
        params["actor"] = flt.actor
    if flt.connection is not None:
        where.append("a.connection = $connection")
        params["connection"] = flt.connection
    limit_sql = ""
    if flt.limit:
        limit_sql = "LIMIT $limit"
        params["limit"] = flt.limit + 1  # one extra row tells whether more exist
    # Filter and cut first, then attach group names to the few rows kept: the tagged view
    # would aggregate groups for every activity in the lake.
    sql = f"""
        WITH picked AS (
            SELECT a.activity_id, a.occurred_at, a.connection, a.actor_email, a.action,
                   a.object_name, a.ip_address, a.country, a.city, a.success
            FROM activities AS a
            WHERE {" AND ".join(where) or "true"}
            ORDER BY a.occurred_at DESC, a.activity_id DESC
            {limit_sql}
        )
        SELECT p.*,
               coalesce((SELECT list(g.name ORDER BY g.name)
                         FROM _activity_group_keys AS k JOIN user_groups AS g USING (group_key)
                         WHERE k.activity_id = p.activity_id), []::VARCHAR[]) AS groups
        FROM picked AS p
        ORDER BY p.occurred_at DESC, p.activity_id DESC
    """
    frame = conn.execute(sql, params).df()
    frame = _utc(frame, ("occurred_at",))
    frame["groups"] = frame["groups"].map(list)
    return _page(frame[list(ACTIVITY_COLUMNS)], flt.limit)


ALERT_COLUMNS = (
    "raised_at",
    "policy",
    "severity",
    "actor",
    "groups",
    "activity_count",
    "first_at",
    "last_at",
    "summary",
    "alert_id",
)


def find_alerts(conn: duckdb.DuckDBPyConnection, flt: AlertFilter) -> Found:
    """Alerts matching ``flt``, newest first."""
    _check_limit(flt.limit)
    if flt.severity is not None and flt.severity not in SEVERITIES:
        raise InvestigationError(
            f"--severity {flt.severity!r} is not one of {', '.join(SEVERITIES)}"
        )
    where: list[str] = []
    params: dict[str, Any] = {}
    if flt.policy is not None:
        # Policies evaluated so far (with or without alerts): a real policy is never an error.
        known = [
            row[0]
            for row in conn.execute(
                "SELECT policy FROM alerts UNION SELECT policy FROM _policy_state"
            ).fetchall()
        ]
        if flt.policy not in known:
            # A typo would otherwise look like "no alerts": say which policies have alerts.
            near = close_matches(flt.policy, {name: name for name in known})
            hint = (
                f"did you mean: {', '.join(near)}"
                if near
                else (f"known policies: {', '.join(sorted(known)) or 'none yet'}")
            )
            raise InvestigationError(f"no policy named {flt.policy!r}; {hint}")
        where.append("policy = $policy")
        params["policy"] = flt.policy
    if flt.severity is not None:
        where.append("severity = $severity")
        params["severity"] = flt.severity
    if flt.since is not None:
        where.append("raised_at >= $since")
        params["since"] = flt.since
    limit_sql = ""
    if flt.limit:
        limit_sql = "LIMIT $limit"
        params["limit"] = flt.limit + 1
    sql = f"""
        SELECT raised_at, policy, severity, coalesce(actor_email, actor_account_id) AS actor,
               groups, activity_count, first_at, last_at, summary, alert_id
        FROM alerts
        WHERE {" AND ".join(where) or "true"}
        ORDER BY raised_at DESC, alert_id
        {limit_sql}
    """
    frame = conn.execute(sql, params).df()
    frame = _utc(frame, ("raised_at", "first_at", "last_at"))
    frame["groups"] = frame["groups"].map(list)
    return _page(frame[list(ALERT_COLUMNS)], flt.limit)


# --- output -------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _iso(value: pd.Timestamp, seconds: bool = False) -> str:
    text = value.isoformat(timespec="seconds" if seconds else "auto")
    return text.replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """A JSON-ready Python value: ISO times, lists, None for missing, ints not numpy ints."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if _is_missing(value):
        return None
    if isinstance(value, pd.Timestamp):
        return _iso(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {column: _plain(value) for column, value in row.items()} for row in frame.to_dict("records")
    ]


def to_json(frame: pd.DataFrame) -> str:
    # Exact values; characters that could drive a terminal are written as \uXXXX escapes.
    return json_for_terminal(json.dumps(to_records(frame), ensure_ascii=False, indent=2))


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        # A list in one cell as JSON text: unambiguous even when a group name holds a comma.
        return json.dumps([_plain(item) for item in value], ensure_ascii=False)
    if isinstance(value, dict):
        return json.dumps({k: _plain(v) for k, v in value.items()}, ensure_ascii=False)
    if _is_missing(value):
        return ""
    if isinstance(value, pd.Timestamp):
        return _iso(value)
    if isinstance(value, str):
        return csv_formula_safe(value)  # the only change to the data: OWASP's rule
    return value


def to_csv(frame: pd.DataFrame) -> str:
    """RFC 4180 CSV with "\n" line ends; cells exact except OWASP's formula rule."""
    buffer = io.StringIO()
    # With "\r\n" as its line end the writer quotes every cell holding a carriage return;
    # with "\n" it would write a bare \r that readers take for the end of a row.
    writer = csv.writer(buffer, lineterminator="\r\n")

    def line(values: list[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()[:-2]

    # Column names can come from the data too (a PIVOT in `groupsync sql`).
    lines = [line([csv_formula_safe(str(column)) for column in frame.columns])]
    lines += [line([_csv_value(v) for v in row]) for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _cell(column: str, value: Any) -> str:
    if isinstance(value, list):
        text = ", ".join(str(item) for item in value)
    elif _is_missing(value):
        text = ""
    elif isinstance(value, pd.Timestamp):
        text = _iso(value, seconds=True)
    elif isinstance(value, bool) or column == "success":
        text = "yes" if value else "no"
    else:
        text = str(value)
    # Data comes from outside (file names, user agents): escape codes, bidi overrides or
    # newlines in it must not drive the investigator's terminal or break the columns.
    text = for_terminal(text)
    if column in ("object_name", "summary") and len(text) > TABLE_CELL_WIDTH:
        text = text[: TABLE_CELL_WIDTH - 1] + "…"
    return text


def to_table(frame: pd.DataFrame, columns: tuple[str, ...] | None = None) -> str:
    """An aligned plain-text table (left-aligned, two spaces between columns)."""
    shown = list(columns or frame.columns)
    rows = [[_cell(c, row[c]) for c in shown] for row in frame.to_dict("records")]
    # Column names can come from the data too (a PIVOT in `groupsync sql`).
    header = [for_terminal(str(c)) for c in shown]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def render(found: Found, fmt: str, table_columns: tuple[str, ...] | None = None) -> str:
    if fmt == "json":
        return to_json(found.frame)
    if fmt == "csv":
        return to_csv(found.frame).rstrip("\n")
    if fmt == "table":
        return to_table(found.frame, table_columns)
    raise InvestigationError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def footer(found: Found, noun: str, order: str = "newest first") -> str:
    """One line for people: how many rows were shown and whether more matched (``noun`` is
    the plural: "activities", "alerts", "groups")."""
    count = len(found.frame)
    if count == 1:
        noun = "activity" if noun == "activities" else noun.removesuffix("s")
    if found.more:
        return (
            f"{count} {noun} shown, {order}; more match (--limit 0 shows all, or narrow "
            "the filters)"
        )
    return f"{count} {noun} shown (all that match)"


def import_hints(conn: duckdb.DuckDBPyConnection, flt: ActivityFilter, found: Found) -> list[str]:
    """Lines for people when a --group filter names a group imported after the window start.

    Activities are tagged with a group only from its import on (the forward-only rule), so such
    a group shows nothing before that moment, which would otherwise look like a quiet group.
    With no --since, the hint is given only when nothing matched.
    """
    if not flt.groups or (flt.since is None and len(found.frame)):
        return []
    rows = conn.execute(
        """
        SELECT name, type, imported_at FROM user_groups
        WHERE list_contains($group_ids, group_id) AND imported_at IS NOT NULL
          AND ($since IS NULL OR imported_at > $since)
        ORDER BY imported_at, name
        """,
        {"group_ids": resolve_groups(conn, flt.groups), "since": flt.since},
    ).fetchall()
    return [
        f"{for_terminal(name)} was {'created' if kind == 'automatic' else 'imported'} at "
        f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC; activities are tagged with it only from "
        "then on"
        for name, kind, at in rows
    ]
