"""The daily lake maintenance job (retention, flush, compaction, file removal) and its schedule.

The work is storage/maintenance.py; this is its Dagster face: one op in the writers' pool, its
figures as the run's metadata.
"""

import dagster as dg

from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.defs.assets import WAREHOUSE_POOL
from groupsync_pipeline.defs.resources import LakeResource
from groupsync_pipeline.storage.maintenance import MaintenanceSettings, run_maintenance


@dg.op(
    # The writers' pool as well as the lake's writer lock: Dagster queues it behind a running
    # import instead of letting it wait on the lock.
    pool=WAREHOUSE_POOL,
    description="Delete activities past GROUPSYNC_ACTIVITY_RETENTION_DAYS, flush inlined rows, "
    "merge small files, expire old snapshots and delete files nothing needs any more.",
)
def maintain_lake(context: dg.OpExecutionContext, lake: LakeResource) -> None:
    try:
        settings = MaintenanceSettings.from_env()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc)) from None
    report = run_maintenance(lake.get(), settings, log=context.log.info)
    context.add_output_metadata(dict(report.metadata()))


@dg.job(
    description="Daily lake upkeep: activity retention, flushing inlined data, merging small "
    "files, expiring snapshots, deleting unused files.",
    executor_def=dg.in_process_executor,
)
def lake_maintenance() -> None:
    maintain_lake()


lake_maintenance_schedule = dg.ScheduleDefinition(
    name="lake_maintenance_schedule",
    job=lake_maintenance,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day at 03:30 UTC: lake maintenance (retention, compaction, cleanup).",
)
