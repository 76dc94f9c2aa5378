"""The ``groupsync`` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from groupsync_pipeline.config import DEFAULT_DATA_DIR, ConfigError, load_connections


@click.group()
def main() -> None:
    """groupsync: import user groups from connected apps into DuckDB, through Dagster."""


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Where the DuckDB files and the demo's Dagster instance are written.",
)
def demo(data_dir: Path) -> None:
    """Run the whole lifecycle against the sandbox tenant and show what it stored."""
    from groupsync_pipeline.demo import DemoError, run_demo

    try:
        run_demo(data_dir.expanduser().resolve(), click.echo)
    except DemoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command("connections")
def connections_command() -> None:
    """Validate the connections file and list the connections (never their secrets)."""
    try:
        connections = load_connections()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for connection in connections:
        where = "embedded sandbox" if connection.sandbox else connection.graph_url
        click.echo(f"{connection.name}\t{connection.app}\t{where}")


@main.command()
@click.option("--port", default=0, show_default=True, help="Port to listen on (0: any free).")
def sandbox(port: int) -> None:
    """Serve the sandbox Microsoft 365 tenant on loopback until interrupted."""
    from groupsync_pipeline.demo import sandbox_connections_yaml
    from groupsync_pipeline.sandbox.graph import GraphSandbox

    with GraphSandbox(port=port) as tenant:
        click.echo(sandbox_connections_yaml(tenant, "SANDBOX_CLIENT_SECRET"))
        click.echo(f"# export SANDBOX_CLIENT_SECRET={tenant.client_secret}   (a fake secret)")
        click.echo("# Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _warehouse(data_dir: Path | None) -> Any:
    from groupsync_pipeline.config import data_dir as configured_data_dir
    from groupsync_pipeline.storage.warehouse import Warehouse

    return Warehouse(configured_data_dir(data_dir))


_DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: $GROUPSYNC_DATA_DIR, else ./groupsync-data).",
)


@main.command("import-group")
@click.option("--connection", required=True, help="The connection to import from.")
@click.option(
    "--group",
    "groups",
    required=True,
    multiple=True,
    help="The group's id or exact display name; repeat for several groups.",
)
@click.option("--notify", default=None, help="Email this address when each import ends.")
@_DATA_DIR_OPTION
def import_group_command(
    connection: str, groups: tuple[str, ...], notify: str | None, data_dir: Path | None
) -> None:
    """Ask for groups to be imported; answers at once with the request ids."""
    from groupsync_pipeline.import_requests import RequestRefusedError, request_imports

    try:
        ids = request_imports(connection, list(groups), _warehouse(data_dir), notify_email=notify)
    except RequestRefusedError as exc:
        raise click.ClickException(f"{exc}. Nothing was recorded.") from None
    for request_id, group in zip(ids, groups, strict=True):
        click.echo(f"request {request_id}: import of {group!r} from {connection} is pending")
    click.echo(
        "The import_request_sensor launches it within a minute; `groupsync requests` "
        "shows progress."
    )


def _when(moment: Any) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


@main.group("requests", invoke_without_command=True)
@click.option("--status", type=click.Choice(["pending", "running", "done", "failed"]))
@click.option("--limit", default=50, show_default=True)
@_DATA_DIR_OPTION
@click.pass_context
def requests_command(
    ctx: click.Context, status: str | None, limit: int, data_dir: Path | None
) -> None:
    """List import requests with their status (newest first)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = data_dir
        return
    from groupsync_pipeline.storage.control import ControlStore

    warehouse = _warehouse(data_dir)
    rows = ControlStore(warehouse.data_dir).recent((status,) if status else None, limit)
    if not rows:
        click.echo("no import requests")
        return
    click.echo("id\tstatus\tconnection\tgroup\trequested (UTC)\tfinished (UTC)\tmembers\tdetail")
    for r in rows:
        detail = r.error or (f"run {r.run_id}" if r.run_id else "")
        if r.retry_of:
            detail = f"retry of {r.retry_of}; {detail}"
        click.echo(
            f"{r.request_id}\t{r.status}\t{r.connection}\t{r.group_name or r.group_reference}\t"
            f"{_when(r.requested_at)}\t{_when(r.finished_at)}\t"
            f"{'' if r.members is None else r.members}\t{detail.splitlines()[0] if detail else ''}"
        )


@requests_command.command("retry")
@click.argument("request_id", type=int)
@click.pass_obj
def retry_command(data_dir: Path | None, request_id: int) -> None:
    """Ask again for a failed import (a new request that names the old one)."""
    from groupsync_pipeline.import_requests import RequestRefusedError, retry_request

    try:
        new_id = retry_request(request_id, _warehouse(data_dir))
    except RequestRefusedError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"request {new_id}: retry of request {request_id} is pending")


@main.command("confirm-shrink")
@click.argument("group")
@click.option("--connection", default=None, help="Needed when GROUP is a name used twice.")
@_DATA_DIR_OPTION
def confirm_shrink_command(group: str, connection: str | None, data_dir: Path | None) -> None:
    """Allow the held-back sync of GROUP (group id or name) to remove its members."""
    import getpass

    from groupsync_pipeline.storage.control import ControlStore

    warehouse = _warehouse(data_dir)
    with warehouse.read() as conn:
        holds = conn.execute(
            """
            SELECT h.group_id, g.name, h.members_before, h.members_after, h.detected_at
            FROM membership_holds AS h JOIN user_groups AS g USING (group_id)
            WHERE h.status = 'held' AND (h.group_id = $group OR g.name = $group)
              AND ($connection IS NULL OR g.connection = $connection)
            """,
            {"group": group, "connection": connection},
        ).fetchall()
    if not holds:
        raise click.ClickException(f"no held-back sync for group {group!r}")
    if len(holds) > 1:
        ids = ", ".join(row[0] for row in holds)
        raise click.ClickException(f"{group!r} names several held groups ({ids}): give the id")
    group_id, name, before, after, detected = holds[0]
    ControlStore(warehouse.data_dir).confirm_shrink(group_id, getpass.getuser(), before, after)
    click.echo(
        f"confirmed: {name!r} ({group_id}) may go from {before} to {after} members "
        f"(held since {detected:%Y-%m-%d %H:%M} UTC). The next hourly sync applies it; "
        "launch the sync_group_memberships job to apply it now."
    )
