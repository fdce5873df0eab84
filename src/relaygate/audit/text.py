"""Server text is untrusted: it reaches a terminal, a CI log and JSON only through here."""

from __future__ import annotations

MAX_TEXT = 160  # characters of server text kept in one detail


def clean(text: str | bytes, limit: int = MAX_TEXT) -> str:
    """Printable one-line text: control characters (CR, LF, ESC, NUL, C1, DEL) become
    ``\\xNN``; longer than ``limit`` ends with "...". Never raises."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out: list[str] = []
    size = 0
    for char in text:
        code = ord(char)
        piece = f"\\x{code:02x}" if code < 0x20 or 0x7F <= code < 0xA0 else char
        if code in (0x2028, 0x2029, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E):
            piece = f"\\u{code:04x}"  # line separators and bidi overrides fool terminals too
        if size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)
