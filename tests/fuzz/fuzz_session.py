"""Fuzz the SMTP session: arbitrary client bytes, arbitrary TCP segmentation.

``fuzz_one(data)`` feeds ``data`` to a session driven by an accept-all driver,
cut into chunks chosen from the data itself, and checks the invariants:

- nothing raises;
- every reply line is ``ddd`` + space or dash + text, sent as whole CRLF lines;
- every reply after the greeting carries an RFC 3463 enhanced code of the same
  class, except EHLO/HELO lines and the 334/354 intermediate replies;
- in a command state the input buffer stays below the line limit;
- a message handed to the driver never contains a bare CR or LF;
- nothing comes out after the session closed;
- cutting the input differently changes nothing (unless STARTTLS, which drops
  what was pipelined behind it, was accepted).

Run ``python tests/fuzz/fuzz_session.py [--runs N] [--seconds S] [corpus dir]``:
under atheris when it is installed, else a small mutation loop over the seed
corpus in ``tests/fuzz/corpus``. A failing input is saved as ``crash-<sha1>``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from relaygate.sasl import BearerToken
from relaygate.smtp import replies
from relaygate.smtp.events import (
    AuthRequest,
    Close,
    Event,
    MessageReady,
    RecipientRequest,
    SenderRequest,
    StartTLS,
)
from relaygate.smtp.session import MAX_AUTH_LINE, MAX_COMMAND_LINE, Session, Settings, State

HOSTNAME = "mx.example"
CORPUS = Path(__file__).parent / "corpus"

# Small limits so that random input reaches them.
_MECHANISMS = (*Settings.auth_mechanisms, "OAUTHBEARER", "XOAUTH2")
SETTINGS = (
    Settings(
        HOSTNAME,
        max_message_size=2000,
        max_recipients=3,
        max_bad_commands=20,
        auth_mechanisms=_MECHANISMS,
    ),
    Settings(
        HOSTNAME,
        max_message_size=2000,
        max_recipients=3,
        max_bad_commands=20,
        starttls_available=True,
        auth_mechanisms=_MECHANISMS,
    ),
)

_REPLY = re.compile(rb"[2-5]\d\d[ -][^\r\n]*")
_ENHANCED = re.compile(rb"([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")
_EHLO_LINE = re.compile(
    rb"250[ -](?:"
    + re.escape(HOSTNAME.encode())
    + rb"|PIPELINING|SIZE \d+|8BITMIME|SMTPUTF8|ENHANCEDSTATUSCODES|CHUNKING|STARTTLS"
    + rb"|AUTH [A-Z0-9 -]+)"
)
_CHALLENGE = re.compile(rb"334 [A-Za-z0-9+/]*=*")
_START_DATA = b"354 End data with <CR><LF>.<CR><LF>"
_COMMAND_STATES = (State.CONNECTED, State.GREETED, State.MAIL, State.RCPT)


def has_bare_line_ending(body: bytes | bytearray) -> bool:
    crlf = body.count(b"\r\n")
    return body.count(b"\r") != crlf or body.count(b"\n") != crlf


@dataclass
class Run:
    """One session fed chunk by chunk, answering every question with yes."""

    settings: Settings
    tls_active: bool = False
    output: bytes = b""
    events: list[Event] = field(default_factory=list)
    saw_starttls: bool = False

    def __post_init__(self) -> None:
        self.session = Session(self.settings, tls_active=self.tls_active)
        self.session.greeting()
        greeting = self.session.take_output()
        assert greeting == f"220 {HOSTNAME} ESMTP relaygate\r\n".encode(), greeting
        self.output = greeting

    def feed(self, chunk: bytes) -> None:
        session = self.session
        was_closed = session.closed
        session.receive(chunk)
        while (event := session.next_event()) is not None:
            self.events.append(event)
            self._answer(event)
        out = session.take_output()
        if was_closed:
            assert out == b"", f"output after close: {out!r}"
        check_replies(out)
        self.output += out
        if session.state in _COMMAND_STATES:
            # An AUTH line may be as long as a SASL response (RFC 4954).
            auth = session._buffer[:5].upper() == b"AUTH "
            limit = MAX_AUTH_LINE if auth else MAX_COMMAND_LINE
            assert len(session._buffer) < limit, len(session._buffer)
        elif session.state is State.AUTH:
            assert len(session._buffer) < MAX_AUTH_LINE, len(session._buffer)

    def _answer(self, event: Event) -> None:
        session = self.session
        if isinstance(event, AuthRequest):
            if isinstance(event.credentials, BearerToken) and event.credentials.token == "bad":
                # A refused token: the error challenge, then 535 after any answer.
                session.auth_failed(replies.AUTH_FAILED, b'{"status":"invalid_token"}')
            else:
                session.auth_succeeded(event.credentials.username or "user")
        elif isinstance(event, SenderRequest):
            session.accept_sender()
        elif isinstance(event, RecipientRequest):
            session.accept_recipient()
        elif isinstance(event, MessageReady):
            assert not has_bare_line_ending(event.body), event.body
            assert len(event.body) <= self.settings.max_message_size
            session.message_queued("Q1")
        elif isinstance(event, StartTLS):
            self.saw_starttls = True
            session.tls_started()
        elif isinstance(event, Close):
            assert session.closed


def check_replies(out: bytes) -> None:
    """Reply grammar for everything sent after the greeting."""
    if not out:
        return
    assert out.endswith(b"\r\n"), out
    for line in out[:-2].split(b"\r\n"):
        assert _REPLY.fullmatch(line), line
        if line.startswith(b"3"):
            assert line == _START_DATA or _CHALLENGE.fullmatch(line), line
            continue
        if _EHLO_LINE.fullmatch(line):
            continue
        match = _ENHANCED.match(line)
        assert match is not None, f"no enhanced status code: {line!r}"
        assert match.group(1) == match.group(2), f"code class mismatch: {line!r}"


def run_chunks(chunks: list[bytes], variant: int = 0) -> Run:
    run = Run(SETTINGS[variant % len(SETTINGS)], tls_active=variant % len(SETTINGS) == 0)
    for chunk in chunks:
        run.feed(chunk)
    return run


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 1, 2, 3, 5, 8, 13, 64, 512, len(data)))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def fuzz_one(data: bytes) -> None:
    """Feed ``data`` whole and cut into pieces; check the invariants of both runs."""
    seed = zlib.crc32(data)
    variant = seed & 1
    whole = run_chunks([data], variant)
    pieces = run_chunks(cut(data, random.Random(seed)), variant)
    if not (whole.saw_starttls or pieces.saw_starttls):
        assert pieces.output == whole.output, (pieces.output, whole.output)
        assert pieces.events == whole.events


# ---------------------------------------------------------------- mutation loop

TOKENS = (
    b"EHLO client.example\r\n",
    b"HELO client.example\r\n",
    b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH OAUTHBEARER " + base64.b64encode(b"n,a=u@x,\x01auth=Bearer t.o.k\x01\x01") + b"\r\n",
    b"AUTH OAUTHBEARER " + base64.b64encode(b"n,,\x01auth=Bearer bad\x01\x01") + b"\r\n",
    b"AUTH XOAUTH2 " + base64.b64encode(b"user=u@x\x01auth=Bearer bad\x01\x01") + b"\r\n",
    b"AUTH XOAUTH2\r\n",
    b"AQ==\r\n",
    b"dXNlcg==\r\n",
    b"*\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 0 LAST\r\n",
    b"STARTTLS\r\n",
    b"RSET\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r\n..",
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b"\xff",
    b"\xc2\xb2",  # a Unicode digit that int() refuses
    b" SIZE=",
    b"x" * 1100,
)


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and buf:  # delete a range
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3:  # insert a protocol token
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 4 and buf:  # duplicate a range
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 64)]
        elif op == 5 and corpus:  # splice with another input
            other = rng.choice(corpus)
            buf = buf[:pos] + other[rng.randint(0, len(other)) :]
        else:  # replace a byte with an interesting one
            if buf:
                buf[rng.randrange(len(buf))] = rng.choice(b'\r\n.\0 :<>@"\\=\x80')
    return bytes(buf[:20000])


def load_corpus(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]


def save_crash(data: bytes) -> Path:
    path = Path(f"crash-{hashlib.sha1(data).hexdigest()}")
    path.write_bytes(data)
    return path


def mutation_loop(corpus: list[bytes], runs: int, seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    pool = list(corpus) or [b""]
    deadline = time.monotonic() + seconds
    done = 0
    for done in range(1, runs + 1):
        data = mutate(rng.choice(pool), rng, pool)
        try:
            fuzz_one(data)
        except Exception:
            print(f"crash after {done} runs, input saved to {save_crash(data)}")
            raise
        if rng.random() < 0.01 and len(pool) < 1000:
            pool.append(data)
        if time.monotonic() > deadline:
            break
    return done


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        atheris = None
    if atheris is not None:
        if hasattr(atheris, "instrument_all"):
            atheris.instrument_all()
        atheris.Setup(argv, fuzz_one)
        atheris.Fuzz()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("corpus", nargs="?", type=Path, default=CORPUS)
    parser.add_argument("--runs", type=int, default=100000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv[1:])
    corpus = load_corpus(args.corpus)
    for data in corpus:
        fuzz_one(data)
    done = mutation_loop(corpus, args.runs, args.seconds, args.seed)
    print(f"{done} runs, {len(corpus)} seeds, no failure")


if __name__ == "__main__":
    main()
