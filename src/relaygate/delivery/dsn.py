"""Delivery status notifications (RFC 3464): the bounce and the delay warning.

A DSN is a multipart/report with three parts: a note for people, the
machine-readable message/delivery-status, and the original message's header
(text/rfc822-headers, RFC 6522), never its body. It is sent from the null
sender, so a DSN that cannot be delivered is never bounced again (no loops),
and a message that itself came from the null sender never gets one.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from relaygate.delivery.remote_text import clean
from relaygate.message import header_block

# RFC 5322 allows 998 octets per line; a Diagnostic-Code is folded at spaces to
# 78, and this cap keeps even one unbreakable word well inside the limit.
MAX_DIAGNOSTIC = 900

_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})")


def status_code(reply: str, permanent: bool) -> str:
    """The enhanced status code in a reply, or a generic one."""
    found = _STATUS.match(reply)
    if found:
        return found.group(1)
    return "5.0.0" if permanent else "4.0.0"


def build(
    *,
    hostname: str,
    queue_id: str,
    original: bytes,
    sender: str,
    recipients: Sequence[tuple[str, str, str | None]],  # (recipient, reply, remote host)
    arrival: float,
    now: float,
    warning: bool = False,
) -> bytes:
    """The DSN as bytes with CRLF line ends, ready to spool.

    Replies and host names may come from hostile servers: each is made one
    safe line here again (whatever the caller did), so no reply can add a
    header field or break the message/delivery-status part.
    """
    recipients = [
        (recipient, clean(reply, MAX_DIAGNOSTIC), clean(host) if host else None)
        for recipient, reply, host in recipients
    ]
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = sender
    report["Subject"] = (
        "Delayed Mail (still being retried)" if warning else "Undelivered Mail Returned to Sender"
    )
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = f"<{queue_id}.dsn.{int(now)}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no automatic answers to this
    listed = "\n".join(f"  <{r}>: {reply}" for r, reply, _ in recipients)
    if warning:
        note = (
            f"This is the mail system at {hostname}.\n\n"
            "Your message could not be delivered yet. It is still being retried;\n"
            "you do not need to send it again.\n\n"
            f"{listed}\n"
        )
    else:
        note = (
            f"This is the mail system at {hostname}.\n\n"
            "Your message could not be delivered to one or more recipients.\n"
            "It is attached below (headers only).\n\n"
            f"{listed}\n"
        )
    report.attach(MIMEText(note, "plain", "us-ascii" if note.isascii() else "utf-8"))

    # message/delivery-status is a list of header blocks (RFC 3464 section 2.1):
    # the email package wants each block as a Message of its own.
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Relaygate-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=True)
    blocks = [per_message]
    for recipient, reply, host in recipients:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {recipient}"
        block["Action"] = "delayed" if warning else "failed"
        block["Status"] = status_code(reply, permanent=not warning)
        if host:
            block["Remote-MTA"] = f"dns; {host.partition('[')[0]}"  # the name, not [ip]:port
        # RFC 3464 2.3.6: one field of US-ASCII text, folded (RFC 5322 2.2.3).
        block["Diagnostic-Code"] = fold("Diagnostic-Code", f"smtp; {_ascii(reply)}")
        blocks.append(block)
    delivery_status = MIMEBase("message", "delivery-status")
    delivery_status.set_payload(blocks)  # type: ignore[arg-type]
    report.attach(delivery_status)

    headers = MIMEBase("text", "rfc822-headers")
    headers.set_payload(header_block(original).decode("utf-8", "replace").replace("\r\n", "\n"))
    report.attach(headers)
    text = report.as_string()
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def fold(name: str, value: str, width: int = 78) -> str:
    """``value`` folded at spaces so each line of ``name: value`` fits ``width``.

    A word longer than a line stays whole on a line of its own (RFC 5322
    folds only at white space); ``value`` must already be one line.
    """
    lines: list[str] = []
    current = ""
    used = len(name) + 2  # "Name: " on the first line
    for word in value.split(" "):
        if current and used + len(current) + 1 + len(word) > width:
            lines.append(current)
            current, used = word, 1  # a continuation line starts with one space
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\n ".join(lines)


def _ascii(text: str) -> str:
    """Non-ASCII characters as ``\\u00e9`` escapes (message/delivery-status is ASCII)."""
    return text.encode("ascii", "backslashreplace").decode("ascii")
