"""relaygate: an authenticated SMTP submission server and relay."""

__version__ = "0.1.0"
