"""`relaygate check`: audit a submission server from the outside, as a client would.

- ``target.py``: HOST[:PORT] and the default ports.
- ``text.py``: server text made safe to print.
- ``findings.py``: the sans-IO core; observations in, one result per check out.
- ``client.py``: a small, bounded SMTP client on asyncio streams (raw bytes, STARTTLS
  at a chosen moment, a timeout on every step).
- ``probe.py``: the conversations that gather the observations.
- ``command.py``: the CLI command (arguments, output, exit status).
"""
