"""Completion emails: tell the person who asked for a group import how it went.

Email is optional: without ``GROUPSYNC_SMTP_HOST`` nothing is sent. Like connections, the SMTP
password is never in the settings: ``password_env`` names the environment variable holding it,
read only when a message is sent. Retrying is the caller's job (an outbox), so ``send_message``
makes one attempt and raises ``EmailDeliveryError`` with a message fit to show or store.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import smtplib
import socket
import ssl
import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Literal, cast

from groupsync_pipeline.config import ConfigError, check_email_address

Security = Literal["starttls", "tls", "none"]
SECURITY_MODES: tuple[Security, ...] = ("starttls", "tls", "none")
DEFAULT_PORTS: dict[Security, int] = {"starttls": 587, "tls": 465, "none": 25}
DEFAULT_TIMEOUT = 30.0

HOST_ENV = "GROUPSYNC_SMTP_HOST"
PORT_ENV = "GROUPSYNC_SMTP_PORT"
USERNAME_ENV = "GROUPSYNC_SMTP_USERNAME"
PASSWORD_ENV_ENV = "GROUPSYNC_SMTP_PASSWORD_ENV"
FROM_ENV = "GROUPSYNC_SMTP_FROM"
SECURITY_ENV = "GROUPSYNC_SMTP_SECURITY"
TIMEOUT_ENV = "GROUPSYNC_SMTP_TIMEOUT"
CA_BUNDLE_ENV = "GROUPSYNC_SMTP_CA_BUNDLE"

# Caps keep a hostile or huge group name from producing an unreadable subject or body.
SUBJECT_NAME_LIMIT = 80
BODY_NAME_LIMIT = 300
ERROR_LIMIT = 2000


class EmailDeliveryError(RuntimeError):
    """A message could not be handed to the SMTP server; says what failed and where."""


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to send email. Holds no password: ``password_env`` names where it lives."""

    host: str
    port: int
    sender: str
    security: Security = "starttls"
    username: str | None = None
    password_env: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        if self.security not in SECURITY_MODES:
            raise ConfigError(f"SMTP security must be one of {', '.join(SECURITY_MODES)}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"SMTP port must be between 1 and 65535, not {self.port}")
        if self.timeout <= 0:
            raise ConfigError("SMTP timeout must be a positive number of seconds")
        if self.username and not self.password_env:
            raise ConfigError("an SMTP username needs password_env (the variable holding it)")
        check_email_address(self.sender)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SmtpSettings | None:
        """Settings from ``GROUPSYNC_SMTP_*``; None when no host is set (email disabled)."""
        host = environ.get(HOST_ENV, "").strip()
        if not host:
            return None
        if any(c.isspace() or not c.isprintable() for c in host):
            raise ConfigError(f"{HOST_ENV}: not a host name: {host!r}")

        security = environ.get(SECURITY_ENV, "").strip().lower() or "starttls"
        if security not in SECURITY_MODES:
            raise ConfigError(
                f"{SECURITY_ENV}: unknown security {security!r} "
                f"(use one of: {', '.join(SECURITY_MODES)})"
            )
        mode = cast(Security, security)

        port_text = environ.get(PORT_ENV, "").strip()
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ConfigError(f"{PORT_ENV}: must be a port number 1-65535, not {port_text!r}")
            port = int(port_text)
        else:
            port = DEFAULT_PORTS[mode]

        sender_text = environ.get(FROM_ENV, "").strip()
        if not sender_text:
            raise ConfigError(f"{FROM_ENV}: required when {HOST_ENV} is set (the From address)")
        try:
            sender = check_email_address(sender_text)
        except ConfigError as exc:
            raise ConfigError(f"{FROM_ENV}: {exc}") from None

        username = environ.get(USERNAME_ENV, "").strip() or None
        password_env = environ.get(PASSWORD_ENV_ENV, "").strip() or None
        if username and not password_env:
            raise ConfigError(
                f"{PASSWORD_ENV_ENV}: required with {USERNAME_ENV} "
                "(name the environment variable that holds the SMTP password)"
            )
        if password_env and not username:
            raise ConfigError(f"{USERNAME_ENV}: required with {PASSWORD_ENV_ENV}")
        # Checked now as well as at send time, so a missing secret shows up at startup.
        if password_env and not environ.get(password_env):
            raise ConfigError(f"{PASSWORD_ENV_ENV}: environment variable {password_env} is not set")

        timeout_text = environ.get(TIMEOUT_ENV, "").strip()
        timeout = DEFAULT_TIMEOUT
        if timeout_text:
            try:
                timeout = float(timeout_text)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= 3600:
                raise ConfigError(
                    f"{TIMEOUT_ENV}: must be a number of seconds (0-3600], not {timeout_text!r}"
                )

        ca_bundle = environ.get(CA_BUNDLE_ENV, "").strip() or None
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise ConfigError(f"{CA_BUNDLE_ENV}: file not found: {ca_bundle}")

        return cls(
            host=host,
            port=port,
            sender=sender,
            security=mode,
            username=username,
            password_env=password_env,
            timeout=timeout,
            ca_bundle=ca_bundle,
        )


@dataclass
class ImportReport:
    """What the completion email says about one import request."""

    request_id: int
    group_name: str
    connection: str
    succeeded: bool
    members: int | None = None
    joined: int | None = None  # None on a first import: there is nothing to compare with
    left: int | None = None
    nested_groups: int | None = None
    pages: int | None = None
    duration_seconds: float | None = None
    run_id: str | None = None
    run_url: str | None = None
    error: str | None = None
    finished_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _one_line(text: str, limit: int) -> str:
    """Control/format characters and line breaks become spaces; runs collapse; length capped."""
    cleaned = "".join(
        " " if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") else c
        for c in text
    )
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1].rstrip() + "…"


