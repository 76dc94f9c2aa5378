"""Jobs launched from the UI, the CLI and (later) sensors and schedules."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.assets import group_catalog, imported_group_members

import_user_group = dg.define_asset_job(
    name="import_user_group",
    selection=dg.AssetSelection.assets(imported_group_members),
    description="Import one group's members from a connected app "
    "(config: connection, group id or exact name, optional notify_email).",
)

refresh_group_catalogs = dg.define_asset_job(
    name="refresh_group_catalogs",
    selection=dg.AssetSelection.assets(group_catalog),
    description="Refresh the group catalog of every connected app (or those in config).",
)
