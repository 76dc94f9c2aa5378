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
import ssl
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


def send_message(
    settings: SmtpSettings, message: EmailMessage, environ: Mapping[str, str] = os.environ
) -> None:
    """Hand ``message`` to the SMTP server once; raise EmailDeliveryError on any failure."""
    where = settings.where
    password: str | None = None
    if settings.username:
        password = environ.get(settings.password_env or "") or None
        if password is None:
            raise EmailDeliveryError(
                f"cannot log in to SMTP server {where}: environment variable "
                f"{settings.password_env} (named by {PASSWORD_ENV_ENV}) is not set"
            )

    step = "connect to"
    try:
        context = _tls_context(settings) if settings.security != "none" else None
        client: smtplib.SMTP
        if settings.security == "tls":
            step = "connect with TLS to"
            client = smtplib.SMTP_SSL(
                settings.host, settings.port, timeout=settings.timeout, context=context
            )
        else:
            client = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout)
        try:
            if settings.security == "starttls":
                step = "start TLS with"
                client.starttls(context=context)
            if settings.username and password is not None:
                step = "log in to"
                client.login(settings.username, password)
            step = "send the message via"
            refused = client.send_message(message, from_addr=settings.sender)
        finally:
            _quit_quietly(client)
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        # OSError covers refused connections, timeouts and ssl.SSLError (its subclass).
        text = f"cannot {step} SMTP server {where}: {_describe(exc)}"
        if text.endswith("timed out"):
            text += f" after {settings.timeout:g} s"
        if isinstance(exc, ssl.SSLCertVerificationError):
            text += f" (for a private CA set {CA_BUNDLE_ENV})"
        # The password never appears in our own text, but a server could echo anything back.
        if password:
            text = text.replace(password, "***")
        raise EmailDeliveryError(text) from None
    if refused:
        raise EmailDeliveryError(
            f"SMTP server {where} refused recipient(s): "
            + ", ".join(f"{addr} ({_describe_reply(*reply)})" for addr, reply in refused.items())
        )


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