def _multi_line(text: str, limit: int) -> str:
    """Like _one_line but keeps line breaks (error texts are often several lines)."""
    lines = [_one_line(line, limit) for line in text.splitlines()]
    joined = "\n".join(line for line in lines if line)
    return joined if len(joined) <= limit else joined[: limit - 1].rstrip() + "…"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _utc(moment: dt.datetime) -> dt.datetime:
    # A naive timestamp is taken to be UTC, the project's storage convention.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def message_id(report: ImportReport, sender: str) -> str:
    """Same report, same id: a receiver can drop a resend of this notification.

    The run id (or finish time) is part of it because ``requests retry`` reuses the request id,
    and the retried import's email must not be mistaken for a duplicate of the failure email.
    """
    domain = check_email_address(sender).rsplit("@", 1)[1]
    attempt = report.run_id or _utc(report.finished_at).strftime("%Y%m%dT%H%M%SZ")
    attempt = re.sub(r"[^A-Za-z0-9-]", "", attempt)[:64] or "run"
    return f"<groupsync-import-{report.request_id}.{attempt}@{domain}>"


def import_completion_message(report: ImportReport, to: str, sender: str) -> EmailMessage:
    """The email telling ``to`` how import request ``report.request_id`` ended."""
    # Both addresses must be one plain address each: no display names, lists or header tricks.
    recipient = check_email_address(to)
    from_address = check_email_address(sender)
    group = _one_line(report.group_name, SUBJECT_NAME_LIMIT)
    connection = _one_line(report.connection, SUBJECT_NAME_LIMIT)

    if report.succeeded:
        subject = f"groupsync: '{group}' imported from {connection}"
        if report.members is not None:
            subject += f" ({_plural(report.members, 'member')})"
    else:
        subject = f"groupsync: import of '{group}' from {connection} failed"

    message = EmailMessage()
    message["From"] = from_address
    message["To"] = recipient
    message["Subject"] = subject
    # The finish time, not the send time: a resend by the outbox is byte-for-byte the same.
    message["Date"] = format_datetime(_utc(report.finished_at))
    message["Message-ID"] = message_id(report, from_address)
    message.set_content(_body(report))
    return message


