"""A real SMTP server on loopback that keeps what it receives: for the demo and the tests.

Built on aiosmtpd's ``Controller``, which runs the server in a thread. ``Controller(port=0)``
does not pick a port, so the sink finds a free one itself (and tries again if it loses a race
for it). It can offer STARTTLS or speak implicit TLS, and can require a username and password.
"""

from __future__ import annotations

import errno
import hmac
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from os import PathLike
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from groupsync_pipeline.notifications import SmtpSettings

LOOPBACK = "127.0.0.1"
DEFAULT_SENDER = "groupsync@example.test"
DEFAULT_PASSWORD_ENV = "GROUPSYNC_SMTP_PASSWORD"
_START_ATTEMPTS = 5


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message with its SMTP envelope (who it was really sent from and to)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    raw: bytes
    tls: bool
    authenticated_as: str | None


class SmtpSink:
    """Context manager: ``with SmtpSink() as sink: ... sink.wait_for(1)``."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth: tuple[str, str] | None = None,
        auth_require_tls: bool | None = None,
        ca_bundle: str | PathLike[str] | None = None,
        host: str = LOOPBACK,
    ) -> None:
        """``tls_context`` (see ``server_tls_context``) offers STARTTLS, or with ``implicit_tls``
        makes the whole connection TLS. ``ca_bundle`` is what clients should trust; it goes
        into ``settings()``. ``auth_require_tls`` defaults to True only when STARTTLS is
        offered (aiosmtpd does not count implicit TLS as TLS for AUTH).
        """
        if (implicit_tls or require_starttls) and tls_context is None:
            raise ValueError("implicit_tls and require_starttls need a tls_context")
        self.host = host
        self.port = 0
        self.auth = auth
        self.ca_bundle = None if ca_bundle is None else str(ca_bundle)
        self.implicit_tls = implicit_tls
        self.starttls = tls_context is not None and not implicit_tls
        self._tls_context = tls_context
        self._require_starttls = require_starttls
        if auth_require_tls is None:
            auth_require_tls = self.starttls
        self._auth_require_tls = auth_require_tls
        self._received: list[ReceivedMessage] = []
        self._arrived = threading.Condition()
        self._controller: Controller | None = None

    @staticmethod
    def server_tls_context(
        cert_path: str | PathLike[str], key_path: str | PathLike[str]
    ) -> ssl.SSLContext:
        """A server-side context for a cert/key pair (e.g. from ``sandbox.tls``)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        return context

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SmtpSink:
        if self._controller is not None:
            raise RuntimeError("SMTP sink already running")
        for attempt in range(_START_ATTEMPTS):
            port = _free_port(self.host)
            controller = self._make_controller(port)
            try:
                controller.start()
            except OSError as exc:
                # Another process took the port between our probe and the bind: try another.
                controller.loop.close()
                if exc.errno != errno.EADDRINUSE or attempt == _START_ATTEMPTS - 1:
                    raise
                continue
            self._controller = controller
            self.port = port
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _make_controller(self, port: int) -> Controller:
        options: dict[str, Any] = {"auth_require_tls": self._auth_require_tls}
        if self.implicit_tls:
            options["ssl_context"] = self._tls_context
        elif self._tls_context is not None:
            options["tls_context"] = self._tls_context
            options["require_starttls"] = self._require_starttls
        if self.auth is not None:
            options["authenticator"] = self._authenticate
            options["auth_required"] = True
        controller_class = _ImplicitTlsController if self.implicit_tls else Controller
        return controller_class(_Handler(self), hostname=self.host, port=port, **options)

    # -- what arrived ------------------------------------------------------------------------

    @property
    def received(self) -> list[ReceivedMessage]:
        with self._arrived:
            return list(self._received)

    @property
    def messages(self) -> list[EmailMessage]:
        return [record.message for record in self.received]

    def wait_for(self, count: int = 1, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until ``count`` messages have arrived; TimeoutError if they do not in time."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self._received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"SMTP sink got {len(self._received)} of {count} messages in {timeout} s"
                    )
                self._arrived.wait(remaining)
            return list(self._received)

    def clear(self) -> None:
        with self._arrived:
            self._received.clear()

    def settings(
        self, sender: str = DEFAULT_SENDER, *, password_env: str = DEFAULT_PASSWORD_ENV
    ) -> SmtpSettings:
        """Settings that send to this sink. With ``auth``, the caller must put the password
        into the environment variable ``password_env``."""
        if self._controller is None:
            raise RuntimeError("start the SMTP sink before asking for its settings")
        security = "tls" if self.implicit_tls else "starttls" if self.starttls else "none"
        return SmtpSettings(
            host=self.host,
            port=self.port,
            sender=sender,
            security=security,
            username=self.auth[0] if self.auth else None,
            password_env=password_env if self.auth else None,
            timeout=5.0,
            ca_bundle=self.ca_bundle,
        )

    # -- aiosmtpd callbacks (run in the server thread) ---------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.auth is not None
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username, password = (part.encode() for part in self.auth)
        # Both compared in full, constant time: the sink also demonstrates the right habit.
        ok = hmac.compare_digest(data.login, username) & hmac.compare_digest(
            data.password, password
        )
        return AuthResult(success=bool(ok), handled=False, auth_data=data)

    def _record(self, session: Session, envelope: Envelope) -> None:
        raw = envelope.original_content or b""
        if not raw and isinstance(envelope.content, bytes):
            raw = envelope.content
        message = BytesParser(policy=default_policy).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        record = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            message=message,
            raw=raw,
            tls=self.implicit_tls or session.ssl is not None,
            authenticated_as=login.decode("utf-8", "replace") if login else None,
        )
        with self._arrived:
            self._received.append(record)
            self._arrived.notify_all()


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._sink._record(session, envelope)
        return "250 Message accepted for delivery"


class _ImplicitTlsController(Controller):
    def factory(self) -> SMTP:
        # aiosmtpd warns "AUTH without TLS" because it only counts STARTTLS; here the whole
        # connection is TLS, so the warning is wrong.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            return super().factory()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
