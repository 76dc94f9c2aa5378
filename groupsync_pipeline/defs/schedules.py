"""The hourly re-sync of every imported group."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.jobs import sync_group_memberships

membership_sync_schedule = dg.ScheduleDefinition(
    name="membership_sync_schedule",
    job=sync_group_memberships,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every hour: re-sync every imported group of every connection (delta query).",
)
