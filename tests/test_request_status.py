"""Request status tells the truth: the lake decides "imported", whatever dies when.

Each test reproduces a defect found by attacking the pipeline (kill -9 at a chosen point, a full
disk after COMMIT, a re-executed run, a deleted control store, a run that never exists) and
checks the request, the lake and the email agree.
"""

# ruff: noqa: F811  (the request tests' fixtures are imported and used as parameters)
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from groupsync_pipeline.definitions import defs
from groupsync_pipeline.import_runs import (
    CONNECTION_TAG,
    GROUP_TAG,
    REQUEST_ID_TAG,
    REQUEST_KEY_TAG,
)
from groupsync_pipeline.smtp_sink import SmtpSink
from groupsync_pipeline.storage.control import ControlStore
from tests.pipeline_helpers import query, run_job
from tests.test_import_requests import (  # noqa: F401 (fixtures)
    cli,
    data_dir,
    launch,
    requests_table,
    smtp,
    tick,
)


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance on disk, shared with the subprocesses that play killed runs."""
    home = tmp_path / "dagster-home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as dagster_instance:
        yield dagster_instance


_CRASHING_RUN = """
import json, os, sys
import dagster as dg
from groupsync_pipeline import imports
from groupsync_pipeline.definitions import defs
from groupsync_pipeline.storage.control import ControlStore

point, request = sys.argv[1], json.loads(sys.argv[2])
merge = imports.merge_group_members
def die(*args, **kwargs):
    os.kill(os.getpid(), 9)
if point == "before-commit":  # the members are merged, the transaction is not committed
    imports.merge_group_members = lambda *a, **k: (merge(*a, **k), die())
else:  # committed; the request is about to be marked done
    ControlStore.mark_done = die
with dg.DagsterInstance.get() as instance:
    defs.resolve_job_def("import_user_group").execute_in_process(
        run_config=request["run_config"], tags=request["tags"], instance=instance
    )
"""


def run_killed_at(
    point: str, request: dg.RunRequest, instance: dg.DagsterInstance
) -> dg.DagsterRun:
    """Carry out the run request in a process that is killed (-9) at ``point``."""
    payload = json.dumps(
        {
            "run_config": request.run_config,
            "tags": {**request.tags, "dagster/run_key": request.run_key},
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_RUN, point, payload],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    assert done.returncode == -9, done.stderr[-3000:]
    (run,) = instance.get_runs(
        filters=dg.RunsFilter(tags={REQUEST_KEY_TAG: request.tags[REQUEST_KEY_TAG]})
    )
    assert run.status == dg.DagsterRunStatus.STARTED  # the worker died mid-run
    # What Dagster does for a dead worker (its code server, or run monitoring's time limit).
    instance.report_run_failed(run)
    return run


def test_kill_before_commit_leaves_the_request_failed_not_done(
    data_dir: Path, instance: dg.DagsterInstance, smtp: SmtpSink
) -> None:
    assert (
        cli("import-group", "--connection", "contoso", "--group", "HR", "--notify", "a@b.io")[0]
        == 0
    )
    (request,) = tick(instance, data_dir).run_requests
    run_killed_at("before-commit", request, instance)
    assert requests_table(data_dir)[0][1] == "running"  # nothing claims it is done
    tick(instance, data_dir)
    (row,) = requests_table(data_dir)
    assert row[1] == "failed"
    assert query(data_dir, "SELECT count(*) FROM user_groups WHERE type = 'imported'") == [(0,)]
    tick(instance, data_dir)
    (mail,) = smtp.wait_for(1)
    assert "failed" in mail.message["Subject"]


def test_kill_after_commit_is_settled_as_done_from_the_warehouse(
    data_dir: Path, instance: dg.DagsterInstance, smtp: SmtpSink
) -> None:
    assert (
        cli("import-group", "--connection", "contoso", "--group", "HR", "--notify", "a@b.io")[0]
        == 0
    )
    (request,) = tick(instance, data_dir).run_requests
    run = run_killed_at("after-commit", request, instance)
    # The analysts' copy already says done: it is corrected by the lake's own record.
    assert query(data_dir, "SELECT status FROM import_requests") == [("done",)]
    tick(instance, data_dir)
    (stored,) = ControlStore(data_dir).recent()
    (members, synced_at) = query(
        data_dir, "SELECT members, synced_at FROM group_syncs WHERE run_id = ?", [run.run_id]
    )[0]
    assert (stored.status, stored.members, stored.run_id) == ("done", members, run.run_id)
    assert stored.finished_at == synced_at
    tick(instance, data_dir)
    (mail,) = smtp.wait_for(1)
    assert "imported" in mail.message["Subject"] and "failed" not in mail.message["Subject"]


def test_reexecuting_an_import_run_never_flips_its_request(
    data_dir: Path, instance: dg.DagsterInstance, sandbox
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    assert cli("import-group", "--connection", "contoso", "--group", "Legal")[0] == 0
    hr, legal = tick(instance, data_dir).run_requests
    sandbox.faults.add("error", path="transitiveMembers", status=400, count=100)
    assert not launch(instance, legal).success
    sandbox.faults.clear()
    first = launch(instance, hr)
    assert first.success
    assert [r[1] for r in requests_table(data_dir)] == ["done", "failed"]

    # Re-executing the done import (as the UI does: the parent's config and tags copied) is a
    # re-import recorded as a request of its own; request 1 stays as it was.
    with reexecute(instance, first.run_id) as again:
        assert again.success
    # Re-executing the failed one: a request of its own that repeats it.
    failed_run = instance.get_runs(filters=dg.RunsFilter(tags={REQUEST_ID_TAG: "2"}))[0]
    with reexecute(instance, failed_run.run_id) as retried:
        assert retried.success
    rows = {r.request_id: r for r in ControlStore(data_dir).recent()}
    assert (rows[1].status, rows[1].run_id) == ("done", first.run_id)
    assert (rows[2].status, rows[2].run_id) == ("failed", failed_run.run_id)
    assert (rows[3].status, rows[3].retry_of, rows[3].run_id) == ("done", 1, again.run_id)
    assert (rows[4].status, rows[4].retry_of, rows[4].run_id) == ("done", 2, retried.run_id)
    assert rows[3].source == rows[4].source == "launchpad"
    assert instance.get_run_by_id(retried.run_id).tags[REQUEST_ID_TAG] == "4"
    syncs = query(data_dir, "SELECT run_id, mode FROM group_syncs ORDER BY synced_at")
    assert syncs == [(first.run_id, "import"), (again.run_id, "import"), (retried.run_id, "import")]


def _import_job() -> dg.JobDefinition:
    return defs.resolve_job_def("import_user_group")


def reexecute(instance: dg.DagsterInstance, parent_run_id: str) -> dg.ExecuteJobResult:
    """Re-execute a run as the Dagster UI does: the parent's run config and tags copied."""
    parent = instance.get_run_by_id(parent_run_id)
    assert parent is not None
    return dg.execute_job(
        dg.reconstructable(_import_job),
        instance=instance,
        run_config=parent.run_config,
        tags={k: v for k, v in parent.tags.items() if not k.startswith("dagster/")},
        reexecution_options=dg.ReexecutionOptions(parent_run_id),
    )


