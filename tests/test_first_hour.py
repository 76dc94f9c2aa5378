"""A new user's first hour: what the README and the commands promise holds."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement

from groupsync_pipeline.cli import main
from groupsync_pipeline.storage.lake import Lake

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_duckdb_is_pinned_to_a_bounded_range_that_is_installed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (duckdb,) = [
        requirement
        for requirement in map(Requirement, project["dependencies"])
        if requirement.name == "duckdb"
    ]
    bounds = {spec.operator for spec in duckdb.specifier}
    assert "<" in bounds or "==" in bounds, f"duckdb is not bounded above: {duckdb}"
    assert duckdb.specifier.contains(version("duckdb")), (duckdb, version("duckdb"))


def _section(title: str) -> str:
    start = README.index(title)
    following = re.search(r"\n#{2,3} ", README[start + len(title) :])
    return README[start : start + len(title) + (following.start() if following else len(README))]


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's Python, run as a first script would: in a folder holding groupsync-data.
    now = datetime.now(UTC)
    with Lake(tmp_path / "groupsync-data").write() as conn:
        conn.execute(
            "INSERT INTO user_groups (group_id, name, type, imported_at, member_count, group_key) "
            "VALUES ('c:hr', 'HR', 'imported', $t, 1, 1)",
            {"t": now},
        )
        conn.execute(
            "INSERT INTO accounts VALUES ('c', 'a1', 'ann@x.io', 'Ann', 'ann@x.io', 'Member', "
            "false, true, $t, $t)",
            {"t": now},
        )
        conn.execute(
            "INSERT INTO group_memberships VALUES ('c:hr', 'c', 'a1', $t, NULL)", {"t": now}
        )
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert blocks, "the README shows no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_activities_for_a_group_imported_after_the_window_start_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    now = datetime.now(UTC)
    finance_at = now - timedelta(minutes=10)
    with Lake(data).write() as conn:
        conn.execute(
            "INSERT INTO user_groups (group_id, name, type, imported_at, member_count, group_key)"
            " VALUES ('c:fin', 'Finance', 'imported', $fin, 3, 1), "
            "('c:hr', 'HR', 'imported', $hr, 2, 2), "
            "('c:auto:external', 'External', 'automatic', $fin, 0, 3)",
            {"fin": finance_at, "hr": now - timedelta(days=2)},
        )

    def activities(*args: str) -> str:
        result = CliRunner().invoke(main, ["activities", "--data-dir", str(data), *args])
        assert result.exit_code == 0, result.output
        return result.stderr

    hint = activities("--group", "Finance", "--since", "1h")
    assert "0 activities shown" in hint
    assert (
        f"Finance was imported at {finance_at:%Y-%m-%d %H:%M:%S} UTC; activities are tagged "
        "with it only from then on" in hint
    )
    assert "was imported" not in activities("--group", "HR", "--since", "1h")  # before the window
    assert "External was created at" in activities("--group", "External", "--since", "1h")
    # No window: an empty answer for a new group explains itself too.
    assert "Finance was imported at" in activities("--group", "finance")
    # The hint goes to stderr: piped data stays clean.
    piped = CliRunner().invoke(
        main, ["activities", "--data-dir", str(data), "--group", "Finance", "--format", "json"]
    )
    assert piped.stdout.strip() == "[]" and "Finance was imported at" in piped.stderr


def test_workspace_and_dg_name_the_code_location_groupsync() -> None:
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    assert entry["python_module"]["location_name"] == "groupsync"
    from dagster_dg_core.config import normalize_cli_config  # noqa: F401  (dg is installed)
    from dagster_dg_core.context import DgContext

    context = DgContext.for_project_environment(ROOT, {})
    assert context.code_location_name == "groupsync"
    assert context.code_location_target_module_name == entry["python_module"]["module_name"]


def test_dagster_home_command_follows_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["dagster-home"])
    assert result.exit_code == 0, result.output
    home = Path(result.stdout.strip())
    assert home == tmp_path / "groupsync-data" / "dagster"
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    assert settings["concurrency"]["pools"]["default_limit"] == 1
    assert settings["run_monitoring"]["free_slots_after_run_end_seconds"] > 0

    monkeypatch.setenv("GROUPSYNC_DATA_DIR", str(tmp_path / "elsewhere"))
    moved = CliRunner().invoke(main, ["dagster-home"])
    assert Path(moved.stdout.strip()) == tmp_path / "elsewhere" / "dagster"
    # A DAGSTER_HOME already chosen is kept (and given the settings if it has none).
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "mine"))
    kept = CliRunner().invoke(main, ["dagster-home"])
    assert Path(kept.stdout.strip()) == tmp_path / "mine"
    assert (tmp_path / "mine" / "dagster.yaml").exists()
    # The settings are the repository's top-level dagster.yaml (the project's fixed layout),
    # which the package ships through a link.
    assert (home / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text()


def test_readme_documents_the_new_commands() -> None:
    quick_start = _section("## Quick start")
    assert "duckdb -readonly" not in README
    assert "groupsync sql" in quick_start
    ui = _section("### The Dagster UI")
    assert "export DAGSTER_HOME=$(groupsync dagster-home)" in ui and "dg dev" in ui
    assert "dagster dev" not in README
    commands = _section("## Commands")
    for command in ("groupsync sql", "groupsync groups", "groupsync dagster-home"):
        assert f"`{command}" in commands, command
