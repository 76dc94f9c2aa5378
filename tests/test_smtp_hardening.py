"""SMTP against hostile servers on loopback: one that echoes the AUTH exchange (base64 of the
password) in its refusal, and one that dribbles continuation lines to hold a delivery forever."""

from __future__ import annotations

import base64
import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from groupsync_pipeline.completion_emails import send_completion_emails
from groupsync_pipeline.notifications import (
    EmailDeliveryError,
    ImportReport,
    SmtpSettings,
    import_completion_message,
    send_message,
)
from groupsync_pipeline.storage.control import ControlStore, NewRequest

SENDER = "groupsync@example.test"
TO = "alice@example.com"
USER = "groupsync-mailer"
PASSWORD = "Echo-Me-If-You-Dare-9931"
PASSWORD_ENV = "GROUPSYNC_TEST_SMTP_PASSWORD"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def report() -> ImportReport:
    return ImportReport(
        request_id=7,
        group_name="HR",
        connection="sandbox",
        succeeded=True,
        members=3,
        finished_at=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    )


# --- a server that echoes what the client sent during AUTH --------------------------------


class EchoingAuth:
    """aiosmtpd handler: every AUTH is refused with the client's own blobs in the reply."""

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> str:
        mechanism, blobs = args[0], list(args[1:])
        if mechanism == "LOGIN":
            if not blobs:
                username = await server.challenge_auth("Username:")
                blobs.append(base64.b64encode(username).decode())  # type: ignore[arg-type]
            password = await server.challenge_auth("Password:")
            if isinstance(password, bytes):
                blobs.append(base64.b64encode(password).decode())
                blobs.append(password.decode())
        return f"535 5.7.8 Authentication failed for {mechanism} {' '.join(blobs)}"


def secrets_on_the_wire() -> list[str]:
    return [
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
        base64.b64encode(USER.encode()).decode(),
    ]


@pytest.fixture(params=["PLAIN", "LOGIN"])
def echoing_server(request: pytest.FixtureRequest) -> Iterator[SmtpSettings]:
    other = "LOGIN" if request.param == "PLAIN" else "PLAIN"
    port = free_port()
    controller = Controller(
        EchoingAuth(),
        hostname="127.0.0.1",
        port=port,
        auth_require_tls=False,  # plain loopback: nothing to protect in the test itself
        auth_exclude_mechanism=[other],
    )
    controller.start()
    try:
        yield SmtpSettings(
            host="127.0.0.1",
            port=port,
            sender=SENDER,
            security="none",
            username=USER,
            password_env=PASSWORD_ENV,
            timeout=5.0,
        )
    finally:
        controller.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_echo_is_never_in_the_error(echoing_server: SmtpSettings) -> None:
    message = import_completion_message(report(), TO, SENDER)
    with pytest.raises(EmailDeliveryError) as caught:
        send_message(echoing_server, message, environ={PASSWORD_ENV: PASSWORD})
    text = str(caught.value)
    assert "cannot log in to SMTP server" in text and "authentication failed (535 5.7.8)" in text
    for secret in secrets_on_the_wire():
        assert secret not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_echo_is_never_stored_in_the_outbox_or_logged(
    echoing_server: SmtpSettings, tmp_path: Path
) -> None:
    control = ControlStore(tmp_path)
    (request_id,) = control.add_requests([NewRequest("sandbox", "HR", "g1", "HR", TO)])
    control.mark_failed(request_id, "Graph said no")
    env = {
        "GROUPSYNC_SMTP_HOST": echoing_server.host,
        "GROUPSYNC_SMTP_PORT": str(echoing_server.port),
        "GROUPSYNC_SMTP_SECURITY": "none",
        "GROUPSYNC_SMTP_FROM": SENDER,
        "GROUPSYNC_SMTP_USERNAME": USER,
        "GROUPSYNC_SMTP_PASSWORD_ENV": PASSWORD_ENV,
        PASSWORD_ENV: PASSWORD,
    }
    logged: list[str] = []
    outcome = send_completion_emails(control, log=logged.append, environ=env)
    assert outcome.retrying == 1
    (row,) = control.outbox()
    stored = " ".join(str(value) for value in row.values())
    assert "authentication failed (535 5.7.8)" in stored
    for secret in secrets_on_the_wire():
        assert secret not in stored
        assert all(secret not in line for line in logged)


# --- a server that never finishes a reply -------------------------------------------------


