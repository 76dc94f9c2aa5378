"""The one Definitions object of groupsync (loaded by workspace.yaml and the CLI)."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.activity_assets import activities, alerts
from groupsync_pipeline.defs.assets import group_catalog, imported_group_members
from groupsync_pipeline.defs.checks import (
    audit_logs_read,
    member_count_matches_remote,
    no_duplicate_members,
    no_held_shrinks,
)
from groupsync_pipeline.defs.jobs import (
    import_user_group,
    ingest_activities,
    refresh_group_catalogs,
    sync_group_memberships,
)
from groupsync_pipeline.defs.maintenance import lake_maintenance, lake_maintenance_schedule
from groupsync_pipeline.defs.resources import ConnectionsResource, LakeResource
from groupsync_pipeline.defs.schedules import activities_schedule, membership_sync_schedule
from groupsync_pipeline.defs.sensors import import_request_sensor

defs = dg.Definitions(
    assets=[group_catalog, imported_group_members, activities, alerts],
    asset_checks=[
        member_count_matches_remote,
        no_duplicate_members,
        no_held_shrinks,
        audit_logs_read,
    ],
    jobs=[
        import_user_group,
        refresh_group_catalogs,
        sync_group_memberships,
        ingest_activities,
        lake_maintenance,
    ],
    schedules=[membership_sync_schedule, activities_schedule, lake_maintenance_schedule],
    sensors=[import_request_sensor],
    resources={"connections": ConnectionsResource(), "lake": LakeResource()},
)
