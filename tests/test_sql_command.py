"""`groupsync sql`: read-only SQL on the analysts' data, one-shot and as a prompt."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner, Result

from groupsync_pipeline.cli import main
from groupsync_pipeline.storage.lake import Lake

from .pipeline_helpers import query

T = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)
HOSTILE = "evil\x1b[31mred\x07"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    with Lake(folder).write() as conn:
        conn.execute(
            "INSERT INTO user_groups (group_id, name, type, imported_at, member_count, group_key)"
            " VALUES ('c:hr', 'HR', 'imported', $t, 2, 1),"
            " ('c:fin', 'Finance', 'imported', $t, 1, 2), "
            "('c:x', $hostile, 'imported', $t, 0, 3)",
            {"t": T, "hostile": HOSTILE},
        )
        conn.execute(
            "INSERT INTO group_memberships VALUES ('c:hr', 'c', 'a1', $t, NULL), "
            "('c:hr', 'c', 'a2', $t, NULL), ('c:fin', 'c', 'a1', $t, $t + INTERVAL 1 HOUR)",
            {"t": T},
        )
    return folder


def sql(data_dir: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["sql", "--data-dir", str(data_dir), *args], input=stdin)


def test_one_shot_query_in_each_format(data_dir: Path) -> None:
    q = (
        "SELECT name, member_count, imported_at, [name, 'x'] AS tags FROM user_groups "
        "WHERE name IN ('HR', 'Finance') ORDER BY name"
    )
    table = sql(data_dir, q)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["name", "member_count", "imported_at", "tags"]
    assert lines[1].split() == ["Finance", "1", "2026-11-01T09:30:00Z", "Finance,", "x"]
    assert "2 rows" in table.stderr

    rows = json.loads(sql(data_dir, q, "--format", "json").stdout)
    assert rows == [
        {"name": "Finance", "member_count": 1, "imported_at": "2026-11-01T09:30:00Z",
         "tags": ["Finance", "x"]},
        {"name": "HR", "member_count": 2, "imported_at": "2026-11-01T09:30:00Z",
         "tags": ["HR", "x"]},
    ]  # fmt: skip

    csv = sql(data_dir, q, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    frame = pd.read_csv(io.StringIO(csv.stdout))
    assert list(frame["name"]) == ["Finance", "HR"]
    assert list(frame["imported_at"]) == ["2026-11-01T09:30:00Z"] * 2
    assert json.loads(frame["tags"][1]) == ["HR", "x"]


def test_nulls_and_several_statements(data_dir: Path) -> None:
    # An open interval is NULL: empty in a table and csv, null in json, never NaN or NaT.
    q = "SELECT account_id, valid_to FROM group_memberships WHERE group_id = 'c:hr' ORDER BY 1"
    table = sql(data_dir, q)
    assert "NaT" not in table.output and "nan" not in table.output.lower()
    assert json.loads(sql(data_dir, q, "--format", "json").stdout)[0] == {
        "account_id": "a1",
        "valid_to": None,
    }
    # Integers with a NULL stay integers (no 2.0).
    counts = sql(data_dir, "SELECT * FROM (VALUES (1, 2), (3, NULL)) AS t(a, n)", "--format", "csv")
    assert counts.stdout.splitlines() == ["a,n", "1,2", "3,"]
    # Several statements: the last one's result is shown.
    last = sql(data_dir, "SELECT 1 AS first; SELECT 41 + 1 AS answer;", "--format", "json")
    assert json.loads(last.stdout) == [{"answer": 42}]


def test_a_failing_query_is_one_clear_line_and_exit_1(data_dir: Path) -> None:
    typo = sql(data_dir, "SELEC name FROM user_groups")
    assert typo.exit_code == 1
    assert typo.output.strip().splitlines() == [
        'Error: Parser Error: syntax error at or near "SELEC"'
    ]
    missing = sql(data_dir, "SELECT * FROM no_such_table")
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert "no_such_table" in missing.output
    # Data in an error message cannot drive the terminal.
    hostile = sql(data_dir, "SELECT name::INTEGER FROM user_groups WHERE group_id = 'c:x'")
    assert hostile.exit_code == 1 and "\x1b" not in hostile.output and "\x07" not in hostile.output


def test_only_read_access(data_dir: Path) -> None:
    insert = sql(data_dir, "INSERT INTO user_groups (group_id, name, type, member_count) "
                 "VALUES ('c:new', 'New', 'imported', 0)")  # fmt: skip
    assert insert.exit_code == 1
    assert "read-only" in insert.output and "INSERT" in insert.output
    # No way around it: no other database, no files written or read, no extensions.
    for statement in (
        f"ATTACH '{data_dir / 'lake.duckdb'}' AS w",
        f"COPY user_groups TO '{data_dir / 'out.csv'}'",
        "SELECT * FROM read_csv('/etc/hostname')",
        "SET enable_external_access = true",
        "INSTALL httpfs",
    ):
        refused = sql(data_dir, statement)
        assert refused.exit_code == 1, statement
        assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert not (data_dir / "out.csv").exists()
    assert query(data_dir, "SELECT count(*) FROM user_groups") == [(3,)]


def test_limit_says_when_rows_were_left_out(data_dir: Path) -> None:
    cut = sql(data_dir, "SELECT * FROM range(5)", "--limit", "2")
    assert cut.exit_code == 0
    assert len(cut.stdout.splitlines()) == 3  # header and 2 rows
    assert "2 rows shown; more match" in cut.stderr
    # csv and json give every row unless asked otherwise.
    assert len(sql(data_dir, "SELECT * FROM range(1500)", "--format", "csv").stdout.split()) == 1501
    one = sql(data_dir, "SELECT 1 AS n")
    assert "1 row" in one.stderr and "1 rows" not in one.stderr


def test_no_data_yet(tmp_path: Path) -> None:
    result = sql(tmp_path / "empty", "SELECT 1")
    assert result.exit_code == 1
    assert "no data yet" in result.output


def test_prompt_reads_statements_from_stdin(data_dir: Path) -> None:
    script = (
        "SELECT name\n  FROM user_groups\n  WHERE name = 'HR'\n;\n"  # multi-line
        "SELECT 'a;b' AS text; -- a semicolon in a string does not end it\n"
        "SELEC 1;\n"  # an error: shown, and the prompt goes on
        ".format json\n"
        "SELECT 7 AS seven;\n"
        ".quit\n"
        "SELECT 'after quit' AS never;\n"
    )
    result = sql(data_dir, stdin=script)
    assert "Traceback" not in result.output
    out = result.stdout
    assert "HR" in out and "a;b" in out
    assert 'Parser Error: syntax error at or near "SELEC"' in result.stderr
    assert '"seven": 7' in out
    assert "after quit" not in result.output
    assert result.exit_code == 1  # a statement failed: a script run from stdin says so


def test_prompt_dot_commands_and_end_of_input(data_dir: Path) -> None:
    result = sql(data_dir, stdin=".tables\n.help\n.nonsense\nSELECT 1 AS one;")
    assert "group_members" in result.stdout and "user_groups" in result.stdout
    assert ".quit" in result.stdout  # the help
    assert "unknown command .nonsense" in result.stderr
    # End of input ends the prompt; a last statement without ';' still runs.
    assert result.stdout.rstrip().endswith("1")
    assert result.exit_code == 1
    clean = sql(data_dir, stdin="SELECT 2 AS two;\n")
    assert clean.exit_code == 0 and "two" in clean.stdout


def test_settings_are_locked_so_no_query_can_break_the_session(data_dir: Path) -> None:
    # Review finding: turning on logging to a file broke the session and aborted the process.
    for statement in (
        "CALL enable_logging(storage_path='/tmp/groupsync-sql-log')",
        "PRAGMA enable_profiling='json'",
        "SET enable_external_access = true",
    ):
        result = sql(data_dir, f"{statement}; SELECT 1 AS one")
        assert result.exit_code == 1, (statement, result.output)
        assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1
    assert sql(data_dir, "SELECT count(*) AS n FROM user_groups").exit_code == 0


def test_column_names_from_the_data_are_neutralized(data_dir: Path) -> None:
    evil = '=HYPERLINK(""http://evil"",""x"")'  # quotes doubled inside a quoted identifier
    q = 'SELECT 1 AS "' + evil + '", 2 AS "' + HOSTILE + '"'
    table = sql(data_dir, q)
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.stdout and "\x07" not in table.stdout and "\\x1b" in table.stdout
    csv_out = sql(data_dir, q, "--format", "csv").stdout
    assert csv_out.splitlines()[0].startswith("\"'=HYPERLINK(")
