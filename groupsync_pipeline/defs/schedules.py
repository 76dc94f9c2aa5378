"""Schedules: the hourly re-sync of imported groups, the 15-minute activity ingest."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.jobs import ingest_activities, sync_group_memberships

membership_sync_schedule = dg.ScheduleDefinition(
    name="membership_sync_schedule",
    job=sync_group_memberships,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every hour: re-sync every imported group of every connection (delta query).",
)

activities_schedule = dg.ScheduleDefinition(
    name="activities_schedule",
    job=ingest_activities,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: read new audit events, tag them, raise policy alerts.",
)
