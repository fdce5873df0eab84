"""Accounts: who may log in (credentials, password hashing) and as which senders."""
