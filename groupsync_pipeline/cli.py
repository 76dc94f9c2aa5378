"""The ``groupsync`` command."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import signal
import sqlite3
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import click

from groupsync_pipeline.config import DEFAULT_DATA_DIR, ConfigError, load_connections
from groupsync_pipeline.safe_text import for_terminal


class StorageFailure(click.ClickException):
    """A file the command needs cannot be read or written: one line, no traceback."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


# SQLite's words for a file it cannot use (its exceptions carry no path).
_SQLITE_STORAGE = re.compile(
    r"disk is full|disk I/O error|unable to open database file|readonly database|"
    r"database disk image is malformed|file is not a database"
)
_DUCKDB_FILE = re.compile(
    r'^(?:IO Error: )?(?P<what>[^"]*)"(?P<path>[^"]+)"(?::\s*(?P<cause>.*))?$'
)


_STREAMS = {1: "standard output", 2: "standard error"}


def _failed_stream(exc: BaseException) -> str | None:
    """'standard output' when writing the output failed (e.g. redirected to a full disk)."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        for value in frame.f_locals.values():
            if not isinstance(value, io.IOBase):
                continue
            try:
                fd = value.fileno()
            except (OSError, ValueError):
                continue
            if fd in _STREAMS:
                with contextlib.suppress(OSError):
                    # What is still buffered goes nowhere: exiting must not fail again.
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, fd)
                    os.close(devnull)
                return _STREAMS[fd]
    return None


def _sqlite_path(exc: BaseException) -> str:
    control = sys.modules.get("groupsync_pipeline.storage.control")
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if control is not None and isinstance(owner, control.ControlStore):
            return str(owner.path)
    return "the control store"


_FULL_DISK = re.compile(r"database or disk is full|No space left on device")


def storage_failure(exc: BaseException) -> str | None:
    """``<path>: <cause>`` for a file system or database file failure, else None."""
    if type(exc).__module__.startswith("pandas"):
        # pandas' DatabaseError (an OSError subclass) wraps the control store's SQLite error.
        cause = exc.__cause__
        return f"{_sqlite_path(exc)}: {cause}" if isinstance(cause, sqlite3.Error) else None
    if isinstance(exc, OSError) and exc.errno != errno.EPIPE:  # click handles a closed pipe
        where = exc.filename if exc.filename is not None else _failed_stream(exc)
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        cause = exc.strerror or str(exc) or type(exc).__name__
        return f"{where}: {cause}" if where is not None else cause
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(exc, duckdb.IOException):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        match = _DUCKDB_FILE.match(first)
        if match is None:
            return first
        what = match["what"].strip().rstrip(":").lower()
        return f"{match['path']}: {match['cause'] or what}" + (
            f" ({what})" if match["cause"] and what else ""
        )
    if isinstance(exc, sqlite3.OperationalError) and _SQLITE_STORAGE.search(str(exc)):
        return f"{_sqlite_path(exc)}: {exc}"
    lake = sys.modules.get("groupsync_pipeline.storage.lake")
    if lake is not None and isinstance(exc, lake.LakeConfigError | lake.LakeBusyError):
        return str(exc)
    if duckdb is not None and isinstance(exc, duckdb.Error) and _FULL_DISK.search(str(exc)):
        # The lake's catalog or data files: DuckDB nests the SQLite error in its own words.
        return f"the lake: {_FULL_DISK.search(str(exc))[0]}"
    return None


class _Main(click.Group):
    """Every error is one message for people: names in it neutralized, no traceback for a
    full disk, a read-only or missing directory, or a file in the way."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            # Messages quote names from outside (groups, files, servers' answers).
            exc.message = for_terminal(exc.message, keep_newlines=True)
            raise
        except Exception as exc:
            message = storage_failure(exc)
            if message is None:
                raise
            raise StorageFailure(for_terminal(message)) from None


@click.group(cls=_Main)
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
        cells = (connection.name, connection.app, where)
        click.echo("\t".join(for_terminal(cell) for cell in cells))


