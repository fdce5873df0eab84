"""A message's attachment as an HTTP download, the same for the API and the
web UI: never rendered on our origin (a stranger's HTML or SVG would run as
us), always ``Content-Disposition: attachment`` with a name that cannot break
the header."""

from __future__ import annotations

from urllib.parse import quote

from starlette.responses import Response

from relaygate.mail_parts import Attachment

# What a browser may be told a part is; anything else is octets.
SHOWN_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf", "text/plain"}
)


def disposition(name: str) -> str:
    """An RFC 6266 attachment header: an ASCII fallback, then the real name."""
    ascii_name = "".join(c if (c.isalnum() and c.isascii()) or c in "._-" else "_" for c in name)
    encoded = quote(name[:200], safe="")
    return f"attachment; filename=\"{ascii_name[:100] or 'part'}\"; filename*=UTF-8''{encoded}"


def attachment_response(part: Attachment, content: bytes) -> Response:
    kind = part.content_type if part.content_type in SHOWN_TYPES else "application/octet-stream"
    return Response(
        content,
        media_type=kind,
        headers={
            "Content-Disposition": disposition(part.filename or f"part-{part.index}"),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )
