"""The HTTP edge: admin API (/api/v1), later the web UI and /metrics (issue 9)."""
