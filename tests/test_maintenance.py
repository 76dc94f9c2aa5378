"""Lake maintenance on a real lake: compaction, retention of whole days, the Dagster job."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.storage.lake import Lake, LakeBusyError
from groupsync_pipeline.storage.maintenance import (
    ACTIVITY_RETENTION_ENV,
    FILE_GRACE_ENV,
    SNAPSHOT_RETENTION_ENV,
    MaintenanceSettings,
    lake_files,
    retention_cutoff,
    run_maintenance,
)

# Everything unused goes at once: the tests' snapshots and files are seconds old.
AT_ONCE = MaintenanceSettings(activity_retention_days=0, snapshot_retention_days=0,
                              file_grace_hours=0)  # fmt: skip

_INSERT_ACTIVITIES = """
INSERT INTO activities (activity_id, connection, app, source, event_id, occurred_at,
                        actor_account_id, action, raw, ingested_at)
SELECT $first + i, 'contoso', 'office365', 'signIns', 'ev-' || ($first + i),
       $day + INTERVAL (i * 7) MINUTE, 'u' || (i % 3), 'Sign-in', '{"Id": ' || i || '}', now()
FROM range($count) AS t(i)
"""
_INSERT_TAGS = """
INSERT INTO _activity_group_keys
SELECT activity_id, 1, (occurred_at AT TIME ZONE 'UTC')::DATE FROM activities
WHERE activity_id >= $first AND activity_id < $first + $count AND actor_account_id = 'u0'
"""


@pytest.fixture(autouse=True)
def _embedded_lake(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "GROUPSYNC_LAKE_CATALOG",
        "GROUPSYNC_LAKE_DATA_PATH",
        "GROUPSYNC_DATA_DIR",
        ACTIVITY_RETENTION_ENV,
        SNAPSHOT_RETENTION_ENV,
        FILE_GRACE_ENV,
    ):
        monkeypatch.delenv(name, raising=False)


def _write_batch(lake: Lake, first: int, day: datetime, count: int = 12) -> None:
    """One small ingest: a few activities (more than DuckLake inlines) and their tags."""
    with lake.write() as conn:
        params = {"first": first, "day": day, "count": count}
        conn.execute(_INSERT_ACTIVITIES, params)
        conn.execute(_INSERT_TAGS, {"first": first, "count": count})


def _disk_files(data: Path) -> int:
    return sum(1 for _ in (data / "lake" / "data").rglob("*.parquet"))


def _everything(lake: Lake) -> tuple[list[tuple], list[tuple], list[tuple]]:
    with lake.read() as conn:
        return (
            conn.execute("SELECT * FROM activities ORDER BY activity_id").fetchall(),
            conn.execute("SELECT * FROM _activity_group_keys ORDER BY ALL").fetchall(),
            conn.execute("SELECT * FROM group_memberships ORDER BY ALL").fetchall(),
        )


def test_many_small_writes_are_compacted_and_nothing_changes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lake = Lake(data)
    base = datetime(2026, 5, 1, 22, tzinfo=UTC)
    for batch in range(8):  # 8 ingests of 24 events over 2 h 48 min from 22:00: two days each
        _write_batch(lake, batch * 100, base + timedelta(days=batch % 2), count=24)
    with lake.write() as conn:  # a tiny write DuckLake inlines into the catalog
        conn.execute("INSERT INTO group_memberships VALUES ('g', 'contoso', 'u0', now(), NULL)")
    stored = _everything(lake)
    with lake.read() as conn:
        before = lake_files(conn)
    activity_files = data / "lake" / "data" / "main" / "activities"
    assert len(list(activity_files.rglob("*.parquet"))) == 16
    disk_before = _disk_files(data)
    assert before.inlined_rows >= 1

    report = run_maintenance(lake, AT_ONCE)

    assert _everything(lake) == stored
    assert report.before == before
    after = report.after
    # One file per table and day: activities and tags of 1, 2 and 3 May.
    assert len(list(activity_files.rglob("*.parquet"))) == 3
    # 16 small files and 66 inlined rows became 8 files: 3 + 3 days, memberships, schema state.
    assert after.live_files <= before.live_files / 2
    assert after.inlined_rows == 0
    assert _disk_files(data) == after.live_files <= disk_before / 2
    assert after.stored_files == after.live_files  # the replaced small files are gone
    steps = {step.name: step.figures for step in report.steps}
    assert steps["merge adjacent files"]["files merged"] >= 16
    assert steps["flush inlined data"]["rows flushed"] >= 1
    assert steps["cleanup old files"]["files deleted"] >= 16
    assert steps["expire snapshots"]["snapshots expired"] >= 9


def test_retention_deletes_whole_old_days_and_never_memberships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    lake = Lake(data)
    now = datetime.now(UTC)
    cutoff = retention_cutoff(now, 180)
    assert cutoff is not None and cutoff.hour == 0 and cutoff.minute == 0
    old_day, last_old, first_kept = cutoff - timedelta(days=30), cutoff - timedelta(days=1), cutoff
    _write_batch(lake, 0, old_day, count=24)  # 24 x 7 minutes: within the day
    _write_batch(lake, 100, last_old + timedelta(hours=21), count=24)  # up to 23:41
    _write_batch(lake, 200, first_kept, count=24)  # from 00:00 exactly
    _write_batch(lake, 300, now.replace(hour=0, minute=0), count=24)
    with lake.write() as conn:
        # Membership history older than any retention: never expired.
        conn.execute(
            "INSERT INTO group_memberships VALUES "
            "('g', 'contoso', 'u0', $long_ago, $old), ('g', 'contoso', 'u0', $old, NULL)",
            {"long_ago": now - timedelta(days=2000), "old": old_day},
        )
        # Sign-ins' pairings of name and account: 30 days count, older ones go.
        conn.execute(
            "INSERT INTO _sign_in_names VALUES ('contoso', 'ann@x', 'u0', $old), "
            "('contoso', 'ann@x', 'u0', $first), ('contoso', 'ann@x', 'u0', $today)",
            {
                "old": (now - timedelta(days=31)).date(),
                "first": (now - timedelta(days=30)).date(),
                "today": now.date(),
            },
        )
    _, _, memberships = _everything(lake)
    old_folder = data / "lake" / "data" / "main" / "activities" / f"year={old_day.year}"
    assert any(old_folder.rglob("*.parquet"))

    monkeypatch.setenv(ACTIVITY_RETENTION_ENV, "180")
    settings = MaintenanceSettings.from_env()
    assert settings.activity_retention_days == 180
    report = run_maintenance(lake, MaintenanceSettings(180, 0, 0), now=now)

    activities, tags, kept_memberships = _everything(lake)
    assert sorted({row[0] // 100 for row in activities}) == [2, 3]  # the two newer batches
    assert len(activities) == 48
    assert min(row[5] for row in activities) == first_kept
    assert {row[0] // 100 for row in tags} == {2, 3} and len(tags) == 16
    assert kept_memberships == memberships
    retention = report.steps[0]
    assert retention.figures["activities deleted"] == 48
    assert retention.figures["tags deleted"] == 16
    with lake.read() as conn:
        pairing_days = conn.execute("SELECT signed_in_on FROM _sign_in_names ORDER BY 1").fetchall()
    assert pairing_days == [((now - timedelta(days=30)).date(),), (now.date(),)]

    # The deleted days' files are gone from storage, the kept days' are there.
    def day_folders(day: datetime) -> dict[str, str]:  # each table's partition of that day
        return {
            "activities": f"year={day.year}/month={day.month}/day={day.day}",
            "_activity_group_keys": f"occurred_on={day.date().isoformat()}",
        }

    for day in (old_day, last_old, first_kept):
        for table, folder in day_folders(day).items():
            files = list((data / "lake" / "data" / "main" / table).glob(f"{folder}/*.parquet"))
            assert bool(files) == (day == first_kept), (table, folder)


def test_retention_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ACTIVITY_RETENTION_ENV, raising=False)
    assert MaintenanceSettings.from_env().activity_retention_days == 180
    monkeypatch.setenv(ACTIVITY_RETENTION_ENV, "0")
    assert MaintenanceSettings.from_env().activity_retention_days == 0
    assert retention_cutoff(datetime.now(UTC), 0) is None  # 0: kept forever
    for wrong in ("-1", "1.5", "a week"):
        monkeypatch.setenv(ACTIVITY_RETENTION_ENV, wrong)
        with pytest.raises(ConfigError, match=ACTIVITY_RETENTION_ENV):
            MaintenanceSettings.from_env()
    # Whole days: on 1 July at 15:00, 180 days keep everything from 2 January 00:00 UTC on.
    assert retention_cutoff(datetime(2026, 7, 1, 15, tzinfo=UTC), 180) == datetime(
        2026, 1, 2, tzinfo=UTC
    )


def test_maintenance_waits_for_the_writer_lock(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "data", lock_timeout=0.5)
    lake.ensure_ready()
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with lake.writer_lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        held.wait(5)
        with pytest.raises(LakeBusyError):
            run_maintenance(lake, MaintenanceSettings(0, 0, 0))
    finally:
        release.set()
        thread.join()


def test_the_dagster_job_runs_and_reports_its_figures(tmp_path: Path) -> None:
    from groupsync_pipeline.definitions import defs
    from groupsync_pipeline.defs.resources import LakeResource

    data = tmp_path / "data"
    lake = Lake(data)
    day = datetime.now(UTC).replace(hour=1, minute=0) - timedelta(days=2)
    for batch in range(3):  # three small files in the same day's partition
        _write_batch(lake, batch * 100, day + timedelta(hours=batch))
    job = defs.resolve_job_def("lake_maintenance")
    schedule = defs.resolve_schedule_def("lake_maintenance_schedule")
    assert schedule.cron_schedule == "30 3 * * *" and schedule.job_name == job.name
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, resources={"lake": LakeResource(data_dir=str(data))}
        )
    assert result.success
    (output,) = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = {key: value.value for key, value in output.step_output_data.metadata.items()}
    # The defaults: the three small activity files merged, the inlined tags flushed, nothing
    # expired (a week of time travel), nothing of the last 180 days deleted.
    assert metadata["before: live_files"] == 3 and metadata["before: inlined_rows"] > 0
    assert metadata["merge adjacent files: files merged"] == 3
    assert metadata["after: inlined_rows"] == 0
    assert metadata["expire snapshots: snapshots expired"] == 0
    assert metadata["activity retention: activities deleted"] == 0
    assert metadata["after: stored_files"] > metadata["after: live_files"]
    assert metadata["seconds"] > 0
