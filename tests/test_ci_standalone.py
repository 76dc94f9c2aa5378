"""The repository stands alone: nothing reads outside it, CI fails on skips and on any failing
step (.ci/run clones HEAD into an empty folder and runs the README's test command there)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .skip_guard import FAIL_ON_SKIP_ENV

REPO = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match its own rule.
_SHARED = "sha" + "red"
FORBIDDEN = ("api-" + "reference", "../" + _SHARED, "/work/" + _SHARED, _SHARED + "/api")
TEXT_SUFFIXES = {".py", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sql", ".json"}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def outside_references(source: str) -> list[str]:
    """String values in Python source (docstrings and comments aside) that name the reference
    folder outside the repository."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    return [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and any(bad in node.value for bad in FORBIDDEN)
    ]


def project_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    files = [REPO / name for name in listed if name]
    return [
        path
        for path in files
        if path.is_file()
        and (path.suffix in TEXT_SUFFIXES or path.parent.name == ".ci")
        # The vendors' own examples are data, not code that reads files.
        and "tests/data/vendor" not in path.relative_to(REPO).as_posix()
    ]


def test_the_detector_flags_the_old_ways_of_reaching_the_reference() -> None:
    old = (
        '"""Docs may cite shared' + "/api-" + 'reference/CONTRACTS.md."""\n'
        "from pathlib import Path\n"
        'API = Path(__file__).resolve().parents[2] / "sha' + 'red" / "api-' + 'reference"\n'
        'OTHER = open("../' + 'shared/x.json")\n'
    )
    flagged = outside_references(old)
    assert len(flagged) == 2 and flagged[0].startswith("line 3") and "line 4" in flagged[1]


def test_no_project_file_reads_outside_the_repository() -> None:
    files = project_files()
    assert Path(__file__) in files and REPO / ".ci" / "run" in files  # the scan sees files
    offenders: list[str] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".py":
            hits = outside_references(text)
        else:
            hits = [
                f"line {number}: {line.strip()!r}"
                for number, line in enumerate(text.splitlines(), 1)
                if any(bad in line for bad in FORBIDDEN)
            ]
        offenders += [f"{path.relative_to(REPO)} {hit}" for hit in hits]
    assert offenders == []


def test_vendor_examples_are_in_the_repository_with_their_source() -> None:
    import json

    from .conftest import VENDOR_EXAMPLES

    examples = sorted(VENDOR_EXAMPLES.glob("*/*.json"))
    assert len(examples) >= 9
    for path in examples:
        keys = json.loads(path.read_text(encoding="utf-8"))
        assert any(k.startswith(("_source", "_provenance")) for k in keys), path


# --- the skip guard ---------------------------------------------------------------------------

PROBE = """
import pytest

def test_runs():
    assert True

def test_needs_a_browser():
    pytest.skip("chromium is not installed")
"""
MODULE_SKIP = """
import pytest
pytest.skip("vendor file missing", allow_module_level=True)
"""


def _run_probe(tmp_path: Path, files: dict[str, str], fail_on_skip: bool) -> tuple[int, str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != FAIL_ON_SKIP_ENV}
    if fail_on_skip:
        env[FAIL_ON_SKIP_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.skip_guard", "-p", "no:cacheprovider"]
        + ["-q", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=REPO,  # `python -m` puts it on sys.path: tests.skip_guard imports
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def test_a_skip_fails_the_run_when_ci_says_so(tmp_path: Path) -> None:
    files = {"test_probe_a.py": PROBE, "test_probe_b.py": MODULE_SKIP}
    code, output = _run_probe(tmp_path, files, fail_on_skip=True)
    assert code == 1, output
    assert "2 test(s) skipped, which fails this run" in output
    assert "test_probe_a.py::test_needs_a_browser: Skipped: chromium is not installed" in output
    assert "test_probe_b.py: Skipped: vendor file missing" in output

    code, output = _run_probe(tmp_path, files, fail_on_skip=False)
    assert code == 0, output  # locally a skip is only reported


def test_a_run_without_skips_passes_under_the_guard(tmp_path: Path) -> None:
    code, output = _run_probe(
        tmp_path, {"test_probe_c.py": "def test_ok():\n    assert True\n"}, fail_on_skip=True
    )
    assert code == 0, output
    assert "which fails this run" not in output


# --- .ci/run ------------------------------------------------------------------------------


def test_ci_stops_when_the_install_fails(tmp_path: Path) -> None:
    """A failing `pip install` must fail CI at once (it used to go on to ruff and exit 0)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.fail(".ci/run needs a git checkout of the repository and git")
    # A constraint no version satisfies: pip refuses to install the project itself.
    constraint = tmp_path / "impossible.txt"
    constraint.write_text("groupsync==0.0.0\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PIP_CONSTRAINT": str(constraint), "TMPDIR": str(scratch)}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "No matching distribution found for groupsync" in output
    assert "ci: passed" not in output and "passed in" not in output  # pytest never ran
    assert list(scratch.iterdir()) == []  # the clone and the venv are removed
