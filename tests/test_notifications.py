"""Completion emails sent over real SMTP on loopback (aiosmtpd via SmtpSink)."""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from groupsync_pipeline.config import ConfigError
from groupsync_pipeline.notifications import (
    EmailDeliveryError,
    ImportReport,
    SmtpSettings,
    import_completion_message,
    send_message,
)
from groupsync_pipeline.sandbox.tls import make_self_signed
from groupsync_pipeline.smtp_sink import SmtpSink

SENDER = "groupsync@example.test"
TO = "alice@example.com"
PASSWORD = "s3cret-Pa55word!"
PASSWORD_ENV = "GROUPSYNC_TEST_SMTP_PASSWORD"
FINISHED = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)


def success_report(**overrides: object) -> ImportReport:
    values: dict[str, object] = {
        "request_id": 42,
        "group_name": "HR",
        "connection": "sandbox",
        "succeeded": True,
        "members": 273,
        "joined": 5,
        "left": 2,
        "nested_groups": 4,
        "pages": 3,
        "duration_seconds": 12.34,
        "run_id": "0f3c9a1e-run",
        "run_url": "http://127.0.0.1:3000/runs/0f3c9a1e-run",
        "finished_at": FINISHED,
    }
    values.update(overrides)
    return ImportReport(**values)  # type: ignore[arg-type]


def failure_report(**overrides: object) -> ImportReport:
    values: dict[str, object] = {
        "succeeded": False,
        "members": None,
        "joined": None,
        "left": None,
        "nested_groups": None,
        "pages": 1,
        "run_url": None,
        "error": "Graph API returned 403 Forbidden: missing permission GroupMember.Read.All",
    }
    values.update(overrides)
    return success_report(**values)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def deliver(sink: SmtpSink, report: ImportReport, **env: str) -> None:
    settings = sink.settings(SENDER, password_env=PASSWORD_ENV)
    send_message(settings, import_completion_message(report, TO, SENDER), environ=env)


def body_of(message: EmailMessage) -> str:
    # Parsed off the wire the body keeps CRLF line ends.
    return str(message.get_content()).replace("\r\n", "\n")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- what the email says ---------------------------------------------------------------------


def test_success_email_is_received_with_the_import_facts(sink: SmtpSink) -> None:
    deliver(sink, success_report())

    [record] = sink.wait_for(1)
    assert record.mail_from == SENDER
    assert record.rcpt_tos == (TO,)
    message = record.message
    assert message["To"] == TO
    assert message["From"] == SENDER
    assert message["Subject"] == "groupsync: 'HR' imported from sandbox (273 members)"
    assert message["Message-ID"] == "<groupsync-import-42.0f3c9a1e-run@example.test>"
    assert parsedate_to_datetime(message["Date"]) == FINISHED
    body = body_of(message)
    assert "The import of group 'HR' from connection 'sandbox' finished." in body
    assert "Members imported:       273" in body
    assert "5 joined, 2 left" in body
    assert "Nested groups expanded: 4" in body
    assert "Pages fetched:          3" in body
    assert "Duration:               12.3 s" in body
    assert "http://127.0.0.1:3000/runs/0f3c9a1e-run" in body
    assert "#42" in body
    assert "retry" not in body


def test_first_import_has_no_joined_left_line_and_singular_member() -> None:
    report = success_report(members=1, joined=None, left=None, duration_seconds=192)
    message = import_completion_message(report, TO, SENDER)
    assert message["Subject"] == "groupsync: 'HR' imported from sandbox (1 member)"
    body = message.get_content()
    assert "joined" not in body
    assert "3 min 12 s" in body


def test_failure_email_gives_the_error_and_the_retry_command(sink: SmtpSink) -> None:
    deliver(sink, failure_report())

    [record] = sink.wait_for(1)
    message = record.message
    assert message["Subject"] == "groupsync: import of 'HR' from sandbox failed"
    body = body_of(message)
    assert "FAILED" in body
    assert "403 Forbidden: missing permission GroupMember.Read.All" in body
    assert "groupsync requests retry 42" in body
    assert "groupsync requests\n" in body
    # No run link: the run id is given instead.
    assert "Dagster run id:" in body and "0f3c9a1e-run" in body


