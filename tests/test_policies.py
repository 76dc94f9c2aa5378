"""Alert policies: file validation, evaluation on a real DuckDB lake, alert emails."""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from groupsync_pipeline.alert_emails import send_pending_alert_emails
from groupsync_pipeline.policies import (
    MAX_ALERT_ACTIVITY_IDS,
    Policy,
    PolicyError,
    PolicyRunResult,
    Threshold,
    evaluate_policies,
    glob_to_regex,
    load_policies,
    parse_policies,
)
from groupsync_pipeline.smtp_sink import SmtpSink
from groupsync_pipeline.storage.lake import Lake

T0 = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 11, 3, 0, 0, tzinfo=dt.UTC)
SRC = "policies.yaml"

# Members of each group in the fixture lake (account ids in connection "contoso").
HR_USER, FIN_USER, EXEC_USER, ADMIN_USER, NOBODY = "u-hr", "u-fin", "u-exec", "u-admin", "u-none"
GROUPS = {
    HR_USER: ["contoso:hr"],
    FIN_USER: ["contoso:fin"],
    EXEC_USER: ["contoso:exec"],
    ADMIN_USER: ["auto:admins"],
    NOBODY: [],
}


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    lake = Lake(tmp_path / "data")
    lake.ensure_ready()
    connection = lake.connect()
    connection.executemany(
        "INSERT INTO user_groups (group_id, name, type, connection, imported_at, member_count,"
        " group_key) VALUES (?, ?, ?, ?, ?, 1, (SELECT count(*) + 1 FROM user_groups))",
        [
            ("contoso:hr", "HR", "imported", "contoso", T0 - dt.timedelta(days=9)),
            ("fabrikam:hr", "HR", "imported", "fabrikam", T0 - dt.timedelta(days=9)),
            ("contoso:fin", "Finance", "imported", "contoso", T0 - dt.timedelta(days=9)),
            ("contoso:exec", "Executives", "imported", "contoso", T0 - dt.timedelta(days=9)),
            ("auto:admins", "Office 365 administrators", "automatic", None, None),
        ],
    )
    try:
        yield connection
    finally:
        connection.close()


_ACTIVITY_COLUMNS = (
    "activity_id",
    "connection",
    "app",
    "source",
    "event_id",
    "occurred_at",
    "actor_account_id",
    "actor_email",
    "action",
    "object_name",
    "object_id",
    "country",
    "success",
    "ingested_at",
)


