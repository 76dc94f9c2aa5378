"""One connection's failure is that connection's alone: the others still run and commit.

Assets that work connection by connection catch any ``Exception`` from one connection (an
app's error, a bad setting, or a bug meeting data nobody expected), record it in
``ConnectionFailures`` and go on; once every connection was tried, the run fails naming each
failed one. KeyboardInterrupt, SystemExit and Dagster's own interrupts are BaseExceptions: they
are not caught and end the run.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import dagster as dg

from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.connectors.base import ConnectorError
from groupsync_pipeline.storage.lake import LakeBusyError

# Failures whose message says it all; anything else is unexpected and logged with its traceback.
EXPECTED_FAILURES = (ConnectorError, ConfigError, LakeBusyError)


@dataclass
class ConnectionFailures:
    """Which connections failed in a run, and why (one line each)."""

    what: str  # what was done, for messages: "catalog refresh", "sync", "activity read"
    reasons: dict[str, str] = field(default_factory=dict)

    def record(self, context: dg.AssetExecutionContext, name: str, exc: Exception) -> None:
        if isinstance(exc, EXPECTED_FAILURES):
            reason = str(exc) or type(exc).__name__
            context.log.error(f"{name}: {self.what} failed: {reason}")
        else:
            reason = f"unexpected {type(exc).__name__}: {exc}"
            # The traceback belongs in the run log; the failure description stays one line.
            context.log.error(
                f"{name}: {self.what} failed with an unexpected error; the other connections "
                f"go on.\n{''.join(traceback.format_exception(exc))}"
            )
        self.reasons[name] = reason

    def summary(self, total: int) -> str:
        lines = "; ".join(f"{name}: {reason}" for name, reason in self.reasons.items())
        return (
            f"{self.what} failed for {len(self.reasons)} of {total} connections "
            f"(the others committed): {lines}"
        )

    def raise_if_any(self, total: int, metadata: dict[str, dg.RawMetadataValue]) -> None:
        """End the run as failed, naming every failed connection, once all were tried."""
        if not self.reasons:
            return
        metadata["failed_connections"] = dg.MetadataValue.json(self.reasons)
        raise dg.Failure(description=self.summary(total), metadata=metadata)
