"""The import request sensor: launches requested imports, settles the requests whose run ended
without saying so, and sends completion emails."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import dagster as dg

from groupsync_pipeline.completion_emails import send_completion_emails
from groupsync_pipeline.config import ConfigError, env_number
from groupsync_pipeline.defs.jobs import import_user_group
from groupsync_pipeline.defs.resources import LakeResource
from groupsync_pipeline.import_runs import REQUEST_ID_TAG, REQUEST_KEY_TAG, request_tags
from groupsync_pipeline.storage.control import (
    LEGACY_KEY_PREFIX,
    ControlStore,
    ImportRequest,
    committed_import,
)
from groupsync_pipeline.storage.lake import Lake

# The daemon's sensor loop comes round every 5 s; a minimum interval just under it makes the
# sensor tick on every round (at 5 s, rounds a hair early would be skipped: 10 s gaps). The
# tick reads a small SQLite file: cheap enough to run this often.
SENSOR_INTERVAL_SECONDS = 4
LAUNCH_BATCH = 25  # requests launched per tick: a tick stays far inside the 60 s limit
RECONCILE_BATCH = 500  # every launched request (active ones are bounded by the group limit)
EMAIL_BATCH = 10
EMAIL_TIME_BUDGET = 20.0  # seconds of SMTP per tick before no new email is started
EMAIL_DELIVERY_DEADLINE = 10.0  # total seconds for one delivery: a tick is killed at 60 s
# A launched request with no run after this long was lost (a tick whose run request never
# reached Dagster, a run deleted before it started): it is failed with the reason.
START_TIMEOUT_ENV = "GROUPSYNC_REQUEST_START_TIMEOUT_MINUTES"
DEFAULT_START_TIMEOUT = timedelta(minutes=10)
RELAUNCH_AFTER = timedelta(seconds=60)  # asked again (same run key: never twice) meanwhile
# A canceled run may still have a live worker (a forced termination marks it canceled at once):
# its request is settled only this long after the run ended, from the lake.
SETTLE_GRACE = timedelta(seconds=60)


def run_key(request: ImportRequest) -> str:
    """One run per request, ever: Dagster skips a run key it has already launched, and the
    request key is unique forever (a new control store starts ids at 1 again, not keys)."""
    return f"import-request-{request.request_key}"


def start_timeout(environ: Mapping[str, str] = os.environ) -> timedelta:
    default = DEFAULT_START_TIMEOUT.total_seconds() / 60
    return timedelta(minutes=env_number(environ, START_TIMEOUT_ENV, default, 1, 7 * 24 * 60))


def _run_request(request: ImportRequest) -> dg.RunRequest:
    config: dict[str, object] = {
        "connection": request.connection,
        # The id resolved when the request was accepted: a rename since then changes nothing.
        "group": request.remote_group_id or request.group_reference,
    }
    if request.notify_email:
        config["notify_email"] = request.notify_email
    return dg.RunRequest(
        run_key=run_key(request),
        run_config={"ops": {"imported_group_members": {"config": config}}},
        tags=request_tags(request),
    )


def _run_failure(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """The first failure message of a run that ended without recording its request."""
    for event_type in (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE):
        for record in instance.get_records_for_run(run.run_id, of_type=event_type).records:
            entry = record.event_log_entry
            error = getattr(entry.dagster_event.event_specific_data, "error", None)
            if error is not None and getattr(error, "message", None):
                return str(error.message).strip()
            if entry.message:
                return entry.message
    return f"the run ended as {run.status.value}"


def _find_run(instance: dg.DagsterInstance, request: ImportRequest) -> dg.DagsterRun | None:
    if request.run_id is not None:
        return instance.get_run_by_id(request.run_id)
    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={REQUEST_KEY_TAG: request.request_key}), limit=1
    )
    if not runs and request.request_key.startswith(LEGACY_KEY_PREFIX):
        # Launched by the previous release's sensor: its runs carry the request id only.
        runs = instance.get_runs(
            filters=dg.RunsFilter(tags={REQUEST_ID_TAG: str(request.request_id)}), limit=1
        )
    return runs[0] if runs else None


def _ended_recently(instance: dg.DagsterInstance, run: dg.DagsterRun, now: datetime) -> bool:
    """A canceled run that ended less than SETTLE_GRACE ago (a failed or successful run was
    ended by its own worker, or found dead: nothing more can come from it)."""
    if run.status != dg.DagsterRunStatus.CANCELED:
        return False
    record = instance.get_run_record_by_id(run.run_id)
    ended = None if record is None else record.end_time
    return ended is not None and now.timestamp() - ended < SETTLE_GRACE.total_seconds()


def _settle_from_warehouse(
    control: ControlStore, lake: Lake, request: ImportRequest, error: str
) -> str | None:
    """Done if the lake holds the import of the request's run, else failed. None: the
    lake is busy (a writer holds it) and the request is settled by a later tick."""
    with lake.read_if_free() as conn:
        if conn is None and lake.exists():
            return None
        outcome = None if conn is None else committed_import(conn, request)
    if outcome is not None and request.run_id is not None:
        changed = control.mark_done(request.request_id, request.run_id, outcome)
        return "done" if changed else None
    changed = control.mark_failed(request.request_id, error, run_id=request.run_id)
    return "failed" if changed else None


def reconcile(
    instance: dg.DagsterInstance,
    control: ControlStore,
    lake: Lake,
    now: datetime | None = None,
    timeout: timedelta = DEFAULT_START_TIMEOUT,
) -> tuple[dict[str, int], list[ImportRequest]]:
    """Settle launched requests whose run ended (killed worker, canceled run, bad run config,
    a crash between the lake commit and the request update), or never came to exist.

    The lake decides: a request whose run committed its import is done, whatever the
    run said afterwards. Returns the counts settled, and the launched requests that still have
    no run and should be asked for again.
    """
    now = now or datetime.now(UTC)
    settled = {"done": 0, "failed": 0}
    relaunch: list[ImportRequest] = []
    for request in control.launched_unfinished(RECONCILE_BATCH):
        run = _find_run(instance, request)
        if run is None:
            since = request.launched_at or request.started_at or request.requested_at
            if request.status == "pending" and now - since < timeout:
                if now - since >= RELAUNCH_AFTER:
                    relaunch.append(request)
                continue
            if request.status == "running" and request.run_id is not None:
                error = f"its run {request.run_id} no longer exists in Dagster"
            else:
                error = (
                    f"no Dagster run was started for it within {timeout} of its launch (the "
                    "run was never created, or was deleted)"
                )
            status = _settle_from_warehouse(control, lake, request, error)
        elif not run.is_finished or _ended_recently(instance, run, now):
            continue
        else:
            if request.run_id is None:  # ended before it could claim its request
                status = (
                    "failed"
                    if control.mark_failed(
                        request.request_id, _run_failure(instance, run), run_id=None
                    )
                    else None
                )
            else:
                error = _run_failure(instance, run)
                if run.status == dg.DagsterRunStatus.SUCCESS:
                    error = "the run succeeded but did not record the import (see the run log)"
                status = _settle_from_warehouse(control, lake, request, error)
        if status is not None:
            settled[status] += 1
    return settled, relaunch


@dg.sensor(
    job=import_user_group,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches one import run per pending import request (run key = the request's "
    "unique key), settles requests whose run ended without recording them (from what the "
    "lake holds), fails requests whose run never appeared, and sends completion emails.",
)
def import_request_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource
) -> dg.SensorResult:
    # The control store, and the lake only to settle a dead run and only if no writer
    # holds it: a tick never waits for an import.
    control = lake.control()
    try:
        timeout = start_timeout()
    except ConfigError as exc:
        raise dg.Failure(description=str(exc)) from None
    fresh = control.unlaunched(LAUNCH_BATCH)
    settled, relaunch = reconcile(context.instance, control, lake.get(), timeout=timeout)
    control.mark_launched(r.request_id for r in fresh)
    emails = send_completion_emails(
        control,
        log=context.log.info,
        limit=EMAIL_BATCH,
        time_budget=EMAIL_TIME_BUDGET,
        max_smtp_timeout=EMAIL_DELIVERY_DEADLINE,
    )
    if fresh or relaunch or any(settled.values()) or emails.sent or emails.retrying:
        context.log.info(
            f"launched {len(fresh)} import requests (asked again for {len(relaunch)}); "
            f"settled {settled['done']} done and {settled['failed']} failed whose run ended "
            f"without recording them; emails sent {emails.sent}, retrying {emails.retrying}"
        )
    return dg.SensorResult(run_requests=[_run_request(r) for r in [*fresh, *relaunch]])
