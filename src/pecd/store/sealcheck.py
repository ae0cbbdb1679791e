"""The heavy half of verifying seals on SQLite, run in worker processes: read each event's
canonical text straight from the database file and hash it (stdlib only, so a worker starts
fast). Two seals are checked at once on two cores."""

from __future__ import annotations

import hashlib
import sqlite3
import struct

_DIGEST = struct.Struct(">q32s")


def digests(path: str, sql: str, seal_id: int) -> tuple[int, bytes]:
    """(events, the digest list) of the events marked with ``seal_id``, in id order."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        sha256, pack = hashlib.sha256, _DIGEST.pack
        out = [
            pack(eid, sha256(text.encode()).digest()) for eid, text in con.execute(sql, (seal_id,))
        ]
        return len(out), b"".join(out)
    finally:
        con.close()
