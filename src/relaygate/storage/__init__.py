"""Storage: the embedded SQLite database (WAL) that holds accounts and messages."""
