"""Import requests end to end: CLI -> control store -> sensor -> real run -> completion email."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from groupsync_pipeline.cli import main
from groupsync_pipeline.definitions import defs
from groupsync_pipeline.defs.resources import LakeResource
from groupsync_pipeline.defs.sensors import import_request_sensor, run_key
from groupsync_pipeline.import_runs import REQUEST_ID_TAG
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.smtp_sink import SmtpSink
from groupsync_pipeline.storage.control import ControlStore, NewRequest
from tests.pipeline_helpers import query, run_job


@pytest.fixture
def data_dir(tmp_path: Path, connections_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory with the sandbox catalog stored, used by CLI, sensor and runs alike."""
    directory = tmp_path / "data"
    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(directory))
    monkeypatch.setenv("GROUPSYNC_CONNECTIONS", str(connections_file))
    for name in ("HOST", "PORT", "FROM", "SECURITY", "USERNAME", "PASSWORD_ENV"):
        monkeypatch.delenv(f"GROUPSYNC_SMTP_{name}", raising=False)
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_job(instance, "refresh_group_catalogs", {}, connections_file, directory)
    assert result.success
    return directory


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as dagster_instance:
        yield dagster_instance


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        monkeypatch.setenv("GROUPSYNC_SMTP_HOST", sink.host)
        monkeypatch.setenv("GROUPSYNC_SMTP_PORT", str(sink.port))
        monkeypatch.setenv("GROUPSYNC_SMTP_SECURITY", "none")
        monkeypatch.setenv("GROUPSYNC_SMTP_FROM", "groupsync@example.test")
        monkeypatch.setenv("GROUPSYNC_DAGSTER_URL", "https://dagster.example.test")
        yield sink


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def tick(instance: dg.DagsterInstance, data_dir: Path) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance,
        resources={"lake": LakeResource(data_dir=str(data_dir))},
    )
    result = import_request_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def launch(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """Carry out a sensor's run request as the daemon would (same config and tags)."""
    return defs.resolve_job_def("import_user_group").execute_in_process(
        run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
        instance=instance,
        raise_on_error=False,
    )


def requests_table(data_dir: Path) -> list[tuple]:
    return [
        (r.request_id, r.status, r.group_name, r.error)
        for r in reversed(ControlStore(data_dir).recent())
    ]


def test_request_is_recorded_at_once_and_listed(data_dir: Path) -> None:
    code, out = cli(
        "import-group", "--connection", "contoso", "--group", "HR", "--group", "Finance"
    )
    assert code == 0, out
    assert "request 1: import of 'HR' from contoso is pending" in out
    assert "request 2:" in out
    assert requests_table(data_dir) == [(1, "pending", "HR", None), (2, "pending", "Finance", None)]
    code, out = cli("requests")
    assert code == 0
    assert "pending\tcontoso\tHR" in out and "pending\tcontoso\tFinance" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--connection", "nope", "--group", "HR"), "unknown connection 'nope'"),
        (("--connection", "contoso", "--group", "Finanse"), "did you mean: Finance"),
        (("--connection", "contoso", "--group", "HR", "--notify", "a@b"), "not a valid email"),
        (
            ("--connection", "contoso", "--group", "HR", "--notify", "x@example.com\nBcc: y@z.io"),
            "not a valid email",
        ),
        (("--connection", "contoso", "--group", "HR", "--group", "HR"), "named twice"),
    ],
)
def test_refused_requests_record_nothing(
    data_dir: Path, args: tuple[str, ...], message: str
) -> None:
    code, out = cli("import-group", *args)
    assert code != 0
    assert message in out
    assert "Nothing was recorded" in out
    assert requests_table(data_dir) == []


def test_refuses_pending_and_imported_groups(data_dir: Path, instance: dg.DagsterInstance) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    code, out = cli(
        "import-group", "--connection", "contoso", "--group", "Finance", "--group", "HR"
    )
    assert code != 0 and "request 1 is pending" in out
    assert len(requests_table(data_dir)) == 1  # Finance was not recorded either
    (request,) = tick(instance, data_dir).run_requests
    assert launch(instance, request).success
    code, out = cli("import-group", "--connection", "contoso", "--group", "HR")
    assert code != 0 and "already imported as contoso:" in out and "re-syncs every hour" in out


