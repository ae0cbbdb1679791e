"""Stock IMAP clients against pecd's own IMAP: mbsync (isync) and curl over IMAPS.

Every message kind pecd emits is delivered into a mailbox; mbsync mirrors the mailbox into a
local Maildir and curl fetches each message by UID; what they got is the stored message and it
verifies with ``openssl cms -verify``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ImapServer as Server
from helpers import every_kind, mbsyncrc, openssl_verify
from helpers import imap_server_fixture as imap_server_fixture  # the fixture `server`
from helpers import pki_fixture as pki_fixture  # the fixture `pki`
from pecd.pec.pki import DevPki

TIMEOUT = 120


def _signing_ca(dev_pki: DevPki, tmp_path: Path) -> Path:
    ca = tmp_path / "signing-ca.pem"
    ca.write_bytes(dev_pki.ca.cert_pem)
    return ca


def _deliver_every_kind(server: Server, address: str, dev_pki: DevPki) -> dict[str, bytes]:
    kinds = every_kind(dev_pki)
    for name, raw in kinds.items():
        server.store.deliver(address, f"clients-{name}", raw)
    return kinds


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (isync) is not installed")
def test_mbsync_mirrors_every_pec_kind(server: Server, dev_pki: DevPki, tmp_path: Path) -> None:
    address, password = server.new_user()
    kinds = _deliver_every_kind(server, address, dev_pki)
    local = tmp_path / "mirror"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        mbsyncrc(
            port=server.imaps_port,
            user=address,
            password=password,
            ca=server.pki.ca_file,
            local=local,
            patterns="*",
        )
    )
    rc.chmod(0o600)
    r = subprocess.run(
        ["mbsync", "-c", str(rc), "-a"], capture_output=True, check=False, timeout=TIMEOUT
    )
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    inbox = local / "INBOX"
    got = [p.read_bytes() for sub in ("new", "cur") for p in (inbox / sub).iterdir()]
    # mbsync keeps Maildir files with LF line ends and adds an X-TUID: header while it syncs;
    # apart from that the bytes are the stored ones, and every signature still verifies.
    got = [re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", g) for g in got]
    assert len(got) == len(kinds)
    for name, raw in kinds.items():
        lf = raw.replace(b"\r\n", b"\n")
        assert lf in got, name
        openssl_verify(lf, _signing_ca(dev_pki, tmp_path), tmp_path)
    # The special-use folders came across too.
    assert {p.name for p in local.iterdir()} >= {"INBOX", "Sent", "Drafts", "Trash"}


def test_curl_fetches_every_pec_kind_byte_exact(
    server: Server, dev_pki: DevPki, tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    address, password = server.new_user()
    kinds = _deliver_every_kind(server, address, dev_pki)
    url = f"imaps://localhost:{server.imaps_port}/INBOX"
    common = [curl, "-sS", "--cacert", str(server.pki.ca_file), "-u", f"{address}:{password}"]
    listing = subprocess.run(
        [*common, "-X", "UID SEARCH ALL", url], capture_output=True, check=False, timeout=60
    )
    assert listing.returncode == 0, listing.stderr.decode()
    uids = listing.stdout.decode().split()[2:]
    assert len(uids) == len(kinds)
    fetched = []
    for uid in uids:
        r = subprocess.run(
            [*common, f"{url};UID={uid}"], capture_output=True, check=False, timeout=60
        )
        assert r.returncode == 0, r.stderr.decode()
        fetched.append(r.stdout)
    for name, raw in kinds.items():
        assert raw in fetched, name
        openssl_verify(raw, _signing_ca(dev_pki, tmp_path), tmp_path)
