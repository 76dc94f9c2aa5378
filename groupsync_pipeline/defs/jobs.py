"""Jobs launched from the UI, the import request sensor and the hourly schedule."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.assets import group_catalog, imported_group_members

import_user_group = dg.define_asset_job(
    name="import_user_group",
    selection=dg.AssetSelection.assets(imported_group_members),
    description="Import one group's members from a connected app "
    "(config: connection, group id or exact name, optional notify_email).",
    # One process for the import and its checks: a subprocess per step would add seconds of
    # start-up to every request, and the steps run one after another anyway.
    executor_def=dg.in_process_executor,
)

refresh_group_catalogs = dg.define_asset_job(
    name="refresh_group_catalogs",
    selection=dg.AssetSelection.assets(group_catalog),
    description="Refresh the group catalog of every connected app (or those in config).",
)

sync_group_memberships = dg.define_asset_job(
    name="sync_group_memberships",
    selection=dg.AssetSelection.assets(imported_group_members),
    description="Re-sync every imported group (default config); set connection to limit it, "
    "full_resync to read everything again.",
)

ingest_activities = dg.define_asset_job(
    name="ingest_activities",
    selection=dg.AssetSelection.groups("activities"),
    description="Read new audit events from every connection, tag them with their actors' "
    "groups and evaluate the policies on them.",
)