def _body(report: ImportReport) -> str:
    group = _one_line(report.group_name, BODY_NAME_LIMIT)
    connection = _one_line(report.connection, BODY_NAME_LIMIT)
    outcome = "finished" if report.succeeded else "FAILED"
    rows: list[tuple[str, str]] = [("Group", group), ("Connection", connection)]
    if report.members is not None:
        rows.append(("Members imported", str(report.members)))
    if report.joined is not None or report.left is not None:
        rows.append(("Since last import", f"{report.joined or 0} joined, {report.left or 0} left"))
    if report.nested_groups is not None:
        rows.append(("Nested groups expanded", str(report.nested_groups)))
    if report.pages is not None:
        rows.append(("Pages fetched", str(report.pages)))
    if report.duration_seconds is not None:
        rows.append(("Duration", _duration(report.duration_seconds)))
    rows.append(("Finished", _utc(report.finished_at).strftime("%Y-%m-%d %H:%M:%S UTC")))
    if report.run_url:
        rows.append(("Dagster run", _one_line(report.run_url, 500)))
    elif report.run_id:
        rows.append(("Dagster run id", _one_line(report.run_id, 100)))
    rows.append(("Request", f"#{report.request_id}"))

    width = max(len(label) for label, _ in rows) + 1
    lines = [f"The import of group '{group}' from connection '{connection}' {outcome}.", ""]
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    lines.append("")
    if not report.succeeded:
        error = _multi_line(report.error or "(no error message recorded)", ERROR_LIMIT)
        lines += ["Error:", *(f"  {line}" for line in error.splitlines()), ""]
        lines += [
            "What to do next:",
            "  1. Fix the cause above (for example the connection's credentials or permissions,",
            "     or the group name).",
            f"  2. Retry the import:  groupsync requests retry {report.request_id}",
            "  See the status of your requests:  groupsync requests",
        ]
    else:
        lines.append("See the status of your requests:  groupsync requests")
    return "\n".join(lines) + "\n"


def _tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    # With a ca_bundle only that CA is trusted: the usual case for a private relay.
    return ssl.create_default_context(cafile=settings.ca_bundle)


# A delivery as a whole (connect, TLS, login, every reply) ends after this many step timeouts
# unless the caller gives an earlier deadline: a server that sends a continuation line every
# few seconds resets each step's timeout and would otherwise hold the sender for ever.
DELIVERY_STEPS = 4