class Dribbler:
    """Greets (or answers EHLO) with an endless multi-line reply, one line per ``interval``:
    each line resets a per-read timeout, so only a total deadline ends the wait."""

    def __init__(self, phase: str, interval: float = 0.2) -> None:
        self.phase = phase
        self.interval = interval
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Dribbler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=5)

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        code = b"220"
        with conn:
            try:
                if self.phase == "ehlo":
                    conn.sendall(b"220 dribbler ready\r\n")
                    conn.recv(1024)  # EHLO
                    code = b"250"
                # Bounded so that a client without a deadline fails the test instead of hanging.
                end = time.monotonic() + 30
                while not self.stop.is_set() and time.monotonic() < end:
                    conn.sendall(code + b"-still thinking\r\n")
                    time.sleep(self.interval)
            except OSError:
                return  # the client gave up: what the test wants


@pytest.mark.parametrize("phase", ["greeting", "ehlo"])
def test_a_dribbling_server_cannot_hold_a_delivery_past_its_deadline(phase: str) -> None:
    with Dribbler(phase) as server:
        settings = SmtpSettings(
            host="127.0.0.1", port=server.port, sender=SENDER, security="none", timeout=1.0
        )
        message = import_completion_message(report(), TO, SENDER)
        started = time.monotonic()
        with pytest.raises(EmailDeliveryError) as caught:
            send_message(settings, message, environ={}, deadline=started + 2.0)
        elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 4, elapsed
    assert f"127.0.0.1:{server.port}" in str(caught.value)
    assert "did not finish within 2 s" in str(caught.value)


def test_the_default_deadline_is_four_step_timeouts() -> None:
    with Dribbler("greeting") as server:
        settings = SmtpSettings(
            host="127.0.0.1", port=server.port, sender=SENDER, security="none", timeout=0.5
        )
        message = import_completion_message(report(), TO, SENDER)
        started = time.monotonic()
        with pytest.raises(EmailDeliveryError, match="did not finish within 2 s"):
            send_message(settings, message, environ={})
        assert time.monotonic() - started < 4


def test_a_sensor_round_keeps_to_its_time_budget(tmp_path: Path) -> None:
    control = ControlStore(tmp_path)
    ids = control.add_requests(
        [NewRequest("sandbox", f"G{i}", f"g{i}", f"G{i}", TO) for i in range(3)]
    )
    for request_id in ids:
        control.mark_failed(request_id, "Graph said no")
    with Dribbler("greeting") as server:
        env = {
            "GROUPSYNC_SMTP_HOST": "127.0.0.1",
            "GROUPSYNC_SMTP_PORT": str(server.port),
            "GROUPSYNC_SMTP_SECURITY": "none",
            "GROUPSYNC_SMTP_FROM": SENDER,
            "GROUPSYNC_SMTP_TIMEOUT": "30",
        }
        started = time.monotonic()
        outcome = send_completion_emails(control, time_budget=2.0, environ=env)
        elapsed = time.monotonic() - started
    assert elapsed < 4, elapsed
    assert outcome.retrying == 1 and outcome.sent == 0  # the rest wait for the next tick
    failed = [row for row in control.outbox() if row["last_error"]]
    assert len(failed) == 1 and "did not finish within" in failed[0]["last_error"]


def test_alert_emails_keep_to_their_deadline(tmp_path: Path) -> None:
    from groupsync_pipeline.alert_emails import send_pending_alert_emails
    from groupsync_pipeline.policies import parse_policies
    from groupsync_pipeline.storage.lake import Lake

    (policy,) = parse_policies(
        "policies:\n  - name: Watch\n    severity: high\n    notify: [secops@example.com]\n"
    )
    now = dt.datetime.now(dt.UTC)
    with Dribbler("ehlo") as server, Lake(tmp_path).write() as conn:
        conn.execute(
            """
            INSERT INTO alerts (alert_id, policy, severity, raised_at, connection, actor_email,
                groups, activity_ids, activity_count, first_at, last_at, summary)
            VALUES ('a1', 'Watch', 'high', $now, 'c', 'x@example.com', [], [], 1, $now, $now,
                    'something')
            """,
            {"now": now},
        )
        settings = SmtpSettings(
            host="127.0.0.1", port=server.port, sender=SENDER, security="none", timeout=30
        )
        started = time.monotonic()
        result = send_pending_alert_emails(
            conn, [policy], settings, now, deadline=started + 1.5, environ={}
        )
        elapsed = time.monotonic() - started
        pending = conn.execute("SELECT count(*) FROM alerts WHERE notified_at IS NULL").fetchall()
    assert elapsed < 3.5, elapsed
    (outcome,) = result.outcomes
    assert outcome.status == "failed" and "did not finish within 1.5 s" in (outcome.reason or "")
    assert pending == [(1,)]  # kept for the next run
