"""`groupsync migrate`: a 0.x warehouse, exported, comes back whole in the lake.

The warehouse is built in the previous release's schema (tests/data/legacy/schema_v0_2.sql)
with rows of every table, its requests recorded through the real control store, then exported
with EXPORT DATABASE (FORMAT parquet) as the README tells users to.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main
from groupsync_pipeline.storage.control import (
    CONTROL_FILE,
    CommittedImport,
    ControlStore,
    ImportedGroups,
    NewRequest,
    mirror_import_requests,
)
from groupsync_pipeline.storage.lake import Lake
from groupsync_pipeline.storage.migrate import MigrationError, migrate

LEGACY_SCHEMA = Path(__file__).with_name("data") / "legacy" / "schema_v0_2.sql"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
HOSTILE = [
    '=HYPERLINK("http://evil","x")',
    "Robert'); DROP TABLE accounts;--",
    "\x1b[31mred\x1b[0m \u202eexe.txt",
    'quote " and \\ backslash\nnewline',
    "日本語 👩‍💻",
]
TABLES = [
    "connected_apps",
    "group_catalog",
    "user_groups",
    "accounts",
    "group_memberships",
    "group_syncs",
    "import_requests",
    "connection_sync_state",
    "membership_holds",
    "_remote_direct_members",
    "activities",
    "activity_sources_state",
    "_activity_group_keys",
    "_tagging_state",
    "alerts",
    "_policy_state",
]
VIEWS = ["group_members", "activity_groups", "activities_tagged", "group_activities"]


@pytest.fixture(autouse=True)
def _embedded_lake(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GROUPSYNC_LAKE_CATALOG", "GROUPSYNC_LAKE_DATA_PATH", "GROUPSYNC_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def _old_control_store(old: Path) -> None:
    """Requests as the previous release recorded them: one done (with its email sent), one
    failed, one still pending; and a shrink confirmation."""
    store = ControlStore(old)
    done, failed, _pending = store.add_requests(
        [
            NewRequest("contoso", "Legal", "g-legal", "Legal", "lead@example.com"),
            NewRequest("contoso", HOSTILE[1], "g-bad", HOSTILE[1], None, source="launchpad"),
            NewRequest("contoso", "Sales", "g-sales", "Sales", None),
        ],
        imported=ImportedGroups(),
    )
    assert store.claim(store.get(done).request_key, "run-legal")  # type: ignore[union-attr]
    outcome = CommittedImport(3, 3, 0, 1, 2, 0.75, T0)
    assert store.mark_done(done, "run-legal", outcome)
    store.mark_failed(failed, f"Graph said: {HOSTILE[2]}")
    store.queue_completion_emails()
    (email,) = store.claim_due_emails(10)
    store.email_sent(email.request_id)
    store.confirm_shrink("contoso:g-legal", "admin@example.com", 10, 3)


def _fill_warehouse(conn: duckdb.DuckDBPyConnection, old: Path) -> None:
    h = HOSTILE
    conn.execute(
        "INSERT INTO connected_apps VALUES ('contoso', 'office365', $t, $t0, $t0), "
        "('fabrikam', 'office365', NULL, $t0, NULL)",
        {"t": h[3], "t0": T0},
    )
    conn.execute(
        "INSERT INTO group_catalog VALUES "
        "('office365', 'contoso', 'g-legal', 'Legal', NULL, 'legal@contoso.com', 'security', 3, "
        "$t0),"
        "('office365', 'contoso', 'g-bad', $n, $d, NULL, 'microsoft365', NULL, $t0)",
        {"t0": T0, "n": h[1], "d": h[0]},
    )
    # group_key values with a gap, as a deleted group leaves: they must be kept as they are.
    conn.execute(
        "INSERT INTO user_groups VALUES "
        "('contoso:g-legal', 'Legal', 'imported', 'contoso', 'g-legal', $t0, $t1, 2, NULL, 1),"
        "('contoso:g-bad', $n, 'imported', 'contoso', 'g-bad', $t0, $t1, 1, $t1, 4),"
        "('automatic:external', 'External', 'automatic', NULL, NULL, $t0, NULL, 1, NULL, 7)",
        {"t0": T0, "t1": T0 + timedelta(hours=5), "n": h[1]},
    )
    conn.execute(
        "INSERT INTO accounts SELECT 'contoso', 'u' || i, 'u' || i || '@contoso.com', "
        "CASE WHEN i < 5 THEN $h[i + 1] ELSE 'Person ' || i END, 'u' || i || '@contoso.com', "
        "CASE WHEN i = 3 THEN 'Guest' ELSE 'Member' END, i = 3, i <> 4, $t0, "
        "$t0 + INTERVAL (i) HOUR "
        "FROM range(8) t(i)",
        {"h": h, "t0": T0},
    )
    # History: open intervals, a closed one, and a rejoin.
    conn.execute(
        "INSERT INTO group_memberships VALUES "
        "('contoso:g-legal', 'contoso', 'u0', $t0, NULL),"
        "('contoso:g-legal', 'contoso', 'u1', $t0, $t2),"
        "('contoso:g-legal', 'contoso', 'u1', $t3, NULL),"
        "('contoso:g-legal', 'contoso', 'u2', $t0, $t2),"
        "('contoso:g-bad', 'contoso', 'u4', $t0, NULL),"
        "('automatic:external', 'contoso', 'u3', $t0, NULL)",
        {"t0": T0, "t2": T0 + timedelta(days=1), "t3": T0 + timedelta(days=2)},
    )
    conn.execute(
        "INSERT INTO group_syncs VALUES "
        "('contoso:g-legal', $t0, 'run-legal', 3, 3, 0, 3, '{\"device\": 1}', 1, 2, 0.75, "
        "'import'),"
        "('contoso:g-legal', $t2, 'run-sync', 2, 1, 2, 2, NULL, 0, 1, 0.1, 'delta'),"
        "('contoso:g-bad', $t0, NULL, 1, 1, 0, NULL, NULL, 0, 1, 0.2, NULL)",
        {"t0": T0, "t2": T0 + timedelta(days=1)},
    )
    mirror_import_requests(conn, ControlStore(old))
    conn.execute(
        "INSERT INTO connection_sync_state VALUES "
        "('contoso', $link, $t0, $t2, $t0, 'first sync', 'https://graph.example/v1.0|tenant')",
        {
            "link": "https://graph.example/v1.0/groups/delta?$deltatoken=a'b\"c%20" + "x" * 300,
            "t0": T0,
            "t2": T0 + timedelta(days=1),
        },
    )
    conn.execute(
        "INSERT INTO membership_holds VALUES "
        "('contoso:g-legal', $t, 'run-x', 'delta', 10, 3, 7, 'confirmed', $t)",
        {"t": T0 + timedelta(hours=3)},
    )
    conn.execute(
        "INSERT INTO _remote_direct_members VALUES ('contoso', 'g-legal', 'u0', 'user'),"
        "('contoso', 'g-legal', 'g-nested', 'group'), ('contoso', 'g-nested', 'u1', 'user'),"
        "('contoso', 'g-legal', 'dev-1', 'device'), ('contoso', 'g-bad', $h, 'servicePrincipal')",
        {"h": h[4]},
    )
    # Activities over three days (three partitions in the lake), some tagged.
    conn.execute(
        "INSERT INTO activities SELECT 1000 + i, 'contoso', 'office365', "
        "CASE WHEN i % 2 = 0 THEN 'signIns' ELSE 'Audit.SharePoint' END, 'ev-' || i, "
        "$t0 + INTERVAL (i * 5) HOUR, 'u' || (i % 5), 'u' || (i % 5) || '@contoso.com', 'user', "
        "CASE WHEN i % 3 = 0 THEN 'FileAccessed' ELSE 'Sign-in' END, $h[i % 5 + 1], 'obj-' || i, "
        "'10.0.0.' || i, CASE WHEN i % 4 = 0 THEN NULL ELSE 'DE' END, 'Berlin', 'Mozilla', "
        "CASE WHEN i % 5 = 0 THEN NULL ELSE i % 2 = 0 END, "
        "'{\"Id\": \"ev-' || i || '\", \"note\": ' || to_json($h[i % 5 + 1]) || '}', $t0 "
        "FROM range(15) t(i)",
        {"t0": T0, "h": h},
    )
    conn.execute(
        "INSERT INTO _activity_group_keys SELECT activity_id, 1 FROM activities "
        "WHERE actor_account_id IN ('u0', 'u1') UNION ALL "
        "SELECT activity_id, 4 FROM activities WHERE actor_account_id = 'u4'"
    )
    conn.execute("INSERT INTO _tagging_state VALUES (1014)")
    conn.execute(
        "INSERT INTO activity_sources_state VALUES "
        "('contoso', 'signIns', $t2, $t2, 40, 8, NULL, NULL, NULL),"
        "('contoso', 'Audit.SharePoint', $t0, $t2, 0, 0, $t0, $e, $t2)",
        {"t0": T0, "t2": T0 + timedelta(days=3), "e": h[2]},
    )
    conn.execute(
        "INSERT INTO alerts VALUES "
        "('a-1', 'mass download', 'high', $t, 'contoso', 'u0', 'u0@contoso.com', "
        "['Legal', $h4], [1000, 1003, 1006], 3, $t0, $t, $s, $t),"
        "('a-2', 'guest', 'low', $t, 'contoso', NULL, NULL, []::VARCHAR[], [1003], 1, $t, $t, "
        "'guest activity', NULL)",
        {"t": T0 + timedelta(days=2), "t0": T0, "h4": h[4], "s": h[0]},
    )
    conn.execute(
        "INSERT INTO _policy_state VALUES ('mass download', 1014, 'abc123'), ('guest', 1010, 'def')"
    )


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A previous release's data directory: warehouse.duckdb, control.sqlite3 and an export."""
    old = tmp_path_factory.mktemp("old-data")
    _old_control_store(old)
    conn = duckdb.connect(str(old / "warehouse.duckdb"))
    conn.execute(LEGACY_SCHEMA.read_text())
    _fill_warehouse(conn, old)
    for table in TABLES:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0], table
    conn.close()
    # The README's command, as the Python one-liner gives it.
    exported = old / "export"
    duckdb.connect(str(old / "warehouse.duckdb"), read_only=True).execute(
        f"EXPORT DATABASE '{exported}' (FORMAT parquet)"
    )
    return old


