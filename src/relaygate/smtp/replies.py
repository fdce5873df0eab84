"""SMTP replies as ready-to-send bytes, each with its RFC 3463 enhanced code.

Fixed replies are encoded once at import; the session only concatenates.
RFC 2034 keeps enhanced codes out of the greeting and the EHLO/HELO reply,
so those two are built by the session without one.
"""

from __future__ import annotations


def reply(code: int, enhanced: str, text: str) -> bytes:
    """One reply line: ``250 2.0.0 Ok``."""
    return f"{code} {enhanced} {text}\r\n".encode()


def status(line: bytes) -> str:
    """``553 5.7.1`` of a reply line (just the code when it has no enhanced code), for logs."""
    code, _, rest = line.decode("utf-8", "replace").strip().partition(" ")
    enhanced = rest.partition(" ")[0]
    if enhanced[:1] in ("2", "4", "5") and enhanced.count(".") == 2:
        return f"{code} {enhanced}"
    return code


def text(line: bytes) -> str:
    """The human part of a reply line, without code and enhanced code."""
    rest = line.decode("utf-8", "replace").strip()[4:]
    first, _, remainder = rest.partition(" ")
    return remainder if first.count(".") == 2 else rest


OK = reply(250, "2.0.0", "Ok")
RSET_OK = OK
NOOP_OK = OK
SENDER_OK = reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = reply(250, "2.1.5", "Recipient ok")
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = reply(221, "2.0.0", "Bye")
HELP = reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT")
VRFY = reply(252, "2.5.0", "Cannot VRFY user; send mail and delivery will be attempted")
EXPN = reply(502, "5.5.1", "EXPN not supported")
READY_TLS = reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = reply(235, "2.7.0", "Authentication successful")

# Syntax and sequence
UNRECOGNIZED = reply(500, "5.5.2", "Command unrecognized")
LINE_TOO_LONG = reply(500, "5.5.2", "Line too long")
BAD_UTF8 = reply(500, "5.5.2", "Command is not valid UTF-8")
NUL_IN_COMMAND = reply(500, "5.5.2", "NUL character in command")
BARE_CR_IN_COMMAND = reply(500, "5.5.2", "Bare CR in command, lines must end in CRLF")
NO_PARAMETERS = reply(501, "5.5.4", "This command takes no parameters")
EHLO_SYNTAX = reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = reply(501, "5.5.4", "Syntax: HELO hostname")
MAIL_SYNTAX = reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BDAT_SYNTAX = reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
AUTH_SYNTAX = reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
BAD_PARAMETER = reply(501, "5.5.4", "Malformed parameter")
DUPLICATE_PARAMETER = reply(501, "5.5.4", "Parameter given twice")
UNSUPPORTED_PARAMETER = reply(555, "5.5.4", "Unsupported parameter")
BAD_SENDER_SYNTAX = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = reply(501, "5.1.3", "Bad recipient address syntax")
# A domain longer than DNS allows (a label over 63 octets, a name over 253).
SENDER_DOMAIN_TOO_LONG = reply(553, "5.1.7", "Sender domain name too long")
RECIPIENT_DOMAIN_TOO_LONG = reply(553, "5.1.3", "Recipient domain name too long")
NEED_SMTPUTF8 = reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
NEED_EHLO = reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = reply(503, "5.5.1", "Send MAIL first")
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "No valid recipients")
NOT_IN_TRANSACTION = reply(503, "5.5.1", "Not allowed during a mail transaction")
DATA_AFTER_BDAT = reply(503, "5.5.1", "DATA not allowed after BDAT")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Too many recipients")
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_COMMANDS = reply(
    421, "4.7.0", "Too many commands before authentication, closing connection"
)
NOT_SMTP = reply(421, "4.7.0", "This is an SMTP server, closing connection")
PROXY_NOT_EXPECTED = reply(
    421, "4.7.0", "PROXY header on a listener without proxy_protocol, closing connection"
)

# Size and content
SIZE_EXCEEDED = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = reply(
    550, "5.5.2", "Message refused: bare CR or LF is not allowed, lines must end in CRLF"
)

# TLS and authentication
TLS_ALREADY_ACTIVE = reply(503, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = reply(454, "4.7.0", "TLS not available")
STARTTLS_FIRST = reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = reply(538, "5.7.11", "Encryption required for requested authentication")
ALREADY_AUTHENTICATED = reply(503, "5.5.1", "Already authenticated")
UNKNOWN_MECHANISM = reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = reply(501, "5.0.0", "Authentication cancelled")
BAD_BASE64 = reply(501, "5.5.2", "Cannot decode base64 response")
BAD_SASL_MESSAGE = reply(501, "5.5.2", "Malformed authentication response")
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY_FAILURE = reply(454, "4.7.0", "Temporary authentication failure")
AUTH_TOO_MANY_FAILURES = reply(421, "4.7.0", "Too many authentication failures, closing connection")
TOO_MANY_FROM_ADDRESS = reply(421, "4.7.0", "Too many connections from your address, try later")

# The session itself (limits per connection, logins that stopped being valid)
SESSION_MESSAGES = reply(
    421, "4.7.0", "Message limit for one connection reached, reconnect to send more"
)
SESSION_TOO_LONG = reply(421, "4.4.2", "Connection open too long, reconnect to go on")


def login_revoked(reason: str) -> bytes:
    """MAIL or end of data after the account or credential changed under the session."""
    return reply(530, "5.7.0", f"Login no longer valid ({reason}), authenticate again")


# Closing
TIMEOUT = reply(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = reply(421, "4.3.2", "Server shutting down, try again later")
TOO_BUSY = reply(421, "4.3.2", "Too many connections, try again later")
LOCAL_ERROR = reply(451, "4.3.0", "Local error in processing, try again later")
SERVICE_ERROR = reply(421, "4.3.0", "Local error in processing, closing connection")
