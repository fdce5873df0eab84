"""Use cases every edge calls: login, submission (see docs/architecture.md)."""
