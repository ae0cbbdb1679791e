"""A ClamAV signature database generated here, with nothing downloaded.

It holds two harmless signatures, enough for the tests and a development installation to prove
that messages really go through clamd:

- ``Eicar-Test-Signature``: the EICAR anti-virus test file (68 bytes), as an MD5 hash signature
  (``.hdb``: the file alone) and as a body signature (``.ndb``, target any, offset any: the
  string anywhere, also inside an attachment clamd decodes from base64 or quoted-printable).
- ``Pecd.Test.Signature``: the text ``PECD-TEST-VIRUS-`` + ``SIGNATURE-7f3a`` (one word)
  anywhere (``.ndb``).

clamd reports signatures from a database that is not ClamAV's own with ``.UNOFFICIAL`` appended,
e.g. ``Eicar-Test-Signature.UNOFFICIAL``. A production clamd uses ClamAV's official databases
(freshclam) instead; they detect EICAR too, under ``Win.Test.EICAR_HDB-1``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = [
    "EICAR",
    "EICAR_SIGNATURE",
    "EICAR_SIGNATURE_NAME",
    "PROJECT_SIGNATURE",
    "PROJECT_SIGNATURE_NAME",
    "PROJECT_TEXT",
    "write_database",
]

# The EICAR test file, kept as hex so that this source file is not itself the test file.
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e444152442d"
    "414e544956495255532d544553542d46494c452124482b482a"
)
EICAR_SIGNATURE_NAME = "Eicar-Test-Signature"
# Assembled, so that a database with the signature does not match this file's text.
PROJECT_TEXT = ("PECD-TEST-VIRUS-" + "SIGNATURE-7f3a").encode("ascii")
PROJECT_SIGNATURE_NAME = "Pecd.Test.Signature"
# What clamd reports for each (signatures from a database of one's own are "unofficial").
EICAR_SIGNATURE = EICAR_SIGNATURE_NAME + ".UNOFFICIAL"
PROJECT_SIGNATURE = PROJECT_SIGNATURE_NAME + ".UNOFFICIAL"

DATABASE_FILES = ("pecd-test.hdb", "pecd-test.ndb")


def database_files() -> dict[str, str]:
    """File name -> content of the database."""
    md5 = hashlib.md5(EICAR, usedforsecurity=False).hexdigest()
    return {
        # MD5:size:name
        "pecd-test.hdb": f"{md5}:{len(EICAR)}:{EICAR_SIGNATURE_NAME}\n",
        # name:target type (0 = any file):offset (* = anywhere):hex body
        "pecd-test.ndb": (
            f"{EICAR_SIGNATURE_NAME}:0:*:{EICAR.hex()}\n"
            f"{PROJECT_SIGNATURE_NAME}:0:*:{PROJECT_TEXT.hex()}\n"
        ),
    }


def write_database(directory: Path) -> Path:
    """Write the database into ``directory`` (created if missing; the files are replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in database_files().items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, "ascii")
        tmp.replace(directory / name)
    return directory
