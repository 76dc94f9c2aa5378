"""Hostile text (group names, file names, errors) is harmless in every output of the CLI.

Human-readable output shows control, bidi and invisible characters as visible escapes (one
shared function, ``safe_text.for_terminal``); JSON stays exact; CSV stays exact except OWASP's
rule against formula injection. Everything runs through the real command on real files.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from groupsync_pipeline.cli import main
from groupsync_pipeline.safe_text import (
    csv_formula_safe,
    for_terminal,
    is_unsafe,
    json_for_terminal,
)
from groupsync_pipeline.storage.control import ControlStore, NewRequest
from groupsync_pipeline.storage.lake import Lake

# An OSC title sequence, a forged row and column, a right-to-left override and a C1 CSI.
EVIL = "\x1b]0;owned\x07HR\nforged\trow\u202etxt.exe\x9b31m\u2066x\u2069\x7f"
FORMULAS = ['=HYPERLINK("http://evil.example","click")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
T = datetime(2026, 11, 1, tzinfo=UTC)
GROUPSYNC = str(Path(sys.executable).with_name("groupsync"))  # the installed command


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def unsafe_in(text: str, allowed: str = "\n") -> list[str]:
    return sorted({repr(c) for c in text if is_unsafe(c) and c not in allowed})


# --- the shared function ------------------------------------------------------------------


def test_for_terminal_shows_every_dangerous_character_as_an_escape() -> None:
    shown = for_terminal(EVIL)
    assert unsafe_in(shown, allowed="") == []
    assert shown == (
        "\\x1b]0;owned\\x07HR\\nforged\\trow\\u202etxt.exe\\x9b31m\\u2066x\\u2069\\x7f"
    )
    for char in "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u2067\u2068\u200b\ufeff\u2028":
        assert for_terminal(f"a{char}b") == f"a\\u{ord(char):04x}b"
    assert for_terminal("\U000e0041") == "\\U000e0041"  # a tag character (invisible)
    assert for_terminal("line 1\nline\t2", keep_newlines=True) == "line 1\nline\\t2"
    plain = 'Ops "Night" O\'Brien & <Co> — ünïcødé 🚀 日本'
    assert for_terminal(plain) == plain


def test_json_for_terminal_is_exact_and_inert() -> None:
    value = {"name": EVIL, "astral": "a\U000e0041b", "fine": "ünïcødé 🚀"}
    text = json_for_terminal(json.dumps(value, ensure_ascii=False, indent=2))
    assert json.loads(text) == value
    assert unsafe_in(text) == []
    assert "ünïcødé 🚀" in text


def test_csv_formula_rule() -> None:
    for cell in FORMULAS:
        assert csv_formula_safe(cell) == "'" + cell
    for cell in ("plain", "a=b", " =1", "'quoted", ""):
        assert csv_formula_safe(cell) == cell


# --- activities and alerts ----------------------------------------------------------------


@pytest.fixture(scope="module")
def investigation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("hostile")
    objects = [EVIL, *FORMULAS, "in\rside"]
    with Lake(data_dir).write() as conn:
        conn.execute(
            "INSERT INTO user_groups (group_id, name, type, member_count, group_key) "
            "VALUES ('c:evil', ?, 'imported', 1, 1)",
            [EVIL],
        )
        for index, name in enumerate(objects, 1):
            conn.execute(
                """
                INSERT INTO activities (activity_id, connection, app, source, event_id,
                    occurred_at, actor_account_id, actor_email, action, object_name,
                    ip_address, country, city, success, raw, ingested_at)
                VALUES (?, 'c', 'office365', 'Audit.SharePoint', ?, ?, 'acc', ?,
                        'FileAccessed', ?, '203.0.113.7', 'US', ?, true, '{}', ?)
                """,
                [index, f"e{index}", T + timedelta(minutes=index), "=cmd|' /C calc'!A0",
                 name, EVIL, T],
            )  # fmt: skip
            conn.execute(
                "INSERT INTO _activity_group_keys SELECT a.activity_id, g.group_key,"
                " (a.occurred_at AT TIME ZONE 'UTC')::DATE FROM activities AS a, user_groups AS g"
                " WHERE a.activity_id = ? AND g.group_id = 'c:evil'",
                [index],
            )
        conn.execute(
            """
            INSERT INTO alerts (alert_id, policy, severity, raised_at, connection, actor_email,
                groups, activity_ids, activity_count, first_at, last_at, summary)
            VALUES ('a1', ?, 'high', ?, 'c', '@evil', [?], [1], 1, ?, ?, ?)
            """,
            [EVIL, T, EVIL, T, T, "+" + EVIL],
        )
    return data_dir


def test_tables_show_hostile_text_as_escapes(investigation_dir: Path) -> None:
    for command in ("activities", "alerts"):
        result = run(command, "--limit", "0", "--data-dir", str(investigation_dir))
        assert result.exit_code == 0, result.output
        assert unsafe_in(result.stdout) == [], command
        rows = 8 if command == "activities" else 1
        assert len(result.stdout.splitlines()) == 1 + rows  # no forged rows
        assert "\\x1b]0;owned\\x07HR\\nforged" in result.stdout


def test_csv_neutralizes_formulas_and_stays_valid(investigation_dir: Path) -> None:
    result = run(
        "activities", "--format", "csv", "--limit", "0", "--data-dir", str(investigation_dir)
    )
    assert result.exit_code == 0, result.output
    # Python's csv reader is strict about a bare carriage return outside quotes.
    rows = list(csv.DictReader(io.StringIO(result.stdout, newline=""), strict=True))
    assert len(rows) == 8
    names = {row["object_name"] for row in rows}
    assert names == {EVIL, "in\rside", *("'" + f for f in FORMULAS)}
    assert {row["actor_email"] for row in rows} == {"'=cmd|' /C calc'!A0"}
    assert {row["city"] for row in rows} == {EVIL}
    assert {row["groups"] for row in rows} == {json.dumps([EVIL], ensure_ascii=False)}
    assert rows[0]["occurred_at"] == "2026-11-01T00:08:00Z"

    alerts = run("alerts", "--format", "csv", "--data-dir", str(investigation_dir))
    (alert,) = list(csv.DictReader(io.StringIO(alerts.stdout, newline=""), strict=True))
    assert alert["actor"] == "'@evil" and alert["summary"] == "'+" + EVIL
    assert alert["policy"] == EVIL


def test_json_is_exact_and_inert(investigation_dir: Path) -> None:
    result = run(
        "activities", "--format", "json", "--limit", "0", "--data-dir", str(investigation_dir)
    )
    assert result.exit_code == 0, result.output
    assert unsafe_in(result.stdout) == []
    rows = json.loads(result.stdout)
    assert {row["object_name"] for row in rows} == {EVIL, "in\rside", *FORMULAS}
    assert rows[0]["groups"] == [EVIL]


# --- import requests ----------------------------------------------------------------------


@pytest.fixture
def requests_dir(tmp_path: Path) -> Path:
    store = ControlStore(tmp_path)
    (first, second) = store.add_requests(
        [
            NewRequest("sandbox", "g1", "g1", EVIL, None),
            NewRequest("sandbox", "=1+1", None, None, None),
        ]
    )
    store.mark_failed(first, f"Graph said: {EVIL}\nsecond line")
    return tmp_path


def test_requests_listing_neutralizes_names_and_errors(requests_dir: Path) -> None:
    # A real process with its output piped: an OSC sequence must not survive.
    done = subprocess.run(
        [GROUPSYNC, "requests", "--data-dir", str(requests_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert unsafe_in(done.stdout, allowed="\n\t") == []
    lines = done.stdout.splitlines()
    assert len(lines) == 3  # header and two requests: nothing forged
    assert all(line.count("\t") == 7 for line in lines)
    failed = lines[2].split("\t")
    assert failed[3] == for_terminal(EVIL)
    # The table shows an error's first line; the name inside it is neutralized too.
    assert failed[7] == for_terminal("Graph said: \x1b]0;owned\x07HR")


def test_requests_machine_formats_are_exact(requests_dir: Path) -> None:
    out = run("requests", "--format", "json", "--data-dir", str(requests_dir))
    assert out.exit_code == 0, out.output
    assert unsafe_in(out.stdout) == []
    newest, oldest = json.loads(out.stdout)
    assert oldest["group_name"] == EVIL and oldest["status"] == "failed"
    assert oldest["error"] == f"Graph said: {EVIL}\nsecond line"
    assert newest["group_reference"] == "=1+1" and newest["group_name"] is None
    assert oldest["requested_at"].endswith("Z")

    out = run("requests", "--format", "csv", "--data-dir", str(requests_dir))
    assert out.exit_code == 0, out.output
    newest, oldest = list(csv.DictReader(io.StringIO(out.stdout, newline=""), strict=True))
    assert oldest["group_name"] == EVIL and newest["group_reference"] == "'=1+1"
    assert oldest["error"] == f"Graph said: {EVIL}\nsecond line"


# --- error messages -----------------------------------------------------------------------


def test_error_naming_a_hostile_group_is_neutralized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GROUPSYNC_CONNECTIONS", raising=False)
    with Lake(tmp_path).write() as conn:
        conn.execute(
            "INSERT INTO group_catalog (app, connection, remote_group_id, name, seen_at) "
            "VALUES ('office365', 'sandbox', 'g1', ?, now())",
            ["Payroll team" + EVIL],
        )
    result = run(
        "import-group", "--connection", "sandbox", "--group", "Payroll tea",
        "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "did you mean: Payroll team\\x1b]0;owned" in result.output
    assert unsafe_in(result.output) == []
