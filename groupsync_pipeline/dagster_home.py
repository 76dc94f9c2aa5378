"""Where Dagster keeps runs, schedules and sensor state: one DAGSTER_HOME convention.

``DAGSTER_HOME`` if it is set, else ``<data dir>/dagster``. The demo stores its runs there, and
the README starts the UI with ``export DAGSTER_HOME=$(groupsync dagster-home)`` and ``dg dev``,
so the run links in completion emails open runs the UI knows. The folder gets groupsync's
instance settings (the bundled ``dagster.yaml``: the writer pool, run monitoring) when it has
no ``dagster.yaml`` of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from groupsync_pipeline.config import data_dir as configured_data_dir

if TYPE_CHECKING:
    import dagster as dg

DAGSTER_HOME_ENV = "DAGSTER_HOME"
HOME_FOLDER = "dagster"  # under the data directory
SETTINGS_FILE = "dagster.yaml"


def dagster_home(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``$DAGSTER_HOME`` if set, else ``<data dir>/dagster`` (absolute, as Dagster requires)."""
    chosen = os.environ.get(DAGSTER_HOME_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser().resolve()
    return configured_data_dir(data_dir) / HOME_FOLDER


def bundled_settings() -> str:
    return resources.files("groupsync_pipeline").joinpath(SETTINGS_FILE).read_text()


def prepare_dagster_home(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Create the Dagster home if needed, with groupsync's settings unless it has its own."""
    home = dagster_home(data_dir)
    home.mkdir(parents=True, exist_ok=True)
    settings = home / SETTINGS_FILE
    if not settings.exists():
        settings.write_text(bundled_settings())
    return home


@contextmanager
def open_dagster_instance(
    data_dir: str | os.PathLike[str] | None = None,
) -> Iterator[dg.DagsterInstance]:
    """The Dagster instance in that home: the one `dg dev` opens with the README's command."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(prepare_dagster_home(data_dir))) as instance:
        yield instance
