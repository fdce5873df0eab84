"""Drive a ``Session`` through a scripted SMTP dialog, the way a client sees it.

A script is text, one step per line (in the style of chasquid's
test/t-12-minor_dialogs)::

    C: EHLO client.example     client sends the text and CRLF
    C~ hi\\n.\\nQUIT\\r\\n        client sends raw bytes (Python escapes, no CRLF added)
    S: 250 2.1.0               the next reply line starts with this text
    S~ 250 CHUNKING            skip reply lines until one starts with this text
    # a comment; blank lines and spaces around a step are ignored

Consecutive ``C`` steps go out in one ``receive`` call, like a pipelining
client writing before it reads. Every ``S`` step reads the next reply line.
A script that ends with an ``S`` step must have read every reply; one that
ends with ``C`` steps leaves their replies to the caller (``Dialog.replies``).

The ``Driver`` answers the session's questions: by default it accepts every
login, sender, recipient and message and finishes every TLS handshake at
once. Give it callbacks returning a reply (bytes) to refuse instead.
The banner is checked and consumed before the script starts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from relaygate.smtp.events import (
    AuthRequest,
    Event,
    MessageReady,
    RecipientRequest,
    SenderRequest,
    StartTLS,
)
from relaygate.smtp.session import Session, Settings

HOSTNAME = "mx.example"
SETTINGS = Settings(hostname=HOSTNAME)

_E = TypeVar("_E")


def plain(user: str = "user", password: str = "secret", authzid: str = "") -> str:
    """The base64 PLAIN response for these credentials."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# Script fragments for the usual openings.
LOGIN = f"""
C: EHLO client.example
S~ 250 AUTH PLAIN LOGIN
C: AUTH PLAIN {plain()}
S: 235 2.7.0
"""
ENVELOPE = (
    LOGIN
    + """
C: MAIL FROM:<sender@client.example>
S: 250 2.1.0
C: RCPT TO:<rcpt@dest.example>
S: 250 2.1.5
"""
)


def _accept(_: _E) -> bytes | None:
    return None


@dataclass
class Driver:
    """Answers events; a callback returns None to accept or a reply to refuse."""

    auth: Callable[[AuthRequest], bytes | None] = _accept
    sender: Callable[[SenderRequest], bytes | None] = _accept
    recipient: Callable[[RecipientRequest], bytes | None] = _accept
    message: Callable[[MessageReady], bytes | None] = _accept
    queue_id: str = "Q1"
    finish_tls: bool = True  # call tls_started() as soon as StartTLS comes out

    def answer(self, session: Session, event: Event) -> None:
        if isinstance(event, AuthRequest):
            reply = self.auth(event)
            if reply is None:
                session.auth_succeeded(event.credentials.username)
            else:
                session.auth_failed(reply)
        elif isinstance(event, SenderRequest):
            _answer(session, self.sender(event), session.accept_sender)
        elif isinstance(event, RecipientRequest):
            _answer(session, self.recipient(event), session.accept_recipient)
        elif isinstance(event, MessageReady):
            reply = self.message(event)
            if reply is None:
                session.message_queued(self.queue_id)
            else:
                session.refuse(reply)
        elif isinstance(event, StartTLS) and self.finish_tls:
            session.tls_started()


def _answer(session: Session, reply: bytes | None, accept: Callable[[], None]) -> None:
    if reply is None:
        accept()
    else:
        session.refuse(reply)


@dataclass
class Dialog:
    """A session, its driver, every event seen and the reply lines not yet read."""

    settings: Settings = SETTINGS
    tls_active: bool = True
    driver: Driver = field(default_factory=Driver)
    events: list[Event] = field(default_factory=list)
    output: bytes = b""  # everything the server sent, greeting included

    def __post_init__(self) -> None:
        self.session = Session(self.settings, tls_active=self.tls_active)
        self.session.greeting()
        self._unread: list[str] = []
        self._collect()
        self.expect(f"220 {self.settings.hostname} ")  # scripts start after the banner

    def send(self, data: bytes) -> None:
        """Feed bytes and let the driver answer until the session needs more input."""
        self.session.receive(data)
        while (event := self.session.next_event()) is not None:
            self.events.append(event)
            self.driver.answer(self.session, event)
        self._collect()

    def _collect(self) -> None:
        out = self.session.take_output()
        assert out == b"" or out.endswith(b"\r\n"), out
        self.output += out
        self._unread += out.decode("utf-8").split("\r\n")[:-1]

    def reply(self) -> str:
        """The next unread reply line."""
        assert self._unread, "expected a reply, the server sent nothing"
        return self._unread.pop(0)

    def replies(self) -> list[str]:
        """All unread reply lines."""
        lines, self._unread = self._unread, []
        return lines

    def expect(self, prefix: str) -> str:
        line = self.reply()
        assert line.startswith(prefix), f"expected {prefix!r}, got {line!r}"
        return line

    def skip_to(self, prefix: str) -> str:
        while True:
            line = self.reply()
            if line.startswith(prefix):
                return line

    def run(self, script: str) -> Dialog:
        pending = b""
        for raw_step in script.splitlines():
            step = raw_step.strip()
            if not step or step.startswith("#"):
                continue
            kind, text = step[:2], step[3:] if len(step) > 2 else ""
            if kind == "C:":
                pending += text.encode() + b"\r\n"
                continue
            if kind == "C~":
                pending += text.encode("latin-1").decode("unicode_escape").encode("latin-1")
                continue
            if pending:
                self.send(pending)
                pending = b""
            if kind == "S:":
                self.expect(text)
            elif kind == "S~":
                self.skip_to(text)
            else:
                raise ValueError(f"bad script step {raw_step!r}")
        if pending:
            self.send(pending)
        else:
            assert not self._unread, f"unread replies: {self._unread}"
        return self

    def of_type(self, kind: type[_E]) -> list[_E]:
        return [e for e in self.events if isinstance(e, kind)]


def dialog(
    script: str,
    settings: Settings = SETTINGS,
    *,
    tls_active: bool = True,
    driver: Driver | None = None,
) -> Dialog:
    """Run ``script`` on a new session."""
    return Dialog(settings, tls_active, driver or Driver()).run(script)


def converse(
    chunks: Iterable[bytes], settings: Settings = SETTINGS, *, tls_active: bool = True
) -> tuple[bytes, list[Event]]:
    """Everything the server sends and reports when the client sends ``chunks``."""
    d = Dialog(settings, tls_active)
    for chunk in chunks:
        d.send(chunk)
    return d.output, d.events
