"""Signed webhooks: events about messages and accounts POSTed to subscribers (docs/webhooks.md)."""