def _rows(conn: duckdb.DuckDBPyConnection, relation: str, columns: list[str]) -> list[tuple]:
    chosen = ", ".join(f'"{c}"' for c in columns)
    return conn.execute(f"SELECT {chosen} FROM {relation} ORDER BY ALL").fetchall()


def _columns(conn: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [row[0] for row in conn.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


@pytest.fixture
def export(legacy: Path, tmp_path: Path) -> Path:
    """A private copy of the export (tests damage it)."""
    copy = tmp_path / "export"
    shutil.copytree(legacy / "export", copy)
    return copy


@pytest.fixture(autouse=True)
def _no_scratch_left(tmp_path: Path) -> Iterator[None]:
    yield
    assert not list(tmp_path.rglob(".migrate-control-*"))


def _lake_rows(data: Path) -> dict[str, int]:
    with Lake(data).read() as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}


def test_every_row_of_every_table_comes_back(legacy: Path, export: Path, tmp_path: Path) -> None:
    data = tmp_path / "new-data"
    result = CliRunner().invoke(
        main,
        [
            "migrate",
            "--from",
            str(export),
            "--control",
            str(legacy / CONTROL_FILE),
            "--data-dir",
            str(data),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "activities: 15 rows" in result.output  # progress, table by table
    assert "import_requests: 3 rows" in result.output

    old = duckdb.connect(str(legacy / "warehouse.duckdb"), read_only=True)
    with Lake(data).read() as new:
        for table in TABLES:
            columns = _columns(old, table)
            assert _rows(new, table, columns) == _rows(old, table, columns), table
        # The tags' new partition column is the activity's UTC day.
        assert new.execute(
            "SELECT count(*) FROM _activity_group_keys AS k JOIN activities AS a USING "
            "(activity_id) WHERE k.occurred_on = (a.occurred_at AT TIME ZONE 'UTC')::DATE"
        ).fetchall()[0][0] == len(old.execute("SELECT * FROM _activity_group_keys").fetchall())
        for view in VIEWS:
            columns = _columns(old, view)
            assert _rows(new, view, columns) == _rows(old, view, columns), view
        assert new.execute("SELECT count(*) FROM group_members").fetchall()[0][0] == 4
        # The sign-ins' pairings of name and account (which resolve file events' actors) are
        # derived from the activities.
        assert new.execute(
            "SELECT DISTINCT name, account_id FROM _sign_in_names ORDER BY name"
        ).fetchall() == [(f"u{n}@contoso.com", f"u{n}") for n in range(5)]
    # The control store came along whole: requests, their email outbox, shrink confirmations.
    before, after = ControlStore(legacy), ControlStore(data)
    assert after.requests_frame().equals(before.requests_frame())
    assert after.outbox() == before.outbox() and len(after.outbox()) == 1
    assert after.shrink_confirmations() == before.shrink_confirmations()
    assert after.queue_completion_emails() == 0  # no second email for an old request

    # A lake that holds data is refused, and left as it was.
    counts = _lake_rows(data)
    with pytest.raises(MigrationError, match="already holds data"):
        migrate(Lake(data), export, control=legacy / CONTROL_FILE, progress=lambda _: None)
    assert _lake_rows(data) == counts
    # --replace loads the export again over it, in one transaction.
    migrate(
        Lake(data), export, control=legacy / CONTROL_FILE, replace=True, progress=lambda _: None
    )
    assert _lake_rows(data) == counts


def test_partial_export_is_refused_and_the_lake_stays_empty(
    legacy: Path, export: Path, tmp_path: Path
) -> None:
    data = tmp_path / "new-data"
    (export / "alerts.parquet").unlink()
    result = CliRunner().invoke(main, ["migrate", "--from", str(export), "--data-dir", str(data)])
    assert result.exit_code == 1
    assert "the export is incomplete" in result.output and "alerts.parquet" in result.output
    assert "Traceback" not in result.output
    assert set(_lake_rows(data).values()) == {0}
    assert not (data / CONTROL_FILE).exists()


def test_damaged_or_missing_pieces_are_named(legacy: Path, export: Path, tmp_path: Path) -> None:
    quiet = {"progress": lambda _: None, "control": legacy / CONTROL_FILE}
    lake = Lake(tmp_path / "new-data")
    with pytest.raises(MigrationError, match="no such folder"):
        migrate(lake, tmp_path / "nowhere", **quiet)  # type: ignore[arg-type]
    (export / "activities.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(MigrationError, match=r"damaged: .*activities\.parquet"):
        migrate(lake, export, **quiet)  # type: ignore[arg-type]
    (export / "load.sql").unlink()
    with pytest.raises(MigrationError, match="load.sql is missing"):
        migrate(lake, export, **quiet)  # type: ignore[arg-type]


def test_a_failure_halfway_through_loading_leaves_nothing(
    legacy: Path, export: Path, tmp_path: Path
) -> None:
    """A tag whose activity the export lacks is found after other tables were loaded: the
    whole transaction goes, and the control store is not touched."""
    tags = export / "_activity_group_keys.parquet"
    with duckdb.connect() as conn:
        conn.execute(
            f"COPY (SELECT * FROM read_parquet('{tags}') UNION ALL SELECT 999999, 1) "
            f"TO '{tags}.new' (FORMAT parquet)"
        )
    Path(f"{tags}.new").replace(tags)
    data = tmp_path / "new-data"
    with pytest.raises(MigrationError, match="activities the export does not hold"):
        migrate(Lake(data), export, control=legacy / CONTROL_FILE, progress=lambda _: None)
    assert set(_lake_rows(data).values()) == {0}
    assert ControlStore(data).requests_frame().empty


def test_requests_without_their_control_store_are_refused(export: Path, tmp_path: Path) -> None:
    data = tmp_path / "new-data"
    with pytest.raises(MigrationError, match="--control"):
        migrate(Lake(data), export, progress=lambda _: None)
    assert set(_lake_rows(data).values()) == {0}


def test_upgrade_in_place_keeps_the_control_store(
    legacy: Path, export: Path, tmp_path: Path
) -> None:
    """The README's main path: the same data directory, its control.sqlite3 already there."""
    data = tmp_path / "data"
    shutil.copytree(legacy, data, ignore=shutil.ignore_patterns("export"))
    before = ControlStore(data).requests_frame()
    result = CliRunner().invoke(
        main, ["migrate", "--from", str(export)], env={"GROUPSYNC_DATA_DIR": str(data)}
    )
    assert result.exit_code == 0, result.output
    assert "control store kept as it is" in result.output
    assert ControlStore(data).requests_frame().equals(before)
    with Lake(data).read() as conn:
        statuses = conn.execute("SELECT status FROM import_requests ORDER BY ALL").fetchall()
    assert statuses == [("done",), ("failed",), ("pending",)]
