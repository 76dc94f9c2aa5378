"""The import request sensor: launches requested imports and sends completion emails."""

from __future__ import annotations

import dagster as dg

from groupsync_pipeline.completion_emails import send_completion_emails
from groupsync_pipeline.defs.assets import REQUEST_TAG
from groupsync_pipeline.defs.jobs import import_user_group
from groupsync_pipeline.defs.resources import WarehouseResource
from groupsync_pipeline.storage.control import ControlStore, ImportRequest

LAUNCH_BATCH = 25  # requests launched per tick: a tick stays far inside the 60 s limit
RECONCILE_BATCH = 50
EMAIL_BATCH = 10
EMAIL_TIME_BUDGET = 20.0  # seconds of SMTP per tick before no new email is started
EMAIL_SMTP_TIMEOUT = 5.0  # per SMTP step: a hung server cannot hold the tick for long


def run_key(request_id: int) -> str:
    """One run per request, ever: Dagster skips a run key it has already launched."""
    return f"import-request-{request_id}"


def _run_request(request: ImportRequest) -> dg.RunRequest:
    config: dict[str, object] = {
        "connection": request.connection,
        # The id resolved when the request was accepted: a rename since then changes nothing.
        "group": request.remote_group_id or request.group_reference,
    }
    if request.notify_email:
        config["notify_email"] = request.notify_email
    return dg.RunRequest(
        run_key=run_key(request.request_id),
        run_config={"ops": {"imported_group_members": {"config": config}}},
        tags={REQUEST_TAG: str(request.request_id)},
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


def reconcile(instance: dg.DagsterInstance, control: ControlStore, up_to: int) -> int:
    """Mark failed the launched requests whose run ended without recording an outcome
    (killed worker, canceled run, bad run config): nothing else would ever finish them."""
    marked = 0
    for request in control.launched_unfinished(up_to, RECONCILE_BATCH):
        if request.run_id is not None:
            run = instance.get_run_by_id(request.run_id)
        else:
            runs = instance.get_runs(
                filters=dg.RunsFilter(tags={REQUEST_TAG: str(request.request_id)}), limit=1
            )
            run = runs[0] if runs else None
        if run is None or not run.is_finished:
            continue
        error = _run_failure(instance, run)
        if run.status == dg.DagsterRunStatus.SUCCESS:
            error = "the run succeeded but did not record the import (see the run log)"
        if control.mark_failed(request.request_id, error, only_if_active=True):
            marked += 1
    return marked


@dg.sensor(
    job=import_user_group,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches one import run per pending import request (run key = request id), "
    "marks requests whose run died as failed, and sends completion emails.",
)
def import_request_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource
) -> dg.SensorResult:
    # The control store only: a sensor must never open (and so wait for) the DuckDB warehouse.
    control = warehouse.control()
    cursor = int(context.cursor or 0)
    requests = control.pending_after(cursor, LAUNCH_BATCH)
    new_cursor = max([cursor, *(r.request_id for r in requests)])
    failed = reconcile(context.instance, control, cursor)
    emails = send_completion_emails(
        control,
        log=context.log.info,
        limit=EMAIL_BATCH,
        time_budget=EMAIL_TIME_BUDGET,
        max_smtp_timeout=EMAIL_SMTP_TIMEOUT,
    )
    if requests or failed or emails.sent or emails.retrying:
        context.log.info(
            f"launched {len(requests)} import requests; {failed} ended without an outcome; "
            f"emails sent {emails.sent}, retrying {emails.retrying}"
        )
    return dg.SensorResult(
        run_requests=[_run_request(request) for request in requests],
        cursor=str(new_cursor),
    )
