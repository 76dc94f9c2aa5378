"""Completion emails for import requests, sent from the control store's outbox.

Exactly one email per request that asked for one: ``queue_completion_emails`` adds an outbox row
per finished request (the request id is the row's key, so a repeated or restarted sensor tick
cannot queue it twice); a row is claimed before sending and marked sent right after, so a second
sender skips it. An unreachable SMTP server only delays the email: the row waits and is retried
with a growing pause, and the import it reports on is never touched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.notifications import (
    EmailDeliveryError,
    ImportReport,
    SmtpSettings,
    import_completion_message,
    send_message,
)
from groupsync_pipeline.storage.control import ControlStore, ImportRequest

DAGSTER_URL_ENV = "GROUPSYNC_DAGSTER_URL"
DEFAULT_DAGSTER_URL = "http://localhost:3000"

Log = Callable[[str], None]


@dataclass
class EmailRound:
    queued: int = 0
    sent: int = 0
    retrying: int = 0
    given_up: int = 0
    skipped: int = 0


def run_url(run_id: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    if not run_id:
        return None
    base = (environ.get(DAGSTER_URL_ENV) or DEFAULT_DAGSTER_URL).rstrip("/")
    return f"{base}/runs/{run_id}"


def report_for(request: ImportRequest, environ: Mapping[str, str] = os.environ) -> ImportReport:
    reimport = bool(request.left) or (
        request.joined is not None and request.joined != request.members
    )
    return ImportReport(
        request_id=request.request_id,
        group_name=request.group_name or request.group_reference,
        connection=request.connection,
        succeeded=request.status == "done",
        members=request.members,
        # A first import has nothing to compare with: joined/left only for a re-import.
        joined=request.joined if reimport else None,
        left=request.left if reimport else None,
        nested_groups=request.nested_groups,
        pages=request.pages,
        duration_seconds=request.duration_seconds,
        run_id=request.run_id,
        run_url=run_url(request.run_id, environ),
        error=request.error,
        finished_at=request.finished_at or request.requested_at,
    )


def send_completion_emails(
    control: ControlStore,
    *,
    log: Log = lambda message: None,
    limit: int = 10,
    time_budget: float = 30.0,
    max_smtp_timeout: float | None = None,
    environ: Mapping[str, str] = os.environ,
) -> EmailRound:
    """Queue emails for finished requests and send those due, within a time budget: no
    email starts after ``time_budget`` seconds, and none goes on past it.

    ``max_smtp_timeout`` caps the configured SMTP timeout: a sensor tick has a hard time
    limit, and a server that hangs must not make the tick overrun it.
    """
    outcome = EmailRound(queued=control.queue_completion_emails())
    started = time.monotonic()
    settings: SmtpSettings | None = None
    settings_error: str | None = None
    try:
        settings = SmtpSettings.from_env(environ)
        if settings is not None and max_smtp_timeout is not None:
            settings = replace(settings, timeout=min(settings.timeout, max_smtp_timeout))
    except ConfigError as exc:
        settings_error = f"SMTP settings: {exc}"
    # One claim at a time: what is not reached in this round stays due, untouched.
    for _ in range(limit):
        if time.monotonic() - started > time_budget:
            break
        claimed = control.claim_due_emails(1)
        if not claimed:
            break
        email = claimed[0]
        request = control.get(email.request_id)
        if request is None:  # cannot happen with the foreign key; never send blind
            continue
        if settings is None and settings_error is None:
            control.email_skipped(email.request_id, "email is off: GROUPSYNC_SMTP_HOST is not set")
            outcome.skipped += 1
            log(f"request {request.request_id}: no email sent (GROUPSYNC_SMTP_HOST is not set)")
            continue
        try:
            if settings is None:
                raise EmailDeliveryError(settings_error or "no SMTP settings")
            message = import_completion_message(
                report_for(request, environ), email.recipient, settings.sender
            )
            # The round's budget bounds each delivery too: a server that dribbles its
            # replies must not hold a sensor tick (Dagster ends ticks at 60 s).
            send_message(settings, message, environ, deadline=started + time_budget)
        except (EmailDeliveryError, ConfigError) as exc:
            status = control.email_failed(email.request_id, str(exc))
            if status == "failed":
                outcome.given_up += 1
                log(f"request {request.request_id}: email given up after a day: {exc}")
            else:
                outcome.retrying += 1
                log(f"request {request.request_id}: email not sent, will retry: {exc}")
            continue
        control.email_sent(email.request_id)
        outcome.sent += 1
        log(f"request {request.request_id}: completion email sent to {email.recipient}")
    return outcome
