"""Properties of the session that hold for any input (hypothesis).

(a) Arbitrary bytes, cut arbitrarily: nothing raises, every reply is well
    formed and carries an enhanced code, the buffer stays bounded, and the
    cut makes no difference (the invariants live in tests/fuzz/fuzz_session.py).
(b) Dot-stuffing round trip: any body sent through DATA comes out unchanged.
(c) A bare CR or LF anywhere in a body refuses the message (550 5.5.2), never
    ends it early, and the session stays usable.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from dialog import ENVELOPE, Dialog
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relaygate.smtp import replies
from relaygate.smtp.events import MessageReady, SenderRequest
from relaygate.smtp.session import unstuff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from fuzz_session import TOKENS, has_bare_line_ending, run_chunks

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------ (a) arbitrary input

fragments = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(TOKENS),
    st.sampled_from(TOKENS),  # twice: protocol-shaped input reaches deeper states
)


@settings(FAST, max_examples=2000)
@given(
    data=st.lists(fragments, max_size=30).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
    variant=st.integers(min_value=0, max_value=1),
)
def test_any_input_any_cut(data: bytes, cuts: list[int], variant: int) -> None:
    points = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    pieces = run_chunks(chunks, variant)  # checks replies and buffer after every chunk
    whole = run_chunks([data], variant)
    if not (pieces.saw_starttls or whole.saw_starttls):  # STARTTLS drops pipelined input
        assert pieces.output == whole.output
        assert pieces.events == whole.events


@FAST
@given(st.binary(min_size=1, max_size=3000), st.integers(min_value=1, max_value=50))
def test_random_bytes_in_fixed_chunks(data: bytes, size: int) -> None:
    run_chunks([data[i : i + size] for i in range(0, len(data), size)])


# ------------------------------------------------------------ (b) dot-stuffing

line_text = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"", b".", b"..", b"...", b".x", b". ", b"x.", b".\x00"]),
)


def dot_stuff(body: bytes) -> bytes:
    """What a client sends for ``body`` (which ends in CRLF) after DATA."""
    lines = body.split(b"\r\n")[:-1]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def send_in_chunks(d: Dialog, data: bytes, cuts: list[int]) -> None:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in itertools.pairwise(points):
        d.send(data[a:b])


@FAST
@given(lines=st.lists(line_text, max_size=20), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_dot_stuffing_round_trip(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(ln + b"\r\n" for ln in lines)
    d = Dialog().run(ENVELOPE + "C: DATA\nS: 354")
    send_in_chunks(d, dot_stuff(body) + b"NOOP\r\n", cuts)
    assert d.replies() == ["250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok"]
    [message] = d.of_type(MessageReady)
    assert message.body == body


# ------------------------------------------------------------ (c) bare CR / LF


@FAST
@given(
    lines=st.lists(line_text, min_size=1, max_size=12),
    separators=st.lists(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]), min_size=1),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_bare_line_ending_refuses_the_message(
    lines: list[bytes], separators: list[bytes], cuts: list[int]
) -> None:
    body = b"".join(ln + separators[i % len(separators)] for i, ln in enumerate(lines))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"  # the client ends the last line before the final dot
    assume(has_bare_line_ending(body))
    d = Dialog().run(ENVELOPE + "C: DATA\nS: 354")
    send_in_chunks(d, dot_stuff(body) + b"RSET\r\nMAIL FROM:<a@b.example>\r\n", cuts)
    assert d.replies() == [
        "550 5.5.2 Message refused: bare CR or LF is not allowed, lines must end in CRLF",
        "250 2.0.0 Ok",
        "250 2.1.0 Sender ok",
    ]
    assert d.of_type(MessageReady) == []
    assert len(d.of_type(SenderRequest)) == 2  # no command was read from inside the body
    assert replies.BARE_LINE_ENDING.startswith(b"550 5.5.2 ")


# ------------------------------------------------------------ (d) unstuffing in place

lines_with_dots = st.lists(
    st.one_of(st.sampled_from([b".", b"..", b".x", b"x", b"", b"x.y", b"...."]), st.binary()),
    max_size=60,
).map(lambda parts: b"\r\n".join(p.replace(b"\r", b"").replace(b"\n", b"") for p in parts))


@FAST
@given(body=lines_with_dots)
def test_unstuffing_in_place_matches_a_plain_replace(body: bytes) -> None:
    buffer = bytearray(b"\r\n" + body)
    unstuff(buffer)
    assert bytes(buffer) == (b"\r\n" + body).replace(b"\r\n.", b"\r\n")


def test_unstuffing_a_message_of_dot_lines_stays_linear() -> None:
    # Far past the in-place budget (one dot line per KiB): the rest is one replace.
    body = b"\r\n" + b"\r\n".join([b".", b"..x", b".y"] * 200_000)
    buffer = bytearray(body)
    unstuff(buffer)
    assert bytes(buffer) == body.replace(b"\r\n.", b"\r\n")
