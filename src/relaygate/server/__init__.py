"""Server glue: TLS, listeners, the connection driver and worker processes."""
