"""Message bodies on PostgreSQL: small ones in one row, large ones in pieces.

libpq keeps each connection's send and receive buffers as large as the
largest value it has carried, for the life of the connection: a pool of ten
connections that once carried a 25 MB body each would hold 250 MB for good.
So a body of CHUNK_BYTES or more goes as pieces of CHUNK_BYTES, each its own
statement (one piece in a buffer at a time), and is read back the same way.
The pieces are slices of the session's own buffer (memoryview: no copy of the
whole). The header we add is its own column, so nothing is joined to store.
"""

from __future__ import annotations

from typing import Any

import psycopg

CHUNK_BYTES = 1024 * 1024


async def write(
    cursor: psycopg.AsyncCursor[Any], message_id: str, header: bytes, body: bytes | bytearray
) -> None:
    """Store a body inside the caller's transaction."""
    if len(body) < CHUNK_BYTES:
        await cursor.execute(
            "INSERT INTO message_bodies (id, header, body) VALUES (%s, %b, %b)",
            (message_id, header, body),
        )
        return
    view = memoryview(body)
    pieces = range(0, len(body), CHUNK_BYTES)
    await cursor.execute(
        "INSERT INTO message_bodies (id, header, body, chunks) VALUES (%s, %b, '', %s)",
        (message_id, header, len(pieces)),
    )
    try:
        for seq, start in enumerate(pieces):
            await cursor.execute(
                "INSERT INTO message_body_chunks (id, seq, data) VALUES (%s, %s, %b)",
                (message_id, seq, view[start : start + CHUNK_BYTES]),
            )
    finally:
        view.release()


async def read(
    connection: psycopg.AsyncConnection[Any], message_id: str, limit: int | None = None
) -> bytes | None:
    """The stored message (our header, then the client's body); at most ``limit``
    bytes when given (a bounce quotes only the head). None: no body stored."""
    cursor = await connection.execute(
        "SELECT header, body, chunks FROM message_bodies WHERE id = %s", (message_id,)
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    header, body, chunks = bytes(row[0]), row[1], int(row[2])
    if not chunks:
        whole = header + bytes(body)
        return whole if limit is None else whole[:limit]
    parts = bytearray(header)
    for seq in range(chunks):
        if limit is not None and len(parts) >= limit:
            break
        cursor = await connection.execute(
            "SELECT data FROM message_body_chunks WHERE id = %s AND seq = %s", (message_id, seq)
        )
        piece = await cursor.fetchone()
        if piece is None:
            raise psycopg.DataError(f"message {message_id}: piece {seq} of its body is missing")
        parts += piece[0]
    return bytes(parts if limit is None else parts[:limit])