class Feed:
    """Inserts activities and their tags the way ingest does, with increasing ids."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        self.next_id = 1

    def add(
        self,
        actor: str,
        action: str = "FileAccessed",
        at: dt.datetime = T0,
        *,
        count: int = 1,
        step: dt.timedelta = dt.timedelta(minutes=1),
        country: str | None = "US",
        object_name: str | None = "Salaries 2026.docx",
        object_id: str | None = "https://contoso.sharepoint.com/sites/hr/Salaries 2026.docx",
        connection: str = "contoso",
        app: str = "office365",
        success: bool | None = True,
        groups: Sequence[str] | None = None,
        tag: bool = True,
    ) -> list[int]:
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        rows = [
            (
                activity_id,
                connection,
                app,
                "Audit.SharePoint",
                f"evt-{activity_id}",
                at + step * n,
                actor,
                f"{actor}@contoso.example",
                action,
                object_name,
                object_id,
                country,
                success,
                NOW,
            )
            for n, activity_id in enumerate(ids)
        ]
        frame = pd.DataFrame(rows, columns=list(_ACTIVITY_COLUMNS))
        # A DataFrame scan, not executemany: some tests insert a thousand rows.
        self.conn.register("new_activities", frame)
        self.conn.execute(
            f"INSERT INTO activities ({', '.join(_ACTIVITY_COLUMNS)}) SELECT * FROM new_activities"
        )
        self.conn.unregister("new_activities")
        tags = [(i, g) for i in ids for g in (GROUPS.get(actor, []) if groups is None else groups)]
        if tags:
            self.conn.executemany(
                "INSERT INTO _activity_group_keys SELECT a.activity_id, g.group_key,"
                " (a.occurred_at AT TIME ZONE 'UTC')::DATE FROM activities AS a, user_groups AS g"
                " WHERE a.activity_id = ? AND g.group_id = ?",
                tags,
            )
        if tag:
            self.tagged_through(ids[-1])
        return ids

    def tagged_through(self, through: int) -> None:
        self.conn.execute("DELETE FROM _tagging_state")
        self.conn.execute("INSERT INTO _tagging_state VALUES (?)", [through])


@pytest.fixture
def feed(conn: duckdb.DuckDBPyConnection) -> Feed:
    return Feed(conn)


def policy(text: str) -> Policy:
    return parse_policies("policies:\n" + textwrap.indent(textwrap.dedent(text), "  "), SRC)[0]


def run(
    conn: duckdb.DuckDBPyConnection, policies: Sequence[Policy], now: dt.datetime = NOW
) -> PolicyRunResult:
    """Evaluate inside a transaction, as the pipeline does."""
    conn.execute("BEGIN TRANSACTION")
    try:
        result = evaluate_policies(conn, policies, now)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def alert_rows(conn: duckdb.DuckDBPyConnection, name: str | None = None) -> list[tuple]:
    return conn.execute(
        "SELECT policy, actor_account_id, groups, activity_count, first_at, last_at"
        " FROM alerts WHERE $name IS NULL OR policy = $name ORDER BY first_at",
        {"name": name},
    ).fetchall()


def examples() -> dict[str, Policy]:
    return {p.name: p for p in load_policies(environ={})}


HR_POLICY = "HR documents opened"
EXEC_POLICY = "Executive file activity volume"
ADMIN_POLICY = "Administrator outside the US"


# -- validation -------------------------------------------------------------------------------

BASE = "- name: P1\n  severity: low\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            BASE + "  severty: high\n",
            "policies.yaml: line 4: policy #1 'P1': field 'severty': unknown field "
            "(did you mean 'severity'?)",
        ),
        (
            BASE + "  colour: red\n",
            "policies.yaml: line 4: policy #1 'P1': field 'colour': unknown field (allowed: name,",
        ),
        (
            BASE + "  include_groups: 5\n",
            "policies.yaml: line 4: policy #1 'P1': field 'include_groups': must be a string or "
            "a list of strings, not int",
        ),
        (BASE + "  actions: [FileAccessed, 3]\n", "field 'actions': entries must be non-empty"),
        (BASE + "  success: 'no'\n", "field 'success': must be true or false, not 'no'"),
        (
            "- name: P1\n  severity: urgent\n",
            "policy #1 'P1': field 'severity': unknown severity 'urgent' "
            "(one of: low, medium, high, critical)",
        ),
        ("- name: P1\n", "policy #1 'P1': field 'severity': missing"),
        ("- severity: low\n", "policies.yaml: line 2: policy #1: field 'name': missing"),
        ("- name: ''\n  severity: low\n", "policy #1: field 'name': must be a non-empty string"),
        (
            BASE + "  countries: {not_in: [USA]}\n",
            "policy #1 'P1': field 'countries': 'USA' is not a two-letter ISO 3166-1 code",
        ),
        (
            BASE + "  countries: {not_in: [NO]}\n",
            "field 'countries': False is not a country code (YAML reads some two-letter codes",
        ),
        (BASE + "  countries: [US]\n", "field 'countries': must be {in: [codes]} or {not_in:"),
        (BASE + "  countries: {in: []}\n", "'in' must be a non-empty list of two-letter"),
        (
            BASE + "  threshold: {count: 5, window: 1 hour}\n",
            "policy #1 'P1': field 'threshold': 'window' '1 hour' is not a duration",
        ),
        (BASE + "  threshold: {count: 5, window: 0h}\n", "'window' must be more than 0"),
        (BASE + "  threshold: {count: 5, window: 90d}\n", "at most 30d"),
        (BASE + "  threshold: {count: 5}\n", "field 'threshold': 'window' is missing"),
        (
            BASE + "  threshold: {count: 0, window: 1h}\n",
            "policy #1 'P1': field 'threshold': 'count' must be at least 1, not 0",
        ),
        (BASE + "  threshold: {count: 2.5, window: 1h}\n", "'count' must be a whole number"),
        (
            BASE + "  threshold: {cuont: 5, window: 1h}\n",
            "field 'threshold': unknown key 'cuont' (did you mean 'count'?)",
        ),
        (
            BASE + "  notify: [secops@example.com, 'Bob <bob@example.com>']\n",
            "policy #1 'P1': field 'notify': not a valid email address: 'Bob <bob@example.com>'",
        ),
        (BASE + "  object_name: '[z-a]*'\n", "field 'object_name': bad range 'z-a'"),
        (
            BASE + "- name: p1\n  severity: high\n",
            "policies.yaml: line 4: policy #2 'p1': field 'name': duplicate name "
            "(policy #1 has it already)",
        ),
        ("- just a string\n", "policies.yaml: policy #1: expected a mapping of fields, not a"),
    ],
)
def test_validation_errors(body: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policies("policies:\n" + textwrap.indent(body, "  "), SRC)
    assert message in str(caught.value)
    assert str(caught.value).startswith("policies.yaml: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "policies.yaml: the file is empty"),
        ("# only a comment\n", "policies.yaml: the file is empty"),
        ("polices:\n  - name: x\n", "unknown top-level key 'polices' (did you mean 'policies'?)"),
        ("- name: x\n", "expected a mapping with the key 'policies'"),
        ("policies: {name: x}\n", "'policies' must be a list of policies"),
        (
            "policies:\n  - name: P1\n    severity: low\n    actions: [A]\n    actions: [B]\n",
            "policies.yaml: line 5, column 5: not valid YAML: duplicate key 'actions'",
        ),
        (
            "policies:\n  - name: P1\n    severity: [low\n",
            "policies.yaml: line 4, column 1: not valid YAML",
        ),
        (
            "policies:\n  - name: P1\n   severity: low\n",
            "policies.yaml: line 3, column 4: not valid YAML: expected <block end>",
        ),
    ],
)
def test_document_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policies(text, SRC)
    assert message in str(caught.value)


def test_valid_policy_is_normalized() -> None:
    parsed = policy(
        """\
        - name: '  Mixed  '
          severity: HIGH
          apps: Office365
          include_groups: HR
          countries: {in: [gb, fr, GB]}
          object_name: '*.docx'
          threshold: {count: 3, window: 15m}
          notify: secops@example.com
        """
    )
    assert parsed.name == "Mixed"
    assert parsed.severity == "high"
    assert parsed.apps == ("office365",)
    assert parsed.include_groups == ("HR",)
    assert parsed.countries_in == ("GB", "FR")
    assert parsed.object_name == ("*.docx",)
    assert parsed.threshold == Threshold(3, dt.timedelta(minutes=15))
    assert parsed.notify == ("secops@example.com",)
    assert parse_policies("policies: []\n", SRC) == []


def test_load_policies_from_env_file_and_bundled(tmp_path: Path) -> None:
    assert list(examples()) == [HR_POLICY, EXEC_POLICY, ADMIN_POLICY]
    path = tmp_path / "mine.yaml"
    path.write_text("policies:\n  - name: Mine\n    severity: low\n")
    assert [p.name for p in load_policies(environ={"GROUPSYNC_POLICIES": str(path)})] == ["Mine"]
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read policy file"):
        load_policies(tmp_path / "missing.yaml")
    path.write_text("policies:\n  - name: Mine\n    severity: low\n    apps: 5\n")
    with pytest.raises(PolicyError, match=rf"^{path}: line 4: policy #1 'Mine': field 'apps'"):
        load_policies(environ={"GROUPSYNC_POLICIES": str(path)})


def test_definition_hash_ignores_wording_but_not_conditions() -> None:
    base = policy("- {name: P, severity: low, actions: [A, B]}\n")
    same = replace(base, severity="high", notify=("a@b.example",), description="x")
    assert same.definition_hash() == base.definition_hash()
    assert replace(base, actions=("B", "A")).definition_hash() == base.definition_hash()
    assert replace(base, actions=("A",)).definition_hash() != base.definition_hash()


# -- globs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("*.docx", ["a.docx", "A.DOCX", "x\ny.docx"], ["a.docx.exe", "adocx"]),
        ("100%_final.txt", ["100%_final.txt"], ["100xxfinal.txt", "100%Xfinal.txt"]),
        ("report_[ab]?.xls", ["report_a1.xls", "REPORT_B2.xls"], ["report_c1.xls"]),
        ("[!a]*", ["b"], ["a", "A"]),
        ("budget[", ["budget["], ["budget"]),
        ("[]]x", ["]x"], ["x"]),
        ("a\\b(c)+$^{2}|.", ["a\\b(c)+$^{2}|."], ["a\\bc"]),
    ],
)
def test_glob_to_regex(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    regex = glob_to_regex(pattern)
    db = duckdb.connect()
    for text, expected in [(t, True) for t in matching] + [(t, False) for t in not_matching]:
        got = db.execute("SELECT regexp_full_match(?, ?)", [text, regex]).fetchall()[0][0]
        assert got is expected, (pattern, text)


def test_object_globs_with_sql_wildcards(conn: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    rule = policy(
        """\
        - name: "Odd {} 100% names '; --"
          severity: low
          object_name: ['100%_plan[s].xlsx', 'budget[']
          object_site: 'https://contoso.sharepoint.com/sites/hr/*'
        """
    )
    run(conn, [rule])
    hits = [
        feed.add(NOBODY, object_name="100%_PLANs.xlsx")[0],
        feed.add(NOBODY, object_name="budget[")[0],
    ]
    for name in ["100x_plans.xlsx", "100%Xplans.xlsx", "100%_plan.xlsx", "budget", None]:
        feed.add(NOBODY, object_name=name)
    feed.add(NOBODY, object_name="budget[", object_id="https://contoso.sharepoint.com/sites/it/x")
    result = run(conn, [rule])
    assert result.outcomes[0].matches == 2
    assert list(result.alerts["activity_ids"][0]) == hits
    # The name travels as a parameter: braces, quotes and % reach the row unchanged.
    assert result.alerts["policy"][0] == "Odd {} 100% names '; --"
    assert result.alerts["summary"][0].startswith("Odd {} 100% names '; --: u-none@")


# -- the example policies ---------------------------------------------------------------------


def test_hr_documents_policy(conn: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    hr = examples()[HR_POLICY]
    assert run(conn, [hr]).outcomes[0].status == "started"
    hr_reads = feed.add(HR_USER, "FileAccessed", count=2)
    feed.add(FIN_USER, "FileAccessed")  # Finance reading the same document
    feed.add(HR_USER, "FileModified")  # not an opening action
    feed.add(HR_USER, "FileAccessed", app="dropbox")
    result = run(conn, [hr])
    outcome = result.outcomes[0]
    assert (outcome.status, outcome.activities_considered, outcome.matches) == ("evaluated", 5, 2)
    assert outcome.alerts_raised == 1
    alert = result.alerts.iloc[0]
    assert alert["actor_account_id"] == HR_USER
    assert list(alert["groups"]) == ["HR"]
    assert list(alert["activity_ids"]) == hr_reads
    assert alert["activity_count"] == 2
    assert alert["severity"] == "medium"
    assert alert["summary"].startswith(
        "HR documents opened: u-hr@contoso.example (contoso) 2 matching activities between"
    )
    # Nothing new: nothing raised, state unchanged.
    again = run(conn, [hr])
    assert again.outcomes[0].status == "waiting" and again.alerts.empty
    assert len(alert_rows(conn)) == 1


def test_group_names_repeat_across_connections_and_ids_match(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    by_name = policy("- {name: By name, severity: low, include_groups: [hr]}\n")
    by_id = policy("- {name: By id, severity: low, include_groups: ['fabrikam:hr']}\n")
    run(conn, [by_name, by_id])
    feed.add("f-1", connection="fabrikam", groups=["fabrikam:hr"])
    feed.add(HR_USER, groups=["contoso:hr", "contoso:fin"])
    result = run(conn, [by_name, by_id])
    assert [o.alerts_raised for o in result.outcomes] == [2, 1]
    # groups lists the tags that made the actor match, not Finance.
    assert [list(g) for g in result.alerts["groups"]] == [["HR"], ["HR"], ["HR"]]
    assert sorted(result.alerts.loc[result.alerts.policy == "By name", "connection"]) == [
        "contoso",
        "fabrikam",
    ]


def test_executive_volume_threshold(conn: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    volume = examples()[EXEC_POLICY]
    run(conn, [volume])
    feed.add(EXEC_USER, "FileDownloaded", T0, count=29)  # 29 in 29 minutes: below
    feed.add(HR_USER, "FileDownloaded", T0, count=40)  # not an executive
    assert run(conn, [volume]).alerts.empty
    # Two hours later (so the 29 fall outside every window with them): 30 in 30 minutes.
    burst = feed.add(EXEC_USER, "FileAccessed", T0 + dt.timedelta(hours=2), count=30)
    result = run(conn, [volume])
    assert len(result.alerts) == 1
    alert = result.alerts.iloc[0]
    assert list(alert["activity_ids"]) == burst and alert["activity_count"] == 30
    assert list(alert["groups"]) == ["Executives"]
    assert alert["summary"].endswith("(threshold: 30 within 1h)")
    # Re-running: no duplicate, even with the state wound back (ids are deterministic).
    assert run(conn, [volume]).alerts.empty
    conn.execute("UPDATE _policy_state SET evaluated_through = 0")
    assert run(conn, [volume]).alerts.empty
    assert len(alert_rows(conn, EXEC_POLICY)) == 1


def test_threshold_burst_spanning_two_runs_alerts_once(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    volume = examples()[EXEC_POLICY]
    run(conn, [volume])
    first = feed.add(EXEC_USER, "FileAccessed", T0, count=20)
    assert run(conn, [volume]).alerts.empty
    # The next run's 15 fall in the same hour as the previous 20: 35 >= 30.
    second = feed.add(EXEC_USER, "FileAccessed", T0 + dt.timedelta(minutes=20), count=15)
    result = run(conn, [volume])
    assert len(result.alerts) == 1
    assert list(result.alerts.iloc[0]["activity_ids"]) == first + second
    # The burst goes on for hours across many runs: still one alert.
    for hour in range(1, 5):
        feed.add(EXEC_USER, "FileAccessed", T0 + dt.timedelta(hours=hour), count=60)
        assert run(conn, [volume]).alerts.empty
    # A new burst after a quiet spell longer than the window: a second alert.
    feed.add(EXEC_USER, "FileAccessed", T0 + dt.timedelta(hours=8), count=30)
    assert len(run(conn, [volume]).alerts) == 1
    assert len(alert_rows(conn, EXEC_POLICY)) == 2


def test_threshold_late_events_reshaping_an_alerted_burst_do_not_alert_again(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    rule = policy("- {name: Burst, severity: low, threshold: {count: 3, window: 10m}}\n")
    run(conn, [rule])
    feed.add(NOBODY, at=T0 + dt.timedelta(minutes=10), count=3)
    assert len(run(conn, [rule]).alerts) == 1
    # Events from before the burst arrive late (new ids, earlier times): they form triggers
    # before the alerted ones, so the recomputed burst starts earlier, with another first id.
    feed.add(NOBODY, at=T0 + dt.timedelta(minutes=2), count=3)
    assert run(conn, [rule]).alerts.empty
    assert len(alert_rows(conn)) == 1


def test_threshold_after_restart_does_not_repeat_an_overlapping_alert(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    rule = policy("- {name: Burst, severity: low, threshold: {count: 3, window: 10m}}\n")
    run(conn, [rule])
    feed.add(NOBODY, at=T0, count=3, step=dt.timedelta(minutes=5))  # 0, 5, 10
    assert len(run(conn, [rule]).alerts) == 1
    narrower = replace(rule, threshold=Threshold(3, dt.timedelta(minutes=8)))
    assert run(conn, [narrower]).outcomes[0].status == "restarted"
    # 5, 10, 12 is a burst under the new definition, but the old alert already covers it.
    feed.add(NOBODY, at=T0 + dt.timedelta(minutes=12))
    assert run(conn, [narrower]).alerts.empty
    feed.add(NOBODY, at=T0 + dt.timedelta(hours=1), count=3)
    assert len(run(conn, [narrower]).alerts) == 1


def test_threshold_two_bursts_in_one_run_and_window_edges(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    rule = policy("- {name: Burst, severity: low, threshold: {count: 3, window: 10m}}\n")
    run(conn, [rule])
    step = dt.timedelta(minutes=5)
    first = feed.add(NOBODY, at=T0, count=3, step=step)  # 0, 5, 10 min: trigger at 10
    # 17, 22, 27: trigger at 27 only, 17 minutes after the last one (more than the window).
    second = feed.add(NOBODY, at=T0 + dt.timedelta(minutes=17), count=3, step=step)
    feed.add(NOBODY, at=T0 + dt.timedelta(minutes=40), count=3, step=dt.timedelta(minutes=6))
    third = feed.add(NOBODY, at=T0 + dt.timedelta(hours=2), count=3, step=step)
    result = run(conn, [rule])
    assert sorted(list(ids) for ids in result.alerts["activity_ids"]) == [first, second, third]
    assert len(set(result.alerts["alert_id"])) == 3


def test_admin_outside_us(conn: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    admin = examples()[ADMIN_POLICY]
    run(conn, [admin])
    gb = feed.add(ADMIN_USER, "Sign-in", country="GB")
    feed.add(ADMIN_USER, "Sign-in", country="US")
    feed.add(ADMIN_USER, "Sign-in", country=None)  # not geolocated: does not match not_in
    feed.add(HR_USER, "Sign-in", country="GB")  # not an admin
    result = run(conn, [admin])
    assert result.outcomes[0].matches == 1
    assert [list(a) for a in result.alerts["activity_ids"]] == [gb]
    assert list(result.alerts.iloc[0]["groups"]) == ["Office 365 administrators"]
    assert result.alerts.iloc[0]["severity"] == "critical"


def test_countries_in_exclude_groups_and_success(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    rule = policy(
        """\
        - name: Failed in GB, not Finance
          severity: low
          countries: {in: [gb]}
          exclude_groups: [Finance]
          success: false
        """
    )
    run(conn, [rule])
    hit = feed.add(HR_USER, country="GB", success=False)
    feed.add(FIN_USER, country="GB", success=False)  # excluded group
    feed.add(HR_USER, country="GB", success=True)
    feed.add(HR_USER, country="GB", success=None)  # app did not say
    feed.add(HR_USER, country=None, success=False)
    feed.add(HR_USER, country="FR", success=False)
    result = run(conn, [rule])
    assert [list(a) for a in result.alerts["activity_ids"]] == [hit]
    assert list(result.alerts.iloc[0]["groups"]) == ["HR"]  # no include_groups: all tags


def test_unknown_groups_warn_and_match_nothing(conn: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    rule = policy("- {name: Legal, severity: low, include_groups: [Legal], exclude_groups: [X]}\n")
    result = run(conn, [rule])
    assert result.warnings == [
        "policy 'Legal': include_groups entry 'Legal' is not the name or id of any group in "
        "user_groups: it matches no one until such a group is imported",
        "policy 'Legal': exclude_groups entry 'X' is not the name or id of any group in "
        "user_groups: it excludes no one until such a group is imported",
    ]
    feed.add(HR_USER)
    assert run(conn, [rule]).alerts.empty


def test_incremental_state_and_untagged_activities_wait(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    hr = examples()[HR_POLICY]
    run(conn, [hr])
    first = feed.add(HR_USER)
    assert run(conn, [hr]).outcomes[0].evaluated_through == first[-1]
    waiting = feed.add(HR_USER, tag=False)  # ingested, not tagged yet
    result = run(conn, [hr])
    assert result.outcomes[0].status == "waiting" and result.alerts.empty
    feed.tagged_through(waiting[-1])
    result = run(conn, [hr])
    assert [list(a) for a in result.alerts["activity_ids"]] == [waiting]
    state = conn.execute("SELECT evaluated_through FROM _policy_state").fetchall()
    assert state == [(waiting[-1],)]


def test_new_and_changed_policies_start_at_the_head(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    hr = examples()[HR_POLICY]
    history = feed.add(HR_USER, count=3)
    started = run(conn, [hr]).outcomes[0]
    assert (started.status, started.evaluated_through, started.matches) == (
        "started",
        history[-1],
        0,
    )
    assert alert_rows(conn) == []
    # Wording changes keep the state ...
    reworded = replace(hr, severity="high", description="new text")
    feed.add(HR_USER)
    assert run(conn, [reworded]).outcomes[0].status == "evaluated"
    # ... a condition change restarts at the head without alerting what is there.
    widened = replace(hr, actions=(*hr.actions, "FileModified"))
    pending = feed.add(HR_USER, "FileModified")
    restarted = run(conn, [widened]).outcomes[0]
    assert (restarted.status, restarted.evaluated_through) == ("restarted", pending[-1])
    assert len(alert_rows(conn)) == 1
    later = feed.add(HR_USER, "FileModified")
    result = run(conn, [widened])
    assert [list(a) for a in result.alerts["activity_ids"]] == [later]


def test_activity_ids_capped_count_exact(conn: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    hr = examples()[HR_POLICY]
    run(conn, [hr])
    ids = feed.add(HR_USER, count=MAX_ALERT_ACTIVITY_IDS + 5, step=dt.timedelta(seconds=1))
    alert = run(conn, [hr]).alerts.iloc[0]
    assert alert["activity_count"] == MAX_ALERT_ACTIVITY_IDS + 5
    assert list(alert["activity_ids"]) == ids[:MAX_ALERT_ACTIVITY_IDS]


def test_evaluation_joins_the_callers_transaction(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    hr = examples()[HR_POLICY]
    run(conn, [hr])
    feed.add(HR_USER)
    conn.execute("BEGIN TRANSACTION")
    assert len(evaluate_policies(conn, [hr], NOW).alerts) == 1
    conn.execute("ROLLBACK")
    assert alert_rows(conn) == []
    assert len(run(conn, [hr]).alerts) == 1


def test_bad_arguments_are_refused(conn: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate_policies(conn, [], dt.datetime(2026, 1, 1))
    twice = [examples()[HR_POLICY]] * 2
    with pytest.raises(ValueError, match="policy names must be unique"):
        evaluate_policies(conn, twice, NOW)


# -- emails -----------------------------------------------------------------------------------


def test_alert_email_sent_then_retried_after_smtp_down(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    hr = replace(examples()[HR_POLICY], notify=("secops@example.com", "hr-lead@example.com"))
    quiet = examples()[ADMIN_POLICY]  # raises alerts but notifies no one
    run(conn, [hr, quiet])
    feed.add(HR_USER, object_name="Salaries 2026.docx")
    feed.add(HR_USER, object_name="Reviews.docx")
    feed.add(ADMIN_USER, "Sign-in", country="GB")
    run(conn, [hr, quiet])

    # No SMTP configured: skipped with a reason, alerts stay pending.
    skipped = send_pending_alert_emails(conn, [hr, quiet], None, NOW)
    assert [(o.policy, o.status) for o in skipped.outcomes] == [(HR_POLICY, "skipped")]
    assert "GROUPSYNC_SMTP_HOST" in (skipped.outcomes[0].reason or "")

    # SMTP down: failed, reported, nothing lost.
    with SmtpSink() as sink:
        settings = sink.settings()
    down = send_pending_alert_emails(conn, [hr, quiet], settings, NOW)
    assert down.failed == 1 and "connection refused" in (down.outcomes[0].reason or "")
    assert conn.execute("SELECT count(*) FROM alerts WHERE notified_at IS NULL").fetchall() == [
        (2,)
    ]

    with SmtpSink() as sink:
        settings = sink.settings()
        sent = send_pending_alert_emails(conn, [hr, quiet], settings, NOW)
        assert sent.sent == 1 and sent.failed == 0
        (received,) = sink.wait_for(1)
    assert set(received.rcpt_tos) == {"secops@example.com", "hr-lead@example.com"}
    message = received.message
    assert message["Subject"] == "groupsync alert: HR documents opened (medium): 1 new alert"
    body = message.get_content()
    assert "u-hr@contoso.example (contoso)" in body
    assert "Groups:     HR" in body
    assert "Activities: 2" in body
    assert "Objects:    Reviews.docx; Salaries 2026.docx" in body
    notified = conn.execute("SELECT policy, notified_at FROM alerts ORDER BY policy").fetchall()
    assert notified == [(ADMIN_POLICY, None), (HR_POLICY, NOW)]

    # Already notified: nothing more to send.
    with SmtpSink() as sink:
        assert send_pending_alert_emails(conn, [hr], sink.settings(), NOW).outcomes == []


def test_one_email_per_policy_covers_all_pending_alerts(
    conn: duckdb.DuckDBPyConnection, feed: Feed
) -> None:
    hr = replace(examples()[HR_POLICY], notify=("secops@example.com",))
    run(conn, [hr])
    feed.add(HR_USER)
    run(conn, [hr])
    feed.add("u-hr2", groups=["contoso:hr"])
    run(conn, [hr])
    old = NOW - dt.timedelta(days=30)
    conn.execute("UPDATE alerts SET raised_at = ? WHERE actor_account_id = 'u-hr'", [old])
    feed.add(HR_USER)
    run(conn, [hr])
    with SmtpSink() as sink:
        outcome = send_pending_alert_emails(conn, [hr], sink.settings(), NOW)
        (received,) = sink.wait_for(1)
    # The 30-day-old alert is past max_age: not emailed, left pending.
    assert outcome.outcomes[0].alerts == 2
    assert received.message["Subject"].endswith(": 2 new alerts")
    left = conn.execute("SELECT raised_at FROM alerts WHERE notified_at IS NULL").fetchall()
    assert left == [(old,)]