@main.command()
@click.option("--port", default=0, show_default=True, help="Port to listen on (0: any free).")
def sandbox(port: int) -> None:
    """Serve the sandbox Microsoft 365 tenant on loopback until interrupted."""
    from groupsync_pipeline.demo import sandbox_connections_yaml
    from groupsync_pipeline.sandbox.graph import GraphSandbox

    class Stop(Exception):
        pass

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stop

    # A service manager stops it with SIGTERM (a closed terminal sends SIGHUP): leave the
    # `with` as Ctrl-C does, so the temporary folder with the TLS private key is removed.
    stopping = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    # A stop that arrives while the tenant starts is taken once it has started, not halfway.
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    with GraphSandbox(port=port) as tenant:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
            click.echo(sandbox_connections_yaml(tenant, "SANDBOX_CLIENT_SECRET"))
            click.echo(f"# export SANDBOX_CLIENT_SECRET={tenant.client_secret}   (a fake secret)")
            click.echo("# Ctrl-C or SIGTERM to stop")
            while True:
                time.sleep(3600)
        except (KeyboardInterrupt, Stop):
            pass
        finally:
            for signum in stopping:  # a second stop must not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)


def _warehouse(data_dir: Path | None) -> Any:
    from groupsync_pipeline.config import data_dir as configured_data_dir
    from groupsync_pipeline.storage.lake import Lake

    return Lake(configured_data_dir(data_dir))


_DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: $GROUPSYNC_DATA_DIR, else ./groupsync-data).",
)


@main.command("lake")
@_DATA_DIR_OPTION
def lake_command(data_dir: Path | None) -> None:
    """Where the lake is, and how to attach it from Python or a DuckDB 1.5.5 shell."""
    from groupsync_pipeline.storage.lake import attach_instructions

    click.echo(for_terminal(attach_instructions(_warehouse(data_dir)), keep_newlines=True))


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
@click.option(
    "--wait",
    is_flag=True,
    help="Return only when every import has ended and its members are queryable, "
    "printing progress; exit 1 if one failed, 2 if time ran out.",
)
@click.option(
    "--timeout",
    default="10m",
    show_default=True,
    help="With --wait: how long to wait (90s, 10m, 2h). The imports go on after it.",
)
@_DATA_DIR_OPTION
def import_group_command(
    connection: str,
    groups: tuple[str, ...],
    notify: str | None,
    wait: bool,
    timeout: str,
    data_dir: Path | None,
) -> None:
    """Ask for groups to be imported; answers at once with the request ids (or, with --wait,
    when the members are queryable)."""
    from groupsync_pipeline.import_requests import (
        RequestRefusedError,
        request_imports,
    )
    from groupsync_pipeline.investigation import InvestigationError, parse_duration

    try:
        wait_for = parse_duration(timeout, "--timeout").total_seconds()
    except InvestigationError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None
    lake = _warehouse(data_dir)
    try:
        ids = request_imports(connection, list(groups), lake, notify_email=notify)
    except RequestRefusedError as exc:
        raise click.ClickException(f"{exc}. Nothing was recorded.") from None
    for request_id, group in zip(ids, groups, strict=True):
        click.echo(f"request {request_id}: import of {group!r} from {connection} is pending")
    if not wait:
        click.echo(
            "The import_request_sensor launches it within seconds (with Dagster's daemon "
            "running). Follow it with `groupsync requests`, or wait for it with "
            f"`groupsync requests wait {' '.join(map(str, ids))}`."
        )
        return
    _follow(ids, lake, wait_for)


def _follow(ids: list[int], lake: Any, timeout: float) -> None:
    from groupsync_pipeline.import_requests import follow_requests

    # Group names and errors come from the apps: shown neutralized, like every listing.
    outcome = follow_requests(
        ids, lake, timeout=timeout, echo=lambda line: click.echo(for_terminal(line))
    )
    if outcome.unfinished:
        click.echo(
            f"gave up waiting after {timeout:.0f} s for request(s) "
            f"{', '.join(map(str, outcome.unfinished))}; they go on (is Dagster's daemon "
            "running? `export DAGSTER_HOME=$(groupsync dagster-home); dg dev` starts it)",
            err=True,
        )
        sys.exit(2)
    if outcome.failed:
        sys.exit(1)


