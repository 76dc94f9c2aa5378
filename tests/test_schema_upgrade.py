"""A warehouse written by the first release keeps its data and gains the new tables."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb

from groupsync_pipeline.storage.warehouse import WAREHOUSE_FILE, Warehouse
from tests.pipeline_helpers import import_group, query, run_job

FIRST_RELEASE_SCHEMA = Path(__file__).with_name("data") / "schema_issue2.sql"


def test_first_release_warehouse_is_upgraded_in_place(
    tmp_path: Path, connections_file: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    conn = duckdb.connect(str(data / WAREHOUSE_FILE))
    conn.execute(FIRST_RELEASE_SCHEMA.read_text())
    conn.execute(
        "INSERT INTO group_syncs VALUES ('contoso:old', TIMESTAMPTZ '2026-01-01 00:00:00+00', "
        "'run-1', 3, 3, 0, 3, '{}', 0, 1, 0.5)"
    )
    conn.close()
    with Warehouse(data).write():
        pass  # the schema is applied by every write
    assert query(data, "SELECT group_id, members, mode FROM group_syncs") == [
        ("contoso:old", 3, None)
    ]
    tables = {row[0] for row in query(data, "SELECT table_name FROM information_schema.tables")}
    assert {"import_requests", "connection_sync_state", "membership_holds"} <= tables
    with dg.DagsterInstance.ephemeral() as instance:
        assert import_group(instance, "Legal", connections_file, data).success
        assert run_job(instance, "sync_group_memberships", {}, connections_file, data).success
    assert query(data, "SELECT mode FROM group_syncs ORDER BY synced_at") == [
        (None,),
        ("import",),
        ("full",),
    ]
