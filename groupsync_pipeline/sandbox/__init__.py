"""Loopback fakes of vendor APIs (Microsoft Graph + identity platform) for tests and demos."""

from typing import Any

from groupsync_pipeline.sandbox.seed import (
    SANDBOX_TENANT_ID,
    Group,
    Organisation,
    OtherObject,
    User,
    build_organisation,
)

# graph.py is imported lazily so `python -m groupsync_pipeline.sandbox.graph` runs cleanly.
_GRAPH_NAMES = {
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "FaultInjector",
    "GraphSandbox",
    "RequestRecord",
}


def __getattr__(name: str) -> Any:
    if name in _GRAPH_NAMES:
        from groupsync_pipeline.sandbox import graph

        return getattr(graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "SANDBOX_TENANT_ID",
    "FaultInjector",
    "GraphSandbox",
    "Group",
    "Organisation",
    "OtherObject",
    "RequestRecord",
    "User",
    "build_organisation",
]
