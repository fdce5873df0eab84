"""End-to-end tests: the real relaygate process, real sockets, real TLS, real clients."""
