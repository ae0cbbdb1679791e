"""Indice dei gestori PEC: who the other providers are, which domains they serve, which
certificates sign for them, and where their service mailbox is (spec section 8).

Loaded from a local copy of the LDIF (plain, or signed as a ``.p7m`` whose signer must be the
configured certificate), always with this provider's own entry added, kept in memory, reloaded on
an interval and on demand (SIGHUP). A reload that fails keeps the last good copy.

- :mod:`pecd.index.model`: the snapshot and its lookups (sans I/O);
- :mod:`pecd.index.ldif`: LDIF read/write (sans I/O);
- :mod:`pecd.index.signed`: the ``.p7m`` made and checked (sans I/O);
- :mod:`pecd.index.service`: loading from the config and the reloading service;
- :mod:`pecd.cli.index`: ``pecd index show|lookup|export``.
"""

from __future__ import annotations

from pecd.index.ldif import LdifError, ParsedIndex, entry_ldif, parse_ldif, write_ldif
from pecd.index.model import ProviderEntry, ProviderIndex, certificate_sha1
from pecd.index.service import (
    IndexLoadError,
    IndexService,
    LoadedIndex,
    index_from_bytes,
    load_index,
    load_index_report,
    own_entry,
)
from pecd.index.signed import (
    SignedIndex,
    SignedIndexError,
    sign_index,
    unwrap_signed_index,
    verify_signed_index,
)

__all__ = [
    "IndexLoadError",
    "IndexService",
    "LdifError",
    "LoadedIndex",
    "ParsedIndex",
    "ProviderEntry",
    "ProviderIndex",
    "SignedIndex",
    "SignedIndexError",
    "certificate_sha1",
    "entry_ldif",
    "index_from_bytes",
    "load_index",
    "load_index_report",
    "own_entry",
    "parse_ldif",
    "sign_index",
    "unwrap_signed_index",
    "verify_signed_index",
    "write_ldif",
]
