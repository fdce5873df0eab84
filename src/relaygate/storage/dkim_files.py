"""DKIM signing keys as files in data_dir/dkim (storage.api.DKIMKeys, one machine).

The files and their rules (names, modes, never replacing a key) are
delivery/dkim.py's; this runs them off the event loop and names a key by its
path. A cluster keeps its keys in PostgreSQL (storage/postgres/dkim.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relaygate.delivery.dkim import DKIMKey, KeyType, generate_key, key_path, load_keys


class FileDKIMKeys:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def generate(self, domain: str, selector: str | None, algorithm: KeyType) -> DKIMKey:
        key, _ = await asyncio.to_thread(generate_key, self.directory, domain, selector, algorithm)
        return key

    async def load(self) -> dict[str, list[DKIMKey]]:
        return await asyncio.to_thread(load_keys, self.directory)

    def where(self, key: DKIMKey) -> str:
        return str(key_path(self.directory, key.domain, key.selector, key.key_type))
