"""Fakes of the outside world for relaygate's tests.

Other people's MX servers become local SMTP servers on 127.0.0.x
(``SMTPSink``); internet DNS becomes a local authoritative server
(``FakeDNS``). Standard library and dnspython only; nothing from relaygate.
Import as ``from fakes import SMTPSink, FakeDNS`` with ``tests/`` on
``sys.path``.
"""

from fakes.dns_server import FakeDNS
from fakes.smtp_sink import (
    COMMANDS,
    DEFAULT_EXTENSIONS,
    Received,
    SinkEvent,
    SMTPSink,
    make_tls_context,
    sinks_on_one_port,
)

__all__ = [
    "COMMANDS",
    "DEFAULT_EXTENSIONS",
    "FakeDNS",
    "Received",
    "SMTPSink",
    "SinkEvent",
    "make_tls_context",
    "sinks_on_one_port",
]