def test_a_new_control_store_is_never_matched_to_old_runs(
    data_dir: Path, instance: dg.DagsterInstance
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (old,) = tick(instance, data_dir).run_requests
    assert launch(instance, old).success  # a finished run tagged with the old request 1
    for name in ("control.sqlite3", "control.sqlite3-wal", "control.sqlite3-shm"):
        (data_dir / name).unlink(missing_ok=True)
    # Request 1 again, for another group: its own run key, its own run.
    assert cli("import-group", "--connection", "contoso", "--group", "Legal")[0] == 0
    (new,) = tick(instance, data_dir).run_requests
    assert new.run_key != old.run_key
    tick(instance, data_dir)
    assert requests_table(data_dir) == [(1, "pending", "Legal", None)]
    assert launch(instance, new).success
    assert requests_table(data_dir) == [(1, "done", "Legal", None)]


def _age_launch(data_dir: Path, request_id: int, minutes: float) -> None:
    moment = (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()
    with sqlite3.connect(data_dir / "control.sqlite3") as conn:
        conn.execute(
            "UPDATE import_requests SET launched_at = ? WHERE request_id = ?", [moment, request_id]
        )


def test_a_request_whose_run_never_exists_is_asked_again_then_failed(
    data_dir: Path, instance: dg.DagsterInstance
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (lost,) = tick(instance, data_dir).run_requests  # the daemon never created this run
    assert tick(instance, data_dir).run_requests == []
    _age_launch(data_dir, 1, 2)
    (again,) = tick(instance, data_dir).run_requests  # same run key: Dagster runs it once
    assert again.run_key == lost.run_key
    _age_launch(data_dir, 1, 11)
    assert tick(instance, data_dir).run_requests == []
    (row,) = requests_table(data_dir)
    assert row[1] == "failed" and "no Dagster run was started for it" in row[3]
    # The group is free again: a new request is accepted.
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0


def test_a_running_request_whose_run_was_deleted_is_failed(
    data_dir: Path, instance: dg.DagsterInstance
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (request,) = tick(instance, data_dir).run_requests
    run = run_killed_at("before-commit", request, instance)
    instance.delete_run(run.run_id)
    tick(instance, data_dir)
    (row,) = requests_table(data_dir)
    assert row[1] == "failed" and "no longer exists" in row[3]


def test_cancel_a_pending_request(data_dir: Path, instance: dg.DagsterInstance) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (request,) = tick(instance, data_dir).run_requests
    code, out = cli("requests", "cancel", "1")
    assert code == 0 and "request 1: canceled" in out
    # The run that starts for it afterwards imports nothing and changes nothing.
    assert not launch(instance, request).success
    (row,) = requests_table(data_dir)
    assert row[1] == "canceled" and "canceled by" in row[3]
    assert query(data_dir, "SELECT count(*) FROM user_groups") == [(0,)]
    code, out = cli("requests", "cancel", "1")
    assert code != 0 and "request 1 is canceled" in out
    code, out = cli("requests", "cancel", "7")
    assert code != 0 and "no request 7" in out
    # A canceled request can be asked for again.
    code, out = cli("requests", "retry", "1")
    assert code == 0 and "request 2: retry of request 1" in out


def test_retry_obeys_the_limit_and_the_imported_check(
    data_dir: Path,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    connections_file: Path,
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    assert cli("requests", "cancel", "1")[0] == 0
    # HR is imported meanwhile from the launchpad: retrying request 1 is refused.
    assert run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "HR"},
        connections_file,
        data_dir,
    ).success
    code, out = cli("requests", "retry", "1")
    assert code != 0 and "already imported" in out and "Nothing was recorded" in out
    assert cli("import-group", "--connection", "contoso", "--group", "Legal")[0] == 0
    assert cli("requests", "cancel", "3")[0] == 0
    monkeypatch.setenv("GROUPSYNC_MAX_IMPORTED_GROUPS", "1")
    code, out = cli("requests", "retry", "3")
    assert code != 0 and "at most 1 groups" in out
    assert len(requests_table(data_dir)) == 3


def test_launchpad_runs_record_the_group_so_duplicates_are_refused(
    data_dir: Path,
    instance: dg.DagsterInstance,
    connections_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from groupsync_pipeline.config import load_connections
    from groupsync_pipeline.import_runs import RunIdentity, claim_request
    from groupsync_pipeline.storage.lake import Lake

    # A launchpad run that has recorded its request and is importing now.
    running = claim_request(
        RunIdentity("launchpad-run", {}, None),
        connection=load_connections(connections_file)[0],
        connection_error=None,
        group="Finance",
        notify_email=None,
        lake=Lake(data_dir),
    )
    assert (running.status, running.group_name, running.remote_group_id is not None) == (
        "running",
        "Finance",
        True,
    )
    code, out = cli("import-group", "--connection", "contoso", "--group", "Finance")
    assert code != 0 and f"request {running.request_id} is running" in out
    # A second launchpad run of the same group is refused, recorded as failed, imports nothing.
    result = run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "Finance"},
        connections_file,
        data_dir,
    )
    assert not result.success
    latest = ControlStore(data_dir).recent()[0]
    assert latest.status == "failed" and "is running" in (latest.error or "")
    assert query(data_dir, "SELECT count(*) FROM user_groups") == [(0,)]
    # The launchpad path counts toward the limit like any other.
    monkeypatch.setenv("GROUPSYNC_MAX_IMPORTED_GROUPS", "1")
    refused = run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "Legal"},
        connections_file,
        data_dir,
    )
    assert not refused.success
    latest = ControlStore(data_dir).recent()[0]
    assert "at most 1 groups" in (latest.error or "")
    # The refused run says what it was asked to do, like every import run.
    tags = instance.get_run_by_id(refused.run_id).tags
    assert tags[REQUEST_ID_TAG] == str(latest.request_id) and tags[GROUP_TAG] == "Legal"


