"""Running the real Dagster jobs on a temporary instance, and reading the lake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from groupsync_pipeline.definitions import defs
from groupsync_pipeline.storage.lake import Lake


def run_job(
    instance: dg.DagsterInstance,
    job: str,
    op_config: dict[str, Any],
    connections_file: Path,
    data_dir: Path,
) -> dg.ExecuteInProcessResult:
    op = {
        "import_user_group": "imported_group_members",
        "sync_group_memberships": "imported_group_members",
        "refresh_group_catalogs": "group_catalog",
        "ingest_activities": "activities",
    }
    return defs.resolve_job_def(job).execute_in_process(
        run_config={
            "ops": {op[job]: {"config": op_config}},
            "resources": {
                "connections": {"config": {"connections_file": str(connections_file)}},
                "lake": {"config": {"data_dir": str(data_dir)}},
            },
        },
        instance=instance,
        raise_on_error=False,
    )


def import_group(
    instance: dg.DagsterInstance,
    group: str,
    connections_file: Path,
    data_dir: Path,
    connection: str = "contoso",
) -> dg.ExecuteInProcessResult:
    return run_job(
        instance,
        "import_user_group",
        {"connection": connection, "group": group},
        connections_file,
        data_dir,
    )


def query(data_dir: Path, sql: str, params: list[Any] | None = None) -> list[tuple]:
    """A query on the lake as analysts read it (read-only, latest snapshot)."""
    with Lake(data_dir).read() as conn:
        return conn.execute(sql, params or []).fetchall()


def memberships(data_dir: Path) -> list[tuple]:
    """Every membership interval, in a stable order: to show that nothing changed."""
    return query(data_dir, "SELECT * FROM group_memberships ORDER BY group_id, account_id")


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(
        str(event.event_specific_data.error.message)
        if getattr(event.event_specific_data, "error", None)
        else (event.message or "")
        for event in result.all_events
        if event.is_failure
    )


def materialization(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (event,) = result.get_asset_materialization_events()
    metadata = event.event_specific_data.materialization.metadata
    return {key: value.value for key, value in metadata.items()}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        event.event_specific_data.check_name: event.event_specific_data.passed
        for event in result.all_events
        if event.event_type_value == "ASSET_CHECK_EVALUATION"
    }
