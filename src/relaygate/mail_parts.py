"""A stored message taken apart for people to read (the API's /parts, the web UI).

Pure functions on the message's bytes (the ``email`` package, policy.default):
its header fields decoded, the first text/plain and text/html bodies, and the
list of attachments. Nothing here makes the content safe to show: names and
values are plain text for the edges to escape, the HTML is the sender's, for
a sandboxed frame only (http/ui). Malformed mail never raises: what cannot be
decoded is shown replaced, as a mail client does.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import html.parser
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

MAX_HEADER_VALUE = 10_000  # characters of one header value shown
MAX_PARTS = 500  # MIME parts walked; a message of more shows the first ones


@dataclass(frozen=True, slots=True)
class Attachment:
    index: int  # its place among all parts (stable: the ``part`` to ask for)
    filename: str  # as the sender named it, decoded; "" if none
    content_type: str
    size: int  # bytes once decoded
    inline: bool  # Content-Disposition inline, or a related part with a Content-ID
    content_id: str  # without <>; "" if none


@dataclass(slots=True)
class MessageParts:
    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _header_value(message: Message, name: str) -> str:
    try:
        value = str(message[name])
    except Exception:
        raw = message.get_all(name) or [""]
        value = str(raw[0]).encode("utf-8", "replace").decode("utf-8", "replace")
    return value[:MAX_HEADER_VALUE]


def _content(part: EmailMessage) -> bytes | str:
    try:
        content: bytes | str = part.get_content()
        return content
    except (LookupError, ValueError, AssertionError, KeyError):
        payload = part.get_payload(decode=True)
        return payload if isinstance(payload, bytes) else b""


def _text(part: EmailMessage) -> str:
    """The part's text with plain newlines (mail travels with CRLF)."""
    content = _content(part)
    if isinstance(content, str):
        return content.replace("\r\n", "\n")
    charset = part.get_content_charset() or "utf-8"
    try:
        text = content.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown charset, or a NUL in its name
        text = content.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def _walk(message: EmailMessage) -> list[EmailMessage]:
    parts: list[EmailMessage] = []
    for part in message.walk():
        assert isinstance(part, EmailMessage)
        parts.append(part)
        if len(parts) >= MAX_PARTS:
            break
    return parts


def _filename(part: EmailMessage) -> str:
    try:
        return part.get_filename() or ""
    except Exception:
        return ""


def _is_attachment(part: EmailMessage) -> bool:
    if part.is_multipart():
        return False
    disposition = part.get_content_disposition()
    if disposition in ("attachment", "inline") and (_filename(part) or disposition == "attachment"):
        return True
    return part.get_content_maintype() not in ("text", "multipart") or bool(part["Content-ID"])


def headers(raw: bytes) -> list[tuple[str, str]]:
    """The top-level header fields, decoded, without parsing the body."""
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        raw, headersonly=True
    )
    return [(name, _header_value(message, name)) for name in message]


def parts(raw: bytes) -> MessageParts:
    return scan(raw)[0]


def scan(raw: bytes) -> tuple[MessageParts, dict[int, bytes]]:
    """The parts, and each attachment's decoded bytes by index: one parse."""
    try:
        return _scan_parsed(_parse(raw))
    except RecursionError:
        # Nesting deeper than the email package can recurse: the top-level
        # header fields only, no body shown.
        return MessageParts(headers=headers(raw)), {}


def _scan_parsed(message: EmailMessage) -> tuple[MessageParts, dict[int, bytes]]:
    found = MessageParts(headers=[(name, _header_value(message, name)) for name in message])
    contents: dict[int, bytes] = {}
    for index, part in enumerate(_walk(message)):
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if _is_attachment(part):
            content = _content(part)
            contents[index] = content.encode() if isinstance(content, str) else content
            cid = str(part["Content-ID"] or "").strip().strip("<>")
            found.attachments.append(
                Attachment(
                    index=index,
                    filename=_filename(part),
                    content_type=kind,
                    size=len(contents[index]),
                    inline=part.get_content_disposition() == "inline" or bool(cid),
                    content_id=cid,
                )
            )
        elif kind == "text/plain" and found.text is None:
            found.text = _text(part)
        elif kind == "text/html" and found.html is None:
            found.html = _text(part)
    return found, contents


def attachment(raw: bytes, index: int) -> tuple[Attachment, bytes] | None:
    """One attachment's description and decoded bytes; None if ``index`` is not one."""
    found, contents = scan(raw)
    for part in found.attachments:
        if part.index == index:
            return part, contents[index]
    return None


def inline_images(raw: bytes, max_size: int) -> tuple[str | None, dict[str, tuple[str, bytes]]]:
    """The HTML body and the images it may reference by cid: (content id ->
    type, bytes), up to ``max_size`` bytes each, SVG left out: one parse."""
    found, contents = scan(raw)
    images = {
        part.content_id: (part.content_type, contents[part.index])
        for part in found.attachments
        if part.content_id
        and part.content_type.startswith("image/")
        and part.content_type != "image/svg+xml"
        and part.size <= max_size
    }
    return found.html, images


# Tags after which a reader expects a new line, and ones whose text is not shown.
_BLOCKS = frozenset(
    (
        *("address", "article", "blockquote", "br", "dd", "div", "dl", "dt", "footer", "form"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "ol", "p", "pre"),
        *("section", "table", "tr", "ul"),
    )
)
_HIDDEN = frozenset(("head", "script", "style", "title", "template", "noscript"))


class _TextRenderer(html.parser.HTMLParser):
    """What a reader of the HTML would see, as plain text: tags dropped,
    entities decoded, blocks on lines of their own, a link's address after it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._hidden = 0
        self._href: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN:
            self._hidden += 1
        elif tag in _BLOCKS:
            self.out.append("\n")
        if tag == "li":
            self.out.append("- ")
        if tag == "a":
            self._href.append(dict(attrs).get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BLOCKS:
            self.out.append("\n")
        if tag == "a" and self._href:
            href = self._href.pop()
            if href and href.startswith(("http:", "https:", "mailto:")):
                self.out.append(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.out.append(re.sub(r"\s+", " ", data))


def html_text(markup: str) -> str:
    """A plain-text rendering of an HTML body, for a terminal (``messages show
    --text`` when a message has no text/plain part). Never raises."""
    renderer = _TextRenderer()
    try:
        renderer.feed(markup)
        renderer.close()
    except (AssertionError, ValueError):  # html.parser gives up on some broken markup
        pass
    lines = [line.strip() for line in "".join(renderer.out).split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text + "\n" if text else ""