def test_message_id_is_stable_per_report_and_differs_per_attempt() -> None:
    first = import_completion_message(failure_report(), TO, SENDER)
    again = import_completion_message(failure_report(), TO, SENDER)
    retried = import_completion_message(success_report(run_id="second-run"), TO, SENDER)
    assert first["Message-ID"] == again["Message-ID"]
    assert first.as_bytes() == again.as_bytes()
    assert retried["Message-ID"] == "<groupsync-import-42.second-run@example.test>"
    no_run = import_completion_message(failure_report(run_id=None), TO, SENDER)
    assert no_run["Message-ID"] == "<groupsync-import-42.20250304T050607Z@example.test>"


# -- header injection ------------------------------------------------------------------------


def test_hostile_group_name_cannot_add_headers_or_recipients(sink: SmtpSink) -> None:
    hostile = "HR\r\nBcc: evil@example.com\r\n\r\nX-Evil: 1\n\"quoted\" 'single' 🎉\x00\x1b" + (
        "A" * 2000
    )
    deliver(sink, success_report(group_name=hostile, connection="sandbox\nCc: evil2@example.com"))

    [record] = sink.wait_for(1)
    assert record.rcpt_tos == (TO,)
    message = record.message
    assert sorted(message.keys()) == sorted(
        [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "Content-Type",
            "Content-Transfer-Encoding",
            "MIME-Version",
        ]
    )
    assert message.get_all("Bcc") is None and message.get_all("X-Evil") is None
    subject = message["Subject"]
    assert "\r" not in subject and "\n" not in subject
    assert len(subject) <= 200
    # Whitespace collapsed: header folding may double a space around encoded words.
    assert " ".join(subject.split()).startswith(
        "groupsync: 'HR Bcc: evil@example.com X-Evil: 1 \"quoted\" 'single' 🎉AAAA"
    )
    header_block = record.raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in header_block and b"\r\nCc:" not in header_block
    assert "\x00" not in message.get_content()


@pytest.mark.parametrize(
    "to",
    [
        "alice@example.com\r\nBcc: evil@example.com",
        "alice@example.com, evil@example.com",
        "alice@example.com;evil@example.com",
        "Alice <alice@example.com>",
        "alice@example.com\nBcc: evil@example.com",
        "not-an-address",
    ],
)
def test_recipient_must_be_one_plain_address(to: str) -> None:
    with pytest.raises(ConfigError, match="not a valid email address"):
        import_completion_message(success_report(), to, SENDER)


# -- TLS and authentication ------------------------------------------------------------------


def test_starttls_with_self_signed_cert_and_auth(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with SmtpSink(
        tls_context=SmtpSink.server_tls_context(cert, key),
        require_starttls=True,
        auth=("groupsync", PASSWORD),
        ca_bundle=cert,
    ) as server:
        assert server.settings().security == "starttls"
        deliver(server, success_report(), **{PASSWORD_ENV: PASSWORD})
        [record] = server.wait_for(1)
    assert record.tls
    assert record.authenticated_as == "groupsync"
    assert record.rcpt_tos == (TO,)


def test_implicit_tls_with_auth(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with SmtpSink(
        tls_context=SmtpSink.server_tls_context(cert, key),
        implicit_tls=True,
        auth=("groupsync", PASSWORD),
        ca_bundle=cert,
    ) as server:
        assert server.settings().security == "tls"
        deliver(server, success_report(), **{PASSWORD_ENV: PASSWORD})
        [record] = server.wait_for(1)
    assert record.tls
    assert record.authenticated_as == "groupsync"


def test_untrusted_certificate_is_refused(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    with SmtpSink(tls_context=SmtpSink.server_tls_context(cert, key)) as server:
        settings = SmtpSettings(host=server.host, port=server.port, sender=SENDER, timeout=5)
        message = import_completion_message(success_report(), TO, SENDER)
        with pytest.raises(EmailDeliveryError) as caught:
            send_message(settings, message, environ={})
        assert server.received == []
    text = str(caught.value)
    assert f"start TLS with SMTP server {server.host}:{server.port}" in text
    assert "certificate verify failed" in text
    assert "GROUPSYNC_SMTP_CA_BUNDLE" in text


def test_wrong_password_fails_without_revealing_it(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    wrong = "not-the-Right-one-7781"
    with SmtpSink(
        tls_context=SmtpSink.server_tls_context(cert, key),
        auth=("groupsync", PASSWORD),
        ca_bundle=cert,
    ) as server:
        with pytest.raises(EmailDeliveryError) as caught:
            deliver(server, success_report(), **{PASSWORD_ENV: wrong})
        assert server.received == []
    text = str(caught.value)
    assert f"log in to SMTP server 127.0.0.1:{server.port}" in text
    assert "authentication failed (535" in text
    assert wrong not in text and PASSWORD not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_password_variable_unset_at_send_time(sink: SmtpSink) -> None:
    settings = SmtpSettings(
        host=sink.host,
        port=sink.port,
        sender=SENDER,
        security="none",
        username="groupsync",
        password_env=PASSWORD_ENV,
    )
    message = import_completion_message(success_report(), TO, SENDER)
    with pytest.raises(EmailDeliveryError, match=f"{PASSWORD_ENV} .*is not set"):
        send_message(settings, message, environ={})


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_plain_server_requiring_auth_refuses_anonymous_mail() -> None:
    with SmtpSink(auth=("groupsync", PASSWORD)) as server:
        settings = SmtpSettings(host=server.host, port=server.port, sender=SENDER, security="none")
        message = import_completion_message(success_report(), TO, SENDER)
        with pytest.raises(EmailDeliveryError, match=r"send the message via .*: .*530"):
            send_message(settings, message, environ={})


# -- server unavailable ----------------------------------------------------------------------


def test_server_down_fails_fast() -> None:
    port = closed_port()
    settings = SmtpSettings(host="127.0.0.1", port=port, sender=SENDER, security="none")
    message = import_completion_message(success_report(), TO, SENDER)
    started = time.monotonic()
    with pytest.raises(EmailDeliveryError) as caught:
        send_message(settings, message, environ={})
    assert time.monotonic() - started < 2
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "connection refused" in str(caught.value)


def test_silent_server_times_out() -> None:
    # Listens but never greets: the connect succeeds and the banner never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = int(silent.getsockname()[1])
        settings = SmtpSettings(
            host="127.0.0.1", port=port, sender=SENDER, security="none", timeout=0.5
        )
        message = import_completion_message(success_report(), TO, SENDER)
        started = time.monotonic()
        with pytest.raises(EmailDeliveryError, match=f"127.0.0.1:{port}: timed out after 0.5 s"):
            send_message(settings, message, environ={})
        assert time.monotonic() - started < 3


# -- SmtpSink itself -------------------------------------------------------------------------


def test_sinks_pick_distinct_free_ports_and_wait_for_times_out() -> None:
    with SmtpSink() as first, SmtpSink() as second:
        assert first.port != second.port and first.port > 0
        with pytest.raises(TimeoutError, match="0 of 1"):
            first.wait_for(1, timeout=0.2)


def test_sink_rejects_tls_options_without_a_context() -> None:
    with pytest.raises(ValueError, match="tls_context"):
        SmtpSink(implicit_tls=True)


# -- settings from the environment -----------------------------------------------------------


def test_from_env_disabled_without_host() -> None:
    assert SmtpSettings.from_env({}) is None
    assert SmtpSettings.from_env({"GROUPSYNC_SMTP_HOST": "  "}) is None


def test_from_env_defaults() -> None:
    settings = SmtpSettings.from_env(
        {"GROUPSYNC_SMTP_HOST": "smtp.example.com", "GROUPSYNC_SMTP_FROM": SENDER}
    )
    assert settings == SmtpSettings(
        host="smtp.example.com",
        port=587,
        sender=SENDER,
        security="starttls",
        username=None,
        password_env=None,
        timeout=30.0,
        ca_bundle=None,
    )


@pytest.mark.parametrize(("security", "port"), [("tls", 465), ("none", 25), ("STARTTLS", 587)])
def test_from_env_port_follows_security(security: str, port: int) -> None:
    settings = SmtpSettings.from_env(
        {
            "GROUPSYNC_SMTP_HOST": "smtp.example.com",
            "GROUPSYNC_SMTP_FROM": SENDER,
            "GROUPSYNC_SMTP_SECURITY": security,
        }
    )
    assert settings is not None and settings.port == port


def test_from_env_all_fields(certificate: tuple[Path, Path]) -> None:
    env = {
        "GROUPSYNC_SMTP_HOST": "relay.internal",
        "GROUPSYNC_SMTP_PORT": "2525",
        "GROUPSYNC_SMTP_USERNAME": "groupsync",
        "GROUPSYNC_SMTP_PASSWORD_ENV": PASSWORD_ENV,
        PASSWORD_ENV: PASSWORD,
        "GROUPSYNC_SMTP_FROM": SENDER,
        "GROUPSYNC_SMTP_SECURITY": "tls",
        "GROUPSYNC_SMTP_TIMEOUT": "7.5",
        "GROUPSYNC_SMTP_CA_BUNDLE": str(certificate[0]),
    }
    settings = SmtpSettings.from_env(env)
    assert settings is not None
    assert (settings.host, settings.port, settings.security) == ("relay.internal", 2525, "tls")
    assert (settings.username, settings.password_env) == ("groupsync", PASSWORD_ENV)
    assert settings.timeout == 7.5 and settings.ca_bundle == str(certificate[0])
    assert PASSWORD not in repr(settings)


BASE_ENV = {"GROUPSYNC_SMTP_HOST": "smtp.example.com", "GROUPSYNC_SMTP_FROM": SENDER}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"GROUPSYNC_SMTP_PORT": "smtp"}, "GROUPSYNC_SMTP_PORT: must be a port number"),
        ({"GROUPSYNC_SMTP_PORT": "0"}, "GROUPSYNC_SMTP_PORT: must be a port number"),
        ({"GROUPSYNC_SMTP_PORT": "70000"}, "GROUPSYNC_SMTP_PORT: must be a port number"),
        ({"GROUPSYNC_SMTP_SECURITY": "ssl"}, "GROUPSYNC_SMTP_SECURITY: unknown security 'ssl'"),
        ({"GROUPSYNC_SMTP_FROM": ""}, "GROUPSYNC_SMTP_FROM: required"),
        ({"GROUPSYNC_SMTP_FROM": "a@b.com\r\nBcc: x@y.com"}, "GROUPSYNC_SMTP_FROM: not a valid"),
        ({"GROUPSYNC_SMTP_USERNAME": "u"}, "GROUPSYNC_SMTP_PASSWORD_ENV: required with"),
        ({"GROUPSYNC_SMTP_PASSWORD_ENV": PASSWORD_ENV}, "GROUPSYNC_SMTP_USERNAME: required with"),
        (
            {"GROUPSYNC_SMTP_USERNAME": "u", "GROUPSYNC_SMTP_PASSWORD_ENV": PASSWORD_ENV},
            f"GROUPSYNC_SMTP_PASSWORD_ENV: environment variable {PASSWORD_ENV} is not set",
        ),
        ({"GROUPSYNC_SMTP_TIMEOUT": "soon"}, "GROUPSYNC_SMTP_TIMEOUT: must be a number"),
        ({"GROUPSYNC_SMTP_TIMEOUT": "0"}, "GROUPSYNC_SMTP_TIMEOUT: must be a number"),
        ({"GROUPSYNC_SMTP_CA_BUNDLE": "/nonexistent/ca.pem"}, "GROUPSYNC_SMTP_CA_BUNDLE: file not"),
        ({"GROUPSYNC_SMTP_HOST": "smtp example.com"}, "GROUPSYNC_SMTP_HOST: not a host name"),
    ],
)
def test_from_env_errors_name_the_variable(extra: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SmtpSettings.from_env({**BASE_ENV, **extra})
    assert str(caught.value).startswith(expected)


def test_settings_validate_direct_construction() -> None:
    with pytest.raises(ConfigError, match="security"):
        SmtpSettings(host="h", port=25, sender=SENDER, security="ssl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="password_env"):
        SmtpSettings(host="h", port=25, sender=SENDER, username="u")
    with pytest.raises(ConfigError, match="port"):
        SmtpSettings(host="h", port=0, sender=SENDER)