def test_limit_on_imported_groups(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUPSYNC_MAX_IMPORTED_GROUPS", "2")
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    code, out = cli(
        "import-group", "--connection", "contoso", "--group", "Finance", "--group", "Legal"
    )
    assert code != 0 and "at most 2 groups" in out
    assert len(requests_table(data_dir)) == 1


def test_sensor_launches_one_run_per_request_and_sends_one_email(
    data_dir: Path, instance: dg.DagsterInstance, smtp: SmtpSink
) -> None:
    code, _ = cli(
        "import-group",
        "--connection",
        "contoso",
        "--group",
        "Executives",
        "--notify",
        "ciso@example.com",
    )
    assert code == 0
    first = tick(instance, data_dir)
    (request,) = first.run_requests
    stored = ControlStore(data_dir).get(1)
    assert stored is not None and stored.launched_at is not None
    assert request.run_key == run_key(stored) and request.tags[REQUEST_ID_TAG] == "1"
    # The next tick does not launch it again.
    assert tick(instance, data_dir).run_requests == []
    run = launch(instance, request)
    assert run.success
    assert requests_table(data_dir)[0][:2] == (1, "done")
    assert query(data_dir, "SELECT request_id, status FROM import_requests") == [(1, "done")]

    tick(instance, data_dir)
    (mail,) = smtp.wait_for(1)
    assert mail.rcpt_tos == ("ciso@example.com",)
    assert "'Executives' imported from contoso" in mail.message["Subject"]
    body = mail.message.get_body(("plain",)).get_content()
    members = query(data_dir, "SELECT members FROM group_syncs")[0][0]
    assert f"{members}" in body
    assert f"https://dagster.example.test/runs/{run.run_id}" in body
    # Repeated ticks (a restarted or failed tick included) send nothing more.
    tick(instance, data_dir)
    tick(instance, data_dir)
    assert len(smtp.received) == 1
    assert ControlStore(data_dir).outbox()[0]["status"] == "sent"


def test_failed_import_marks_request_and_emails_the_error(
    data_dir: Path, instance: dg.DagsterInstance, smtp: SmtpSink, sandbox: GraphSandbox
) -> None:
    assert (
        cli(
            "import-group", "--connection", "contoso", "--group", "HR", "--notify", "hr@example.com"
        )[0]
        == 0
    )
    (request,) = tick(instance, data_dir).run_requests
    sandbox.faults.add("error", path="transitiveMembers", status=400, count=100)
    run = launch(instance, request)
    assert not run.success
    (row,) = requests_table(data_dir)
    assert row[1] == "failed" and "HTTP 400" in row[3]
    tick(instance, data_dir)
    (mail,) = smtp.wait_for(1)
    assert "failed" in mail.message["Subject"]
    body = mail.message.get_body(("plain",)).get_content()
    assert "HTTP 400" in body and "groupsync requests retry 1" in body
    # Retrying is explicit: a new request that names the old one.
    sandbox.faults.clear()
    code, out = cli("requests", "retry", "1")
    assert code == 0 and "request 2: retry of request 1" in out
    (retry,) = tick(instance, data_dir).run_requests
    retried = ControlStore(data_dir).get(2)
    assert retried is not None and retry.run_key == run_key(retried)
    assert launch(instance, retry).success
    assert [r[:2] for r in requests_table(data_dir)] == [(1, "failed"), (2, "done")]
    code, out = cli("requests", "retry", "2")
    assert code != 0 and "only failed or canceled requests" in out


def test_no_email_without_notify_and_none_when_smtp_is_off(
    data_dir: Path, instance: dg.DagsterInstance, smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "Legal")[0] == 0
    assert (
        cli(
            "import-group", "--connection", "contoso", "--group", "HR", "--notify", "a@example.com"
        )[0]
        == 0
    )
    for request in tick(instance, data_dir).run_requests:
        assert launch(instance, request).success
    monkeypatch.delenv("GROUPSYNC_SMTP_HOST")
    tick(instance, data_dir)
    assert smtp.received == []
    (entry,) = ControlStore(data_dir).outbox()  # only the request that asked for one
    assert entry["request_id"] == 2 and entry["status"] == "skipped"
    assert "GROUPSYNC_SMTP_HOST" in entry["last_error"]


def test_smtp_down_is_retried_later_and_never_fails_the_import(
    data_dir: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SmtpSink() as sink:
        port = sink.port  # a port that is free again once the sink stops
    monkeypatch.setenv("GROUPSYNC_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("GROUPSYNC_SMTP_PORT", str(port))
    monkeypatch.setenv("GROUPSYNC_SMTP_SECURITY", "none")
    monkeypatch.setenv("GROUPSYNC_SMTP_FROM", "groupsync@example.test")
    assert (
        cli(
            "import-group", "--connection", "contoso", "--group", "HR", "--notify", "a@example.com"
        )[0]
        == 0
    )
    (request,) = tick(instance, data_dir).run_requests
    assert launch(instance, request).success
    tick(instance, data_dir)
    (entry,) = ControlStore(data_dir).outbox()
    assert entry["status"] == "pending" and entry["attempts"] == 1
    assert f"127.0.0.1:{port}" in entry["last_error"]
    assert requests_table(data_dir)[0][1] == "done"
    tick(instance, data_dir)  # not due yet: no second attempt
    assert ControlStore(data_dir).outbox()[0]["attempts"] == 1
    with SmtpSink() as sink:
        monkeypatch.setenv("GROUPSYNC_SMTP_PORT", str(sink.port))
        with sqlite3.connect(data_dir / "control.sqlite3") as conn:  # the wait has passed
            conn.execute("UPDATE email_outbox SET next_attempt_at = '2000-01-01T00:00:00+00:00'")
        tick(instance, data_dir)
        tick(instance, data_dir)
        (mail,) = sink.wait_for(1)
        assert mail.rcpt_tos == ("a@example.com",)
        assert len(sink.received) == 1
    assert ControlStore(data_dir).outbox()[0]["status"] == "sent"


def test_launchpad_runs_are_recorded_as_requests(
    data_dir: Path, instance: dg.DagsterInstance, connections_file: Path
) -> None:
    result = run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "Finance"},
        connections_file,
        data_dir,
    )
    assert result.success
    (request,) = ControlStore(data_dir).recent()
    assert (request.source, request.status, request.group_name) == ("launchpad", "done", "Finance")
    assert request.run_id == result.run_id and request.members and request.members > 0
    bad = run_job(
        instance,
        "import_user_group",
        {"connection": "contoso", "group": "No such group"},
        connections_file,
        data_dir,
    )
    assert not bad.success
    latest = ControlStore(data_dir).recent()[0]
    assert latest.status == "failed" and "No such group" in (latest.error or "")


def test_request_whose_run_died_is_marked_failed(
    data_dir: Path, instance: dg.DagsterInstance
) -> None:
    assert cli("import-group", "--connection", "contoso", "--group", "HR")[0] == 0
    (request,) = tick(instance, data_dir).run_requests
    job = defs.resolve_job_def("import_user_group")
    run = instance.create_run_for_job(job, run_config=request.run_config, tags=request.tags)
    instance.report_run_failed(run)  # as when a run worker is killed before the step starts
    tick(instance, data_dir)
    (row,) = requests_table(data_dir)
    assert row[1] == "failed" and row[3]


def test_launchpad_request_whose_run_died_is_marked_failed(
    data_dir: Path, instance: dg.DagsterInstance
) -> None:
    job = defs.resolve_job_def("import_user_group")
    run = instance.create_run_for_job(
        job,
        run_config={
            "ops": {"imported_group_members": {"config": {"connection": "contoso", "group": "HR"}}}
        },
    )
    # The run recorded itself, then its worker was killed mid-import.
    (request_id,) = ControlStore(data_dir).add_requests(
        [NewRequest("contoso", "HR", None, None, None, source="launchpad", run_id=run.run_id)]
    )
    assert tick(instance, data_dir).run_requests == []  # running, never pending: not relaunched
    assert requests_table(data_dir) == [(request_id, "running", None, None)]
    instance.report_run_failed(run)
    tick(instance, data_dir)
    assert requests_table(data_dir)[0][1] == "failed"
