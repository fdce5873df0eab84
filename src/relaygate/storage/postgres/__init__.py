"""The PostgreSQL backend (issue 8): the storage interfaces on a shared database.

psycopg 3 with its async connection pool. The schema is versioned like the
SQLite one (schema.py); ``migrate`` is idempotent and safe to run from several
nodes at once (an advisory lock serialises them).
"""