class _Deadline:
    """Shuts the delivery's socket down when its total time is up, wherever smtplib waits.

    The socket is named by its file descriptor, which stays the same when STARTTLS wraps it.
    Shutting it down and closing it are serialized, so a descriptor that is already closed
    (and maybe reused) is never touched.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self._fd: int | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._fd = sock.fileno()
            if self.expired:
                self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._fd is None:
            return
        handle = socket.socket(fileno=self._fd)
        try:
            handle.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
        except OSError:
            pass
        finally:
            handle.detach()  # the descriptor stays smtplib's to close

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._timer.cancel()


class _WatchedSMTP(smtplib.SMTP):
    def __init__(self, deadline: _Deadline, timeout: float) -> None:
        self._deadline = deadline
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, max(0.001, min(timeout, self._deadline.remaining())))
        self._deadline.watch(sock)
        return sock

    def close(self) -> None:
        self._deadline.close()
        super().close()


class _WatchedSMTPSSL(smtplib.SMTP_SSL):
    def __init__(self, deadline: _Deadline, timeout: float, context: ssl.SSLContext) -> None:
        self._deadline = deadline
        super().__init__(timeout=timeout, context=context)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # As SMTP_SSL does, but watched before the TLS handshake, which can be dribbled too.
        wait = max(0.001, min(timeout, self._deadline.remaining()))
        raw = socket.create_connection((host, port), wait, self.source_address)
        self._deadline.watch(raw)
        try:
            return self.context.wrap_socket(raw, server_hostname=self._host)
        except BaseException:
            self._deadline.close()
            raw.close()
            raise

    def close(self) -> None:
        self._deadline.close()
        super().close()


def send_message(
    settings: SmtpSettings,
    message: EmailMessage,
    environ: Mapping[str, str] = os.environ,
    *,
    deadline: float | None = None,
) -> None:
    """Hand ``message`` to the SMTP server once; raise EmailDeliveryError on any failure.

    ``deadline`` (a ``time.monotonic()`` value) bounds the whole delivery; by default it is
    ``DELIVERY_STEPS`` step timeouts from now.
    """
    where = settings.where
    password: str | None = None
    if settings.username:
        password = environ.get(settings.password_env or "") or None
        if password is None:
            raise EmailDeliveryError(
                f"cannot log in to SMTP server {where}: environment variable "
                f"{settings.password_env} (named by {PASSWORD_ENV_ENV}) is not set"
            )
    own_limit = time.monotonic() + DELIVERY_STEPS * settings.timeout
    limit = own_limit if deadline is None else min(deadline, own_limit)
    total = max(0.0, limit - time.monotonic())
    if total <= 0:
        raise EmailDeliveryError(f"not sent to SMTP server {where}: no time was left to send")

    step = "connect to"
    watchdog = _Deadline(limit)
    try:
        context = _tls_context(settings) if settings.security != "none" else None
        client: smtplib.SMTP
        if settings.security == "tls":
            assert context is not None
            step = "connect with TLS to"
            client = _WatchedSMTPSSL(watchdog, settings.timeout, context)
        else:
            client = _WatchedSMTP(watchdog, settings.timeout)
        client._host = settings.host  # smtplib sets it only when the constructor connects
        try:
            client.connect(settings.host, settings.port)
            if settings.security == "starttls":
                step = "start TLS with"
                client.starttls(context=context)
            if settings.username and password is not None:
                step = "log in to"
                client.login(settings.username, password)
            step = "send the message via"
            refused = client.send_message(message, from_addr=settings.sender)
        finally:
            if watchdog.expired:
                client.close()  # no QUIT: the server has had all the time it gets
            else:
                _quit_quietly(client)
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        # OSError covers refused connections, timeouts and ssl.SSLError (its subclass).
        if watchdog.expired:
            detail = (
                f"the delivery did not finish within {round(total, 1):g} s "
                "(the server kept it waiting)"
            )
        elif step == "log in to":
            # What a server says during AUTH can echo the exchange (base64 of the password):
            # only the reply's codes are kept, never its text.
            detail = _describe_login_failure(exc)
        else:
            detail = _describe(exc)
        text = f"cannot {step} SMTP server {where}: {detail}"
        if text.endswith("timed out"):
            text += f" after {settings.timeout:g} s"
        if isinstance(exc, ssl.SSLCertVerificationError):
            text += f" (for a private CA set {CA_BUNDLE_ENV})"
        # The password never appears in our own text, but a server could echo anything back.
        if password:
            text = text.replace(password, "***")
        raise EmailDeliveryError(text) from None
    finally:
        watchdog.close()
    if refused:
        raise EmailDeliveryError(
            f"SMTP server {where} refused recipient(s): "
            + ", ".join(f"{addr} ({_describe_reply(*reply)})" for addr, reply in refused.items())
        )


_ENHANCED_CODE = re.compile(rb"^\s*([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


def _describe_login_failure(exc: BaseException) -> str:
    """The failed login in the server's codes only (its text may echo the credentials)."""
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = exc.smtp_error if isinstance(exc.smtp_error, bytes) else exc.smtp_error.encode()
        enhanced = _ENHANCED_CODE.match(reply)
        code = f"{exc.smtp_code} {enhanced.group(1).decode()}" if enhanced else str(exc.smtp_code)
        what = "authentication failed" if exc.smtp_code == 535 else "refused"
        return f"{what} ({code})"
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        return "timed out"
    if isinstance(exc, smtplib.SMTPException):
        return _one_line(str(exc), 300)  # smtplib's own words, e.g. "no suitable mechanism"
    return type(exc).__name__


def _quit_quietly(client: smtplib.SMTP) -> None:
    # The message is already accepted (or the real error is being raised): QUIT is a courtesy.
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _describe_reply(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return f"{code} {_one_line(text, 300)}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(
            f"{addr} ({_describe_reply(*reply)})" for addr, reply in exc.recipients.items()
        )
        return f"recipient refused: {refused}"
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"sender {exc.sender} refused ({_describe_reply(exc.smtp_code, exc.smtp_error)})"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"authentication failed ({_describe_reply(exc.smtp_code, exc.smtp_error)})"
    if isinstance(exc, smtplib.SMTPResponseException):
        return _describe_reply(exc.smtp_code, exc.smtp_error)
    # smtplib reports a read timeout as a disconnect; the timeout is the useful part.
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running and is the port right?)"
    detail = _one_line(str(exc), 300) or type(exc).__name__
    return f"{type(exc).__name__}: {detail}"
