"""Address verification: ``relaygate verify``, the verify API route and the
RCPT-time recipient domain check (docs/verify.md)."""
