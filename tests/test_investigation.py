"""`groupsync activities` and `groupsync alerts` against a real published lake."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from groupsync_pipeline.cli import main
from groupsync_pipeline.investigation import (
    ActivityFilter,
    InvestigationError,
    find_activities,
    open_snapshot,
    parse_since,
    parse_until,
)
from groupsync_pipeline.storage.lake import Lake

T = datetime(2026, 11, 1, tzinfo=UTC)
EVIL_ACTOR = "'; DROP TABLE activities; --"
EVIL_OBJECT = '100% "quoted"; DELETE FROM activities; \x1b[31mred'
EVIL_GROUP = 'O\'Brien "Team"; DROP TABLE user_groups; --%'
LONG_NAME = "quarterly-report-" + "x" * 70 + ".xlsx"

GROUPS = [
    ("sandbox:g-fin", "Finance"),
    ("sandbox:g-hr", "HR"),
    ("sandbox:g-eng", "Engineering"),
    ("other:g-evil", EVIL_GROUP),
]
# (id, connection, occurred_at, account id, email, action, object, country, city, success, groups)
ACTIVITIES = [
    (1, "sandbox", T + timedelta(hours=9), "acc-alice", "alice@contoso.com", "FileAccessed",
     "budget.xlsx", "US", "Seattle", True, ["sandbox:g-fin"]),
    (2, "sandbox", T + timedelta(hours=10), "acc-bob", "bob@contoso.com", "FileDownloaded",
     "salaries.csv", "GB", "London", True, ["sandbox:g-hr", "sandbox:g-fin"]),
    (3, "sandbox", T + timedelta(hours=23, minutes=59, seconds=59), "acc-carol",
     "carol@contoso.com", "Sign-in", None, None, None, False, ["sandbox:g-eng"]),
    (4, "sandbox", T + timedelta(days=1), "acc-alice", "Alice@Contoso.com", "FileDownloaded",
     LONG_NAME, "DE", "Berlin", None, []),
    (5, "other", T + timedelta(days=1, hours=12), "acc-evil", EVIL_ACTOR, "Sign-in",
     EVIL_OBJECT, "US", "Boston", True, ["other:g-evil"]),
]  # fmt: skip


def _build(data_dir: Path) -> None:
    with Lake(data_dir).write() as conn:
        conn.executemany(
            "INSERT INTO user_groups (group_id, name, type, member_count, group_key) "
            "VALUES (?, ?, 'imported', 1,"
            " (SELECT coalesce(max(group_key), 0) + 1 FROM user_groups))",
            GROUPS,
        )
        for row in ACTIVITIES:
            activity_id, connection, at, account, email, action, obj, country, city, ok, tags = row
            conn.execute(
                """
                INSERT INTO activities (activity_id, connection, app, source, event_id,
                    occurred_at, actor_account_id, actor_email, action, object_name, ip_address,
                    country, city, success, raw, ingested_at)
                VALUES (?, ?, 'office365', 'signIns', ?, ?, ?, ?, ?, ?, '203.0.113.7', ?, ?, ?,
                        '{}', ?)
                """,
                [activity_id, connection, f"e{activity_id}", at, account, email, action, obj,
                 country, city, ok, at],
            )  # fmt: skip
            for group_id in tags:
                conn.execute(
                    "INSERT INTO _activity_group_keys SELECT a.activity_id, g.group_key,"
                    " (a.occurred_at AT TIME ZONE 'UTC')::DATE FROM activities AS a,"
                    " user_groups AS g WHERE a.activity_id = ? AND g.group_id = ?",
                    [activity_id, group_id],
                )
        conn.execute("INSERT INTO _policy_state VALUES ('quiet-policy', 5, 'h')")
        conn.executemany(
            """
            INSERT INTO alerts (alert_id, policy, severity, raised_at, connection, actor_email,
                groups, activity_ids, activity_count, first_at, last_at, summary)
            VALUES (?, ?, ?, ?, 'sandbox', ?, ?, ?, ?, ?, ?, ?)
            """,
            [
                ("a1", "mass-download", "high", T + timedelta(hours=11), "bob@contoso.com",
                 ["Finance", "HR"], [2], 1, T + timedelta(hours=10), T + timedelta(hours=10),
                 "bob downloaded 1 file"),
                ("a2", "foreign-sign-in", "medium", T + timedelta(days=2), EVIL_ACTOR,
                 [EVIL_GROUP], [5], 1, T + timedelta(days=1, hours=12),
                 T + timedelta(days=1, hours=12), "sign-in from an unusual place"),
            ],
        )  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("investigation")
    _build(path)
    return path


def run(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)])


def ids(data_dir: Path, *args: str) -> list[int]:
    """The activity ids the command lists, in order (read from its json output)."""
    result = run(data_dir, "activities", "--format", "json", "--limit", "0", *args)
    assert result.exit_code == 0, result.output
    return [row["activity_id"] for row in json.loads(result.stdout)]


def test_lists_everything_newest_first(data_dir: Path) -> None:
    assert ids(data_dir) == [5, 4, 3, 2, 1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--group", "finance"), [2, 1]),  # name, any case
        (("--group", "sandbox:g-eng"), [3]),  # group id
        (("--group", "HR", "--group", "Engineering"), [3, 2]),  # any of two groups
        (("--group", EVIL_GROUP), [5]),
        (("--action", "filedownloaded"), [4, 2]),
        (("--action", "Sign%"), []),  # `%` is a character, not a LIKE wildcard
        (("--action", "Sign-in", "--action", "FileAccessed"), [5, 3, 1]),
        (("--country", "us"), [5, 1]),
        (("--country-not", "US"), [4, 3, 2]),  # 3 has no known country: kept
        (("--country-not", "US", "--country-not", "GB"), [4, 3]),
        (("--as", "ALICE@contoso.com"), [4, 1]),
        (("--as", "acc-bob"), [2]),
        (("--as", EVIL_ACTOR), [5]),
        (("--connection", "other"), [5]),
        (("--group", "Finance", "--country", "GB"), [2]),  # filters combine with AND
    ],
)
def test_filters(data_dir: Path, args: tuple[str, ...], expected: list[int]) -> None:
    assert ids(data_dir, *args) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--since", "2026-11-01T10:00Z"), [5, 4, 3, 2]),  # since is inclusive
        (("--until", "2026-11-01T10:00:00+00:00"), [1]),  # until is exclusive
        (("--since", "2026-11-01T10:00Z", "--until", "2026-11-02T00:00Z"), [3, 2]),
        (("--since", "2026-11-01", "--until", "2026-11-01"), [3, 2, 1]),  # the whole day
        (("--since", "2026-11-01T11:00+01:00", "--until", "2026-11-01T10:00:01"), [2]),
        (("--since", "100000d"), [5, 4, 3, 2, 1]),
        (("--until", "100000d"), []),
    ],
)
def test_time_window(data_dir: Path, args: tuple[str, ...], expected: list[int]) -> None:
    assert ids(data_dir, *args) == expected


def test_parse_durations_and_dates() -> None:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-01", now) == T
    assert parse_until("2026-11-01", now) == T + timedelta(days=1)
    assert parse_since("2026-11-01T10:00Z", now) == T + timedelta(hours=10)
    for bad in ("7x", "-3d", "d", "yesterday", "2026-13-01", ""):
        with pytest.raises(InvestigationError, match="duration like 30m"):
            parse_since(bad, now)


def test_limit_and_footer(data_dir: Path) -> None:
    limited = run(data_dir, "activities", "--limit", "2")
    assert limited.exit_code == 0, limited.output
    lines = limited.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("occurred_at")  # header + 2 rows
    assert "2026-11-02T12:00:00Z" in lines[1] and "2026-11-02T00:00:00Z" in lines[2]
    assert "2 activities shown, newest first; more match" in limited.stderr

    exact = run(data_dir, "activities", "--limit", "5")
    assert "5 activities shown (all that match)" in exact.stderr
    every = run(data_dir, "activities", "--limit", "0")
    assert len(every.stdout.splitlines()) == 6 and "all that match" in every.stderr
    assert ids(data_dir, "--limit", "0") == [5, 4, 3, 2, 1]

    negative = run(data_dir, "activities", "--limit", "-1")
    assert negative.exit_code == 2


def test_table_cuts_long_names_and_neutralizes_control_characters(data_dir: Path) -> None:
    table = run(data_dir, "activities")
    assert table.exit_code == 0, table.output
    assert LONG_NAME not in table.stdout and LONG_NAME[:30] in table.stdout
    assert "…" in table.stdout
    assert "\x1b" not in table.stdout  # an escape code in a file name does not reach the tty
    assert "HR, Finance" not in table.stdout and "Finance, HR" in table.stdout
    header = table.stdout.splitlines()[0]
    assert header.split() == [
        "occurred_at", "connection", "actor_email", "action", "object_name", "ip_address",
        "country", "city", "success", "groups",
    ]  # fmt: skip


def test_csv_and_json_parse_and_keep_data_whole(data_dir: Path) -> None:
    csv = run(data_dir, "activities", "--format", "csv")
    assert csv.exit_code == 0, csv.output
    assert csv.stderr == ""  # no footer mixed into machine output
    frame = pd.read_csv(io.StringIO(csv.stdout))
    assert list(frame["activity_id"]) == [5, 4, 3, 2, 1]
    assert frame.loc[0, "object_name"] == EVIL_OBJECT
    assert frame.loc[0, "actor_email"] == EVIL_ACTOR
    assert frame.loc[1, "object_name"] == LONG_NAME  # cut in tables only
    assert frame.loc[3, "occurred_at"] == "2026-11-01T10:00:00Z"
    assert json.loads(frame.loc[3, "groups"]) == ["Finance", "HR"]

    out = run(data_dir, "activities", "--format", "json")
    assert out.exit_code == 0 and out.stderr == ""
    rows = json.loads(out.stdout)
    assert rows[0]["object_name"] == EVIL_OBJECT and rows[0]["groups"] == [EVIL_GROUP]
    assert rows[1]["groups"] == [] and rows[1]["success"] is None
    assert rows[2]["country"] is None and rows[2]["success"] is False
    assert rows[3] | {"groups": None} == {
        "activity_id": 2,
        "occurred_at": "2026-11-01T10:00:00Z",
        "connection": "sandbox",
        "actor_email": "bob@contoso.com",
        "action": "FileDownloaded",
        "object_name": "salaries.csv",
        "ip_address": "203.0.113.7",
        "country": "GB",
        "city": "London",
        "success": True,
        "groups": None,
    }
    assert rows[3]["groups"] == ["Finance", "HR"]


def test_unknown_group_suggests_close_names(data_dir: Path) -> None:
    result = run(data_dir, "activities", "--group", "Finanse")
    assert result.exit_code == 1
    assert "no tracked group has the name or id 'Finanse'" in result.output
    assert "did you mean: Finance (sandbox:g-fin)" in result.output

    result = run(data_dir, "activities", "--group", "HR", "--group", "nothing-like-it")
    assert result.exit_code == 1 and "'nothing-like-it'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "7x"), "--since '7x' is not a duration like 30m"),
        (("--until", "last week"), "--until 'last week' is not a duration like 30m"),
        (("--country", "USA"), "--country 'USA' is not a two-letter ISO 3166-1 country code"),
        (("--country-not", "1"), "--country-not '1' is not a two-letter"),
        (
            ("--since", "2026-11-02", "--until", "2026-11-01T12:00Z"),
            "--since (2026-11-02T00:00:00Z) must be before",
        ),
    ],
)
def test_bad_input_is_a_clear_error(data_dir: Path, args: tuple[str, ...], message: str) -> None:
    result = run(data_dir, "activities", *args)
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output


def test_hostile_strings_leave_the_warehouse_intact(data_dir: Path) -> None:
    for args in (("--as", EVIL_ACTOR), ("--group", EVIL_GROUP), ("--action", "x'); --;%")):
        assert run(data_dir, "activities", *args).exit_code == 0
    with open_snapshot(data_dir, "activities") as conn:
        assert conn.execute("SELECT count(*) FROM activities").fetchall() == [(5,)]
        assert conn.execute("SELECT count(*) FROM user_groups").fetchall() == [(4,)]


def test_no_data_is_a_clear_error(tmp_path: Path) -> None:
    missing = run(tmp_path / "empty", "activities")
    assert missing.exit_code == 1
    assert "no data yet" in missing.output and "does not exist" in missing.output


def test_a_write_in_progress_neither_blocks_nor_shows_in_a_reading(data_dir: Path) -> None:
    before = run(data_dir, "activities", "--format", "json", "--limit", "0")
    with Lake(data_dir).write() as conn:  # holds the writer lock and an open transaction
        conn.execute(
            "INSERT INTO activities (activity_id, connection, app, source, event_id, occurred_at,"
            " action, ingested_at) VALUES (99, 'contoso', 'office365', 'signIns', 'e99', now(),"
            " 'Sign-in', now())"
        )
        during = run(data_dir, "activities", "--format", "json", "--limit", "0")
        assert during.exit_code == 0 and during.stdout == before.stdout
    after = run(data_dir, "activities", "--format", "json", "--limit", "0")
    assert 99 in [row["activity_id"] for row in json.loads(after.stdout)]


def test_find_activities_from_python(data_dir: Path) -> None:
    with open_snapshot(data_dir, "activities") as conn:
        found = find_activities(conn, ActivityFilter(groups=("Finance",), limit=1))
    assert found.more and list(found.frame["activity_id"]) == [2]
    moment = found.frame.loc[0, "occurred_at"]
    assert moment == pd.Timestamp("2026-11-01T10:00Z") and str(moment.tz) == "UTC"


def alert_ids(data_dir: Path, *args: str) -> list[str]:
    result = run(data_dir, "alerts", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return [row["alert_id"] for row in json.loads(result.stdout)]


def test_alerts(data_dir: Path) -> None:
    assert alert_ids(data_dir) == ["a2", "a1"]
    assert alert_ids(data_dir, "--severity", "high") == ["a1"]
    assert alert_ids(data_dir, "--policy", "foreign-sign-in") == ["a2"]
    assert alert_ids(data_dir, "--since", "2026-11-02") == ["a2"]
    assert alert_ids(data_dir, "--since", "100000d", "--severity", "critical") == []

    rows = json.loads(run(data_dir, "alerts", "--format", "json").stdout)
    assert rows[1]["groups"] == ["Finance", "HR"] and rows[1]["first_at"] == "2026-11-01T10:00:00Z"
    assert rows[0]["actor"] == EVIL_ACTOR

    table = run(data_dir, "alerts", "--limit", "1")
    assert table.exit_code == 0
    assert "mass-download" not in table.stdout and "foreign-sign-in" in table.stdout
    assert "1 alert shown, newest first; more match" in table.stderr
    frame = pd.read_csv(io.StringIO(run(data_dir, "alerts", "--format", "csv").stdout))
    assert list(frame["policy"]) == ["foreign-sign-in", "mass-download"]

    typo = run(data_dir, "alerts", "--policy", "mass-downlaod")
    assert typo.exit_code == 1 and "did you mean: mass-download" in typo.output
    assert "no policy named 'mass-downlaod'" in typo.output
    quiet = run(data_dir, "alerts", "--policy", "quiet-policy")  # evaluated, raised nothing
    assert quiet.exit_code == 0 and "0 alerts shown" in quiet.stderr
    bad = run(data_dir, "alerts", "--severity", "urgent")
    assert bad.exit_code == 2