def _when(moment: Any) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


@main.group("requests", invoke_without_command=True)
@click.option("--status", type=click.Choice(["pending", "running", "done", "failed", "canceled"]))
@click.option("--limit", default=50, show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table (tab-separated, for people) or csv/json with every field (UTC ISO 8601 times).",
)
@_DATA_DIR_OPTION
@click.pass_context
def requests_command(
    ctx: click.Context, status: str | None, limit: int, fmt: str, data_dir: Path | None
) -> None:
    """List import requests with their status (newest first)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = data_dir
        return
    from groupsync_pipeline.storage.control import ControlStore

    lake = _warehouse(data_dir)
    rows = ControlStore(lake.data_dir).recent((status,) if status else None, limit)
    if fmt != "table":
        click.echo(_requests_machine_output(rows, fmt), color=True)  # color: keep data exact
        return
    if not rows:
        click.echo("no import requests")
        return
    click.echo("id\tstatus\tconnection\tgroup\trequested (UTC)\tfinished (UTC)\tmembers\tdetail")
    for r in rows:
        detail = r.error or (f"run {r.run_id}" if r.run_id else "")
        if r.retry_of:
            detail = f"retry of {r.retry_of}; {detail}"
        cells = (
            r.request_id, r.status, r.connection, r.group_name or r.group_reference,
            _when(r.requested_at), _when(r.finished_at), "" if r.members is None else r.members,
            detail.splitlines()[0] if detail else "",
        )  # fmt: skip
        # Names and errors come from the apps: no escape, newline or tab may act.
        click.echo("\t".join(for_terminal(str(cell)) for cell in cells))


def _requests_machine_output(rows: list[Any], fmt: str) -> str:
    import dataclasses

    import pandas as pd

    from groupsync_pipeline.investigation import to_csv, to_json
    from groupsync_pipeline.storage.control import ImportRequest

    columns = [f.name for f in dataclasses.fields(ImportRequest)]
    records = [
        {
            name: pd.Timestamp(value) if isinstance(value, datetime) else value
            for name, value in dataclasses.asdict(row).items()
        }
        for row in rows
    ]
    frame = pd.DataFrame(records, columns=columns, dtype=object)  # object: ints stay ints
    return (to_json(frame) if fmt == "json" else to_csv(frame)).rstrip("\n")


@requests_command.command("retry")
@click.argument("request_id", type=int)
@click.pass_obj
def retry_command(data_dir: Path | None, request_id: int) -> None:
    """Ask again for a failed or canceled import (a new request that names the old one)."""
    from groupsync_pipeline.import_requests import RequestRefusedError, retry_request

    try:
        new_id = retry_request(request_id, _warehouse(data_dir))
    except RequestRefusedError as exc:
        raise click.ClickException(f"{exc}. Nothing was recorded.") from None
    click.echo(f"request {new_id}: retry of request {request_id} is pending")


@requests_command.command("cancel")
@click.argument("request_id", type=int)
@click.pass_obj
def cancel_command(data_dir: Path | None, request_id: int) -> None:
    """Cancel a pending import request (a run already started for it imports nothing)."""
    import getpass

    from groupsync_pipeline.storage.control import ControlStore, RequestRefusal

    try:
        request = ControlStore(_warehouse(data_dir).data_dir).cancel(request_id, getpass.getuser())
    except RequestRefusal as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"request {request.request_id}: canceled")


@requests_command.command("wait")
@click.argument("request_ids", type=int, nargs=-1, required=True)
@click.option("--timeout", default="10m", show_default=True, help="How long to wait.")
@click.pass_obj
def wait_command(data_dir: Path | None, request_ids: tuple[int, ...], timeout: str) -> None:
    """Wait until the requests ended and their members are queryable, printing progress."""
    from groupsync_pipeline.import_requests import RequestRefusedError
    from groupsync_pipeline.investigation import InvestigationError, parse_duration

    try:
        seconds = parse_duration(timeout, "--timeout").total_seconds()
    except InvestigationError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None
    try:
        _follow(list(request_ids), _warehouse(data_dir), seconds)
    except RequestRefusedError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("confirm-shrink")
@click.argument("group")
@click.option("--connection", default=None, help="Needed when GROUP is a name used twice.")
@_DATA_DIR_OPTION
def confirm_shrink_command(group: str, connection: str | None, data_dir: Path | None) -> None:
    """Allow the held-back sync of GROUP (group id or name) to remove its members."""
    import getpass

    from groupsync_pipeline.storage.control import ControlStore

    lake = _warehouse(data_dir)
    with lake.read() as conn:
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
    ControlStore(lake.data_dir).confirm_shrink(group_id, getpass.getuser(), before, after)
    click.echo(
        f"confirmed: {name!r} ({for_terminal(group_id)}) may go from {before} to {after} members "
        f"(held since {detected:%Y-%m-%d %H:%M} UTC). The next hourly sync applies it; "
        "launch the sync_group_memberships job to apply it now."
    )


_FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table for people; csv or json for tools (UTC ISO 8601 times; groups as an array, "
    "in csv as JSON text).",
)
_LIMIT_OPTION = click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Newest rows to show; 0 shows all.",
)
_TIME_HELP = (
    "a duration back from now (30m, 24h, 7d, 2w) or a UTC date/time (2026-11-01, 2026-11-01T10:00Z)"
)


def _emit(
    found: Any,
    fmt: str,
    noun: str,
    table_columns: tuple[str, ...] | None = None,
    order: str = "newest first",
) -> None:
    from groupsync_pipeline.investigation import footer, render

    output = render(found, fmt, table_columns)
    if output:
        # color=True: click would otherwise strip escape sequences from csv values when
        # piped, altering the data (tables already neutralize control characters).
        click.echo(output, color=True)
    if fmt == "table":
        click.echo(footer(found, noun, order), err=True)  # stderr: piped csv/json stay clean


@main.command("activities")
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Group name (case-insensitive) or group id; repeat to match ANY of several groups.",
)
@click.option("--since", default=None, help=f"Only activities at or after this: {_TIME_HELP}.")
@click.option(
    "--until",
    default=None,
    help="Only activities before this (same forms; a bare date includes that whole day).",
)
@click.option(
    "--action",
    "actions",
    multiple=True,
    help="Action (case-insensitive exact), e.g. FileDownloaded; repeat.",
)
@click.option("--country", "countries", multiple=True, help="ISO country code, e.g. US; repeat.")
@click.option(
    "--country-not",
    "countries_not",
    multiple=True,
    help="Leave out this country; repeat. Activities with no known country are KEPT "
    "(an unknown location is worth a look).",
)
@click.option("--as", "actor", default=None, help="Actor email (case-insensitive) or account id.")
@click.option("--connection", default=None, help="Only this connection.")
@_LIMIT_OPTION
@_FORMAT_OPTION
@_DATA_DIR_OPTION
def activities_command(
    groups: tuple[str, ...],
    since: str | None,
    until: str | None,
    actions: tuple[str, ...],
    countries: tuple[str, ...],
    countries_not: tuple[str, ...],
    actor: str | None,
    connection: str | None,
    limit: int,
    fmt: str,
    data_dir: Path | None,
) -> None:
    """List activities from the apps' audit logs, newest first, with their tagged groups.

    Filters combine with AND; a repeated option matches any of its values.
    """
    from datetime import UTC, datetime

    from groupsync_pipeline.analyst_data import AnalystDataError, open_analyst_data
    from groupsync_pipeline.investigation import (
        ActivityFilter,
        find_activities,
        import_hints,
        parse_countries,
        parse_since,
        parse_until,
    )

    now = datetime.now(UTC)
    try:
        # Parse everything before opening the file, so typos fail fast even with no data.
        flt = ActivityFilter(
            groups=groups,
            since=parse_since(since, now) if since else None,
            until=parse_until(until, now) if until else None,
            actions=actions,
            countries=parse_countries(countries),
            countries_not=parse_countries(countries_not, "--country-not"),
            actor=actor,
            connection=connection,
            limit=limit,
        )
        with open_analyst_data(_warehouse(data_dir).data_dir, "activities") as conn:
            found = find_activities(conn, flt)
            hints = import_hints(conn, flt, found)
    except AnalystDataError as exc:
        raise click.ClickException(str(exc)) from None
    columns = (
        "occurred_at", "connection", "actor_email", "action", "object_name",
        "ip_address", "country", "city", "success", "groups",
    )  # fmt: skip
    _emit(found, fmt, "activities", columns)
    for hint in hints:  # why a newly imported group shows little (the forward-only rule)
        click.echo(hint, err=True)


@main.command("alerts")
@click.option("--since", default=None, help=f"Only alerts raised at or after this: {_TIME_HELP}.")
@click.option("--policy", default=None, help="Only this policy's alerts (exact name).")
@click.option(
    "--severity",
    type=click.Choice(["low", "medium", "high", "critical"]),
    default=None,
    help="Only alerts of exactly this severity.",
)
@_LIMIT_OPTION
@_FORMAT_OPTION
@_DATA_DIR_OPTION
def alerts_command(
    since: str | None,
    policy: str | None,
    severity: str | None,
    limit: int,
    fmt: str,
    data_dir: Path | None,
) -> None:
    """List the alerts the policies raised, newest first."""
    from groupsync_pipeline.analyst_data import AnalystDataError, open_analyst_data
    from groupsync_pipeline.investigation import AlertFilter, find_alerts, parse_since

    try:
        flt = AlertFilter(
            since=parse_since(since) if since else None,
            policy=policy,
            severity=severity,
            limit=limit,
        )
        with open_analyst_data(_warehouse(data_dir).data_dir, "alerts") as conn:
            found = find_alerts(conn, flt)
    except AnalystDataError as exc:
        raise click.ClickException(str(exc)) from None
    columns = (
        "raised_at", "policy", "severity", "actor", "groups",
        "activity_count", "first_at", "last_at", "summary",
    )  # fmt: skip
    _emit(found, fmt, "alerts", columns)


@main.command("sql")
@click.argument("query", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table for people; csv or json for tools (UTC ISO 8601 times; lists as JSON in csv).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    help="Rows to show: default 1000 in a table, every row in csv and json; 0 shows all.",
)
@_DATA_DIR_OPTION
def sql_command(query: str | None, fmt: str, limit: int | None, data_dir: Path | None) -> None:
    """Query groupsync's data with SQL, read-only: one QUERY, or a prompt without one.

    \b
    groupsync sql "SELECT name, member_count FROM user_groups"
    groupsync sql            (a prompt: end statements with ';', .help, .quit)
    groupsync sql < queries.sql

    The tables and views are described in the README. Nothing can be changed from here.
    """
    from groupsync_pipeline.analyst_data import AnalystDataError
    from groupsync_pipeline.config import data_dir as configured_data_dir
    from groupsync_pipeline.sql_shell import (
        Shell,
        SqlError,
        run_one,
        stdin_reader,
        terminal_reader,
    )

    def out(text: str) -> None:
        click.echo(text, color=True)  # csv values keep their bytes when piped

    def err(text: str) -> None:
        click.echo(text, err=True)

    folder = configured_data_dir(data_dir)
    interactive = query is None and sys.stdin.isatty()
    try:
        if query is not None:
            run_one(folder, query, fmt, limit, out, err)
            return
        reader = terminal_reader() if interactive else stdin_reader(sys.stdin)
        errors = Shell(folder, fmt, limit, out, err, interactive).run(reader)
    except (SqlError, AnalystDataError) as exc:
        raise click.ClickException(str(exc)) from None
    if errors and not interactive:
        sys.exit(1)  # a script from stdin with a failing statement


@main.command("groups")
@click.option("--connection", default=None, help="Only this connection's groups.")
@click.option("--search", default=None, help="Only groups whose name or id contains this text.")
@click.option(
    "--imported/--not-imported",
    "imported",
    default=None,
    help="Only groups already imported, or only those not imported yet.",
)
@click.option(
    "--refresh",
    is_flag=True,
    help="Read the groups from the app first (what the refresh_group_catalogs job does).",
)
@_LIMIT_OPTION
@_FORMAT_OPTION
@_DATA_DIR_OPTION
def groups_command(
    connection: str | None,
    search: str | None,
    imported: bool | None,
    refresh: bool,
    limit: int,
    fmt: str,
    data_dir: Path | None,
) -> None:
    """List the groups of the connected apps, to pick one for `groupsync import-group`.

    Reads the stored catalog, as the refresh_group_catalogs job (or --refresh here) left it.
    """
    from groupsync_pipeline.analyst_data import AnalystDataError, NoDataError, open_analyst_data
    from groupsync_pipeline.catalog_listing import find_catalog_groups
    from groupsync_pipeline.config import find_connection
    from groupsync_pipeline.connectors.base import ConnectorError
    from groupsync_pipeline.imports import refresh_group_catalog

    lake = _warehouse(data_dir)
    failures: list[str] = []
    names: list[str] | None = None
    if connection is not None or refresh:
        try:
            configured = load_connections()
            chosen = [find_connection(configured, connection)] if connection else configured
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        names = [c.name for c in chosen]
    if refresh:
        for chosen_connection in chosen:
            try:
                refresh_group_catalog(
                    chosen_connection,
                    lake,
                    log=lambda line: click.echo(for_terminal(line), err=True),
                )
            except (ConnectorError, ConfigError) as exc:
                # One connection that cannot be read does not stop the others.
                failures.append(chosen_connection.name)
                click.echo(
                    f"{chosen_connection.name}: catalog refresh failed: {for_terminal(str(exc))}",
                    err=True,
                )
    if names is not None and failures:
        names = [name for name in names if name not in failures]
        if not names:
            raise click.ClickException(f"catalog refresh failed for: {', '.join(failures)}")
    try:
        with open_analyst_data(lake.data_dir, "group_catalog") as conn:
            found = find_catalog_groups(
                conn, connections=names, search=search, imported=imported, limit=limit
            )
    except NoDataError as exc:
        raise click.ClickException(
            f"{exc}. `groupsync groups --refresh` reads the groups from the app"
        ) from None
    except AnalystDataError as exc:
        raise click.ClickException(str(exc)) from None
    _emit(found, fmt, "groups", order="by name")
    if failures:
        raise click.ClickException(f"catalog refresh failed for: {', '.join(failures)}")


@main.command("dagster-home")
@_DATA_DIR_OPTION
def dagster_home_command(data_dir: Path | None) -> None:
    """Print the Dagster home, creating it with groupsync's dagster.yaml if needed.

    $DAGSTER_HOME if set, else <data dir>/dagster: where the demo keeps its runs. Start the UI
    with: export DAGSTER_HOME=$(groupsync dagster-home) && dg dev
    """
    from groupsync_pipeline.dagster_home import prepare_dagster_home

    click.echo(str(prepare_dagster_home(data_dir)))


@main.command("migrate")
@click.option(
    "--from",
    "export_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder EXPORT DATABASE (FORMAT parquet) wrote from the 0.x warehouse.duckdb.",
)
@click.option(
    "--control",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The previous data directory's control.sqlite3 (default: EXPORT_DIR/control.sqlite3 "
    "if there, else the data directory's own, for an upgrade in place).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace what the lake holds already (default: refuse a lake that holds data).",
)
@_DATA_DIR_OPTION
def migrate_command(
    export_dir: Path, control: Path | None, replace: bool, data_dir: Path | None
) -> None:
    """Move a 0.x warehouse (exported) and its control store into the lake, in one
    transaction: all of it or nothing."""
    from groupsync_pipeline.config import data_dir as configured_data_dir
    from groupsync_pipeline.storage.lake import Lake, LakeConfigError
    from groupsync_pipeline.storage.migrate import MigrationError, migrate

    try:
        lake = Lake(configured_data_dir(data_dir))
        migrate(lake, export_dir, control=control, replace=replace,
                progress=lambda line: click.echo(for_terminal(line)))  # fmt: skip
    except (MigrationError, LakeConfigError) as exc:
        raise click.ClickException(str(exc)) from None
