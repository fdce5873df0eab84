"""Text that other hosts send us, made safe once where it enters our code.

Remote SMTP replies, banners, DNS names and error texts are attacker-chosen.
aiosmtplib hands us replies decoded with ``surrogateescape``: invalid UTF-8
becomes lone surrogates that SQLite, log writers and the ``email`` package
cannot encode. ``clean`` turns any such value into one printable line of
bounded length that every later use (the queue history, logs, DSN
Diagnostic-Code fields) can store as it is:

- invalid UTF-8 bytes become ``\\xff`` escapes (valid UTF-8 text is kept);
- a multi-line reply becomes one line, its lines joined by a space;
- control characters (NUL, bare CR, TAB, DEL, C1, Unicode line separators)
  become ``\\x00``-style escapes, so no value can start a new log line or
  header field;
- the result is cut at ``MAX_REMOTE_TEXT`` characters.
"""

from __future__ import annotations

import unicodedata

MAX_REMOTE_TEXT = 512  # characters; a longer reply is cut and marked


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(char: str) -> bool:
    # Cc: C0, DEL, C1; Zl/Zp: U+2028/U+2029, which splitlines() treats as line ends.
    return unicodedata.category(char) in ("Cc", "Zl", "Zp")


def clean(value: str | bytes, limit: int = MAX_REMOTE_TEXT) -> str:
    """``value`` as one safe printable line of at most ``limit`` characters."""
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8", "surrogateescape")  # back to the bytes received
        except UnicodeEncodeError:  # surrogates that were not escaped bytes
            raw = value.encode("utf-8", "backslashreplace")
    else:
        raw = value
    text = raw.decode("utf-8", "backslashreplace")
    lines = [line.removesuffix("\r").strip(" \t") for line in text.split("\n")]
    joined = " ".join(line for line in lines if line)
    safe = "".join(_escape(c) if _unsafe(c) else c for c in joined)
    if len(safe) > limit:
        safe = safe[: max(limit - 3, 0)] + "..."
    return safe


def reply(code: int, message: str) -> str:
    """A remote reply (code and text) as one safe line: ``550 5.1.1 No such user``."""
    return f"{code} {clean(message)}"
