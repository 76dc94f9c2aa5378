"""The one Definitions object of groupsync (loaded by workspace.yaml and the CLI)."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.defs.assets import group_catalog, imported_group_members
from groupsync_pipeline.defs.checks import member_count_matches_remote, no_duplicate_members
from groupsync_pipeline.defs.jobs import import_user_group, refresh_group_catalogs
from groupsync_pipeline.defs.resources import ConnectionsResource, WarehouseResource

defs = dg.Definitions(
    assets=[group_catalog, imported_group_members],
    asset_checks=[member_count_matches_remote, no_duplicate_members],
    jobs=[import_user_group, refresh_group_catalogs],
    resources={"connections": ConnectionsResource(), "warehouse": WarehouseResource()},
)