def test_every_import_run_says_what_it_does(
    data_dir: Path, instance: dg.DagsterInstance, connections_file: Path
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (request,) = tick(instance, data_dir).run_requests
    assert request.tags[CONNECTION_TAG] == "contoso" and request.tags[GROUP_TAG] == "HR"
    launched = launch(instance, request)
    pad = run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "Legal"},
        connections_file,
        data_dir,
    )
    for result, request_id, group in ((launched, "1", "HR"), (pad, "2", "Legal")):
        tags = instance.get_run_by_id(result.run_id).tags
        assert tags[REQUEST_ID_TAG] == request_id and tags[GROUP_TAG] == group
        assert tags[CONNECTION_TAG] == "contoso" and len(tags[REQUEST_KEY_TAG]) == 32


def _follow_in_background(*args: str) -> subprocess.Popen[str]:
    groupsync = Path(sys.executable).with_name("groupsync")
    return subprocess.Popen(
        [str(groupsync), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _play_daemon_until(
    waiter: subprocess.Popen[str], instance: dg.DagsterInstance, data: Path
) -> tuple[str, str]:
    """Tick the sensor and carry out its runs, as the daemon would, until ``waiter`` exits."""
    deadline = datetime.now(UTC) + timedelta(seconds=120)
    while waiter.poll() is None:
        assert datetime.now(UTC) < deadline, "the waiting command never returned"
        for request in tick(instance, data).run_requests:
            launch(instance, request)
    out, err = waiter.communicate()
    return out, err


def test_import_group_wait_returns_when_members_are_queryable(
    data_dir: Path, instance: dg.DagsterInstance, sandbox
) -> None:
    waiter = _follow_in_background(
        "import-group", "--connection", "contoso", "--group", "HR", "--group", "Legal", "--wait"
    )
    out, err = _play_daemon_until(waiter, instance, data_dir)
    assert waiter.returncode == 0, err
    assert "request 1 (HR): pending" in out and "request 1 (HR): done" in out
    assert "request 2 (Legal): done" in out
    # Returned only once both are queryable by analysts.
    assert query(data_dir, "SELECT count(*) FROM user_groups") == [(2,)]
    # A failing import: exit 1, with its error.
    sandbox.faults.add("error", path="transitiveMembers", status=400, count=100)
    waiter = _follow_in_background("import-group", "--connection", "contoso", "--group", "Finance",
                                   "--wait", "--timeout", "2m")  # fmt: skip
    out, err = _play_daemon_until(waiter, instance, data_dir)
    assert waiter.returncode == 1 and "request 3 (Finance): failed: " in out and "HTTP 400" in out


def test_import_group_wait_gives_up_after_its_timeout(data_dir: Path) -> None:
    code, out = cli("import-group", "--connection", "contoso", "--group", "HR", "--wait",
                    "--timeout", "1s")  # fmt: skip
    assert code == 2
    assert "request 1 (HR): pending (not launched yet)" in out and "gave up waiting" in out
    assert requests_table(data_dir)[0][1] == "pending"  # it goes on without the command
    code, out = cli("import-group", "--connection", "contoso", "--group", "Legal",
                    "--timeout", "soon")  # fmt: skip
    assert code == 2 and "not a duration" in out
    assert len(requests_table(data_dir)) == 1  # a bad option records nothing
    code, out = cli("import-group", "--connection", "contoso", "--group", "Legal")
    assert code == 0 and "groupsync requests wait 2" in out


def test_following_a_request_shows_hostile_names_and_errors_as_text(data_dir: Path) -> None:
    from groupsync_pipeline.storage.control import NewRequest

    store = ControlStore(data_dir)
    evil = "HR\x1b]0;pwned\x07\u202eexe.txt"
    (request_id,) = store.add_requests([NewRequest("contoso", evil, "g-1", evil, None)])
    store.mark_failed(request_id, "boom\x1b[2J\nforged line")
    code, out = cli("requests", "wait", str(request_id), "--timeout", "5s")
    assert code == 1
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b]0;pwned" in out and "\\u202e" in out and "boom\\x1b[2J\\nforged line" in out
    assert len(out.strip().splitlines()) == 1  # no forged row


def test_the_warehouse_wins_over_a_run_reported_ended_too_early(
    data_dir: Path, instance: dg.DagsterInstance
) -> None:
    """A forced termination marks the run canceled at once while its worker still imports:
    the request is not settled within the grace period, and if it was marked failed, the
    run's own commit still makes it done."""
    from groupsync_pipeline.defs.sensors import SETTLE_GRACE, reconcile
    from groupsync_pipeline.storage.lake import Lake

    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (request,) = tick(instance, data_dir).run_requests
    job = defs.resolve_job_def("import_user_group")
    run = instance.create_run_for_job(job, run_config=request.run_config, tags=request.tags)
    store = ControlStore(data_dir)
    claimed = store.claim(request.tags[REQUEST_KEY_TAG], run.run_id)
    assert claimed is not None
    instance.report_run_canceled(run)  # forced termination: reported ended at once
    tick(instance, data_dir)
    assert requests_table(data_dir)[0][1] == "running"  # within the grace period
    later = datetime.now(UTC) + SETTLE_GRACE + timedelta(seconds=5)
    settled, _ = reconcile(instance, store, Lake(data_dir), now=later)
    assert settled == {"done": 0, "failed": 1}
    # The worker was still alive and commits its import: the lake decides.
    from groupsync_pipeline.config import load_connections
    from groupsync_pipeline.import_runs import carry_out

    connection = load_connections(os.environ["GROUPSYNC_CONNECTIONS"])[0]
    failed = store.get(claimed.request_id)
    assert failed is not None and failed.status == "failed"
    carry_out(failed, connection, run.run_id, Lake(data_dir), log=lambda line: None)
    assert requests_table(data_dir)[0][1] == "done"
    assert query(data_dir, "SELECT status FROM import_requests") == [("done",)]
