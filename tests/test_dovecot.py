"""Dovecot 2.3 serving pecd's Maildir tree with the config pecd writes (pecd.dovecot).

A real ``dovecot -F -c <generated conf>`` on free loopback ports. Dovecot will not touch mail as
root ("userdb returned 0 as uid"), so the mail user is ``nobody``: the test installation lives in
a directory of its own under /tmp owned by nobody, and what pecd writes into it here (as root:
deliveries, pecd's IMAP) is handed over to nobody before Dovecot reads it, as if pecd ran as the
one user that owns the tree and that Dovecot's mail processes run as (the production setup).
Needs root and Dovecot; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import poplib
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from helpers import BackgroundService, free_ports, mbsyncrc
from pecd.clock import SystemClock
from pecd.config import Endpoint, ListenersConfig, load_config
from pecd.devinit import init_installation
from pecd.dovecot import MailUser, write_config
from pecd.imap import ImapService
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import MaildirStore
from pecd.pop3.protocol import uidl_of

DOMAIN = "pec.dovecot.test"
TIMEOUT = 10

pytestmark = [pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    base: Path
    conf: Path
    log: Path
    ca: Path
    tls_cert: Path
    tls_key: Path
    store: MaildirStore
    passwords: dict[str, str]
    imaps_port: int
    pop3s_port: int
    user: MailUser

    def handover(self) -> None:
        """Give the files pecd (running here as root) wrote to the mail user, as if pecd ran
        as that user. (Acting as the user with seteuid does not work here: the interpreter
        lives under /root, which the user cannot read, and Python imports lazily.)"""
        root = self.store.root
        for path in [root, *root.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, self.user.uid, self.user.gid, follow_symlinks=False)

    @contextlib.contextmanager
    def pecd_side(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.handover()

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False
        return ctx

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL(
            "127.0.0.1", self.imaps_port, ssl_context=self.client_context(), timeout=TIMEOUT
        )

    @contextlib.contextmanager
    def dovecot_imap(self, address: str) -> Iterator[imaplib.IMAP4_SSL]:
        self.handover()
        client = self.imaps()
        try:
            client.login(address, self.passwords[address])
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def pop3s(self) -> poplib.POP3_SSL:
        self.handover()
        return poplib.POP3_SSL(
            "127.0.0.1", self.pop3s_port, context=self.client_context(), timeout=TIMEOUT
        )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"dovecot exited: {log.read_text() if log.exists() else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        threading.Event().wait(0.05)
    raise RuntimeError(f"dovecot is not listening on {port}")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if shutil.which("dovecot") is None:
        pytest.skip("Dovecot is not installed")
    if os.geteuid() != 0:
        pytest.skip("starting Dovecot needs root")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    user = MailUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    base = Path(tempfile.mkdtemp(prefix="pecd-dovecot-", dir="/tmp"))
    base.chmod(0o755)
    try:
        inst = base / "inst"
        result = asyncio.run(
            init_installation(inst, domain=DOMAIN, name="Dovecot Test PEC", clock=SystemClock())
        )
        cfg = load_config(result.config)
        imaps_port, pop3s_port = free_ports(2)
        cfg = cfg.model_copy(
            update={
                "listeners": ListenersConfig(
                    imaps=Endpoint(host="127.0.0.1", port=imaps_port),
                    pop3s=Endpoint(host="127.0.0.1", port=pop3s_port),
                )
            }
        )
        files = write_config(cfg, inst / "dovecot", mail_user=user)
        cfg.maildir_root.mkdir(parents=True, exist_ok=True)
        # The data directory (database, Maildir tree) belongs to the mail user.
        for path in [cfg.storage.data_dir, *cfg.storage.data_dir.rglob("*")]:
            os.chown(path, user.uid, user.gid)
        proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(files.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_listening(imaps_port, proc, files.log)
            _wait_listening(pop3s_port, proc, files.log)
            yield Env(
                base=base,
                conf=files.conf,
                log=files.log,
                ca=cfg.tls.ca or cfg.tls.cert,
                tls_cert=cfg.tls.cert,
                tls_key=cfg.tls.key,
                store=MaildirStore(cfg.maildir_root),
                passwords=result.mailboxes,
                imaps_port=imaps_port,
                pop3s_port=pop3s_port,
                user=user,
            )
        finally:
            subprocess.run(
                ["doveadm", "-c", str(files.conf), "stop"], capture_output=True, check=False
            )
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def signed_receipt(env: Env) -> bytes:
    """A signed accettazione built by pecd.pec (S/MIME over CRLF bytes)."""
    from pecd.pec import builders as b
    from pecd.pec.builders import ProviderIdentity, Transmission
    from pecd.pec.smime import KeySigner
    from pecd.pec.timefmt import pec_time

    pki = env.base / "inst" / "pki"
    signer = KeySigner.from_pem(
        (pki / "signing.key").read_bytes(), (pki / "signing.pem").read_bytes()
    )
    provider = ProviderIdentity(
        name="Dovecot Test PEC",
        domain=DOMAIN,
        service_address=f"posta-certificata@{DOMAIN}",
        signer=signer,
        digest="sha256",
    )
    original = (
        f"From: Alice <alice@{DOMAIN}>\r\nTo: bob@{DOMAIN}\r\nSubject: Prova\r\n"
        f"Message-ID: <t1@alice>\r\n\r\n" + "Corpo del messaggio, riga lunga. " * 120 + "\r\n"
    ).encode()
    tx = Transmission.from_submission(
        original,
        mail_from=f"alice@{DOMAIN}",
        rcpt_to=[f"bob@{DOMAIN}"],
        identificativo=f"pecd.20260302101530.0123456789abcdef@{DOMAIN}",
        is_certified=lambda _a: True,
    )
    return b.accettazione(tx, provider, pec_time(datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC))).raw


def openssl_verify(env: Env, raw: bytes) -> None:
    path = env.base / f"verify-{os.getpid()}.eml"
    path.write_bytes(raw)
    try:
        r = subprocess.run(
            ["openssl", "cms", "-verify", "-noverify", "-inform", "SMIME", "-in", str(path)],
            capture_output=True,
            check=False,
        )
    finally:
        path.unlink()
    assert r.returncode == 0, r.stderr.decode()


def fetch_all(client: imaplib.IMAP4, mailbox: str = "INBOX") -> tuple[int, dict[int, bytes]]:
    """UIDVALIDITY and UID -> BODY.PEEK[] of every message of ``mailbox``."""
    typ, _ = client.select(f'"{mailbox}"')
    assert typ == "OK"
    typ, data = client.response("UIDVALIDITY")
    validity = int(data[0])
    typ, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    assert typ == "OK", data
    out: dict[int, bytes] = {}
    for item in data:
        if isinstance(item, tuple):
            m = re.search(rb"UID (\d+)", item[0])
            assert m, item[0]
            out[int(m.group(1))] = item[1]
    client.close()
    return validity, out


# -- the tests ------------------------------------------------------------------------------------


def test_config_decisions(env: Env) -> None:
    text = env.conf.read_text()
    assert "mail_location = maildir:" in text and "/%Ld/%Ln" in text
    assert "ssl = required" in text and "disable_plaintext_auth = yes" in text
    assert "pop3_uidl_format = %08Xu%08Xv" in text
    sql = (env.conf.parent / "sql.conf.ext").read_text()
    assert "driver = sqlite" in sql and "'{ARGON2ID}' || password_hash" in sql


def test_login_with_the_pecd_password(env: Env) -> None:
    address = f"alice@{DOMAIN}"
    client = env.imaps()
    try:
        typ, _ = client.login(address, env.passwords[address])
        assert typ == "OK"
    finally:
        client.logout()
    client = env.imaps()
    try:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(address, env.passwords[address] + "x")
        with pytest.raises(imaplib.IMAP4.error):
            client.login(f"nobody@{DOMAIN}", "whatever")
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def test_signed_receipt_served_byte_exact_over_imaps_and_pop3s(
    env: Env, signed_receipt: bytes
) -> None:
    address = f"bob@{DOMAIN}"
    with env.pecd_side():
        env.store.deliver(address, "receipt-1", signed_receipt)
    openssl_verify(env, signed_receipt)
    with env.dovecot_imap(address) as client:
        _validity, messages = fetch_all(client)
    assert list(messages.values()) == [signed_receipt]
    openssl_verify(env, messages[min(messages)])
    pop = env.pop3s()
    try:
        pop.user(address)
        pop.pass_(env.passwords[address])
        _resp, lines, _octets = pop.retr(1)
        _resp, listing, _ = pop.list()
        uidl = pop.uidl(1)
    finally:
        pop.quit()
    body = b"\r\n".join(lines) + b"\r\n"
    assert body == signed_receipt
    assert listing[0] == f"1 {len(signed_receipt)}".encode()
    # Dovecot's %08Xu%08Xv: UID then UIDVALIDITY, 8 hex digits each, in lowercase; pecd's
    # own POP3 gives the same UIDL for the same message, so clients can move between them.
    folder = env.store.folder_path(address)
    listing_now = uidlist.read(folder)
    assert listing_now is not None
    entry = listing_now.entries[0]
    assert uidl.split()[-1].decode() == f"{entry.uid:08x}{listing_now.uid_validity:08x}"
    assert uidl.split()[-1].decode() == uidl_of(entry.uid, listing_now.uid_validity)


def test_pop3_wrong_password_fails(env: Env) -> None:
    pop = env.pop3s()
    try:
        pop.user(f"alice@{DOMAIN}")
        with pytest.raises(poplib.error_proto):
            pop.pass_("not the password")
    finally:
        with contextlib.suppress(Exception):
            pop.quit()


# -- one tree, two IMAP servers -------------------------------------------------------------------


class FakeAccounts:
    """pecd's IMAP side logs in with the same passwords (pecd's Accounts is tested elsewhere)."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords

    async def authenticate(self, address: str, password: str) -> str | None:
        canonical = address.strip().lower()
        return canonical if self.passwords.get(canonical) == password else None


class PecdImap(BackgroundService[ImapService]):
    """pecd.imap.ImapService over the same Maildir tree, in a background event loop."""

    def __init__(self, env: Env) -> None:
        self.env = env
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(env.tls_cert, env.tls_key)
        service = ImapService(
            store=env.store,
            auth=FakeAccounts(env.passwords),
            tls_context=ctx,
            host="127.0.0.1",
            port=0,
            hostname="localhost",
            failed_login_delay=0.0,
        )
        super().__init__(service)

    def __enter__(self) -> PecdImap:
        super().__enter__()
        self.port = self.service.bound_ports[0]
        return self

    @contextlib.contextmanager
    def login(self, address: str) -> Iterator[imaplib.IMAP4_SSL]:
        client = imaplib.IMAP4_SSL(
            "127.0.0.1", self.port, ssl_context=self.env.client_context(), timeout=TIMEOUT
        )
        try:
            client.login(address, self.env.passwords[address])
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()


@pytest.fixture(scope="module")
def pecd_imap(env: Env) -> Iterator[PecdImap]:
    with PecdImap(env) as srv:
        yield srv


def text_message(n: int) -> bytes:
    return (
        f"From: a@{DOMAIN}\r\nTo: b@{DOMAIN}\r\nSubject: messaggio {n}\r\n"
        f"Message-ID: <n{n}@test>\r\n\r\n" + f"corpo {n}\r\n" * (n + 1)
    ).encode()


def append(client: imaplib.IMAP4, mailbox: str, data: bytes) -> None:
    typ, resp = client.append(f'"{mailbox}"', "", None, data)
    assert typ == "OK", resp


def test_folder_made_by_dovecot_keeps_uids_and_bytes_under_pecd_imap(
    env: Env, pecd_imap: PecdImap, signed_receipt: bytes
) -> None:
    address = f"alice@{DOMAIN}"
    with env.pecd_side():
        for i in range(3):
            env.store.deliver(address, f"cross-{i}", text_message(i))
        with env.dovecot_imap(address) as dc:
            assert dc.create('"Archivio"')[0] == "OK"
            for i in range(5):
                append(dc, "Archivio", text_message(10 + i))
            append(dc, "Archivio", signed_receipt)
            # Expunge two in the middle and the last plain one: gaps, and N above a UID gone.
            dc.select('"Archivio"')
            dc.uid("STORE", "2,3,5", "+FLAGS.SILENT", "(\\Deleted)")
            dc.expunge()
            dc.close()
            before = {box: fetch_all(dc, box) for box in ("INBOX", "Archivio")}
        with pecd_imap.login(address) as pc:
            seen = {box: fetch_all(pc, box) for box in ("INBOX", "Archivio")}
            assert seen == before
            append(pc, "Archivio", text_message(99))
            after_pecd = fetch_all(pc, "Archivio")
        with env.dovecot_imap(address) as dc:
            after_dovecot = fetch_all(dc, "Archivio")
    assert after_pecd == after_dovecot
    validity, msgs = after_dovecot
    assert validity == before["Archivio"][0]
    new_uid = max(msgs)
    assert new_uid > max(before["Archivio"][1]) and msgs[new_uid] == text_message(99)
    assert {u: b for u, b in msgs.items() if u != new_uid} == before["Archivio"][1]
    receipt_uid = [u for u, b in msgs.items() if b == signed_receipt]
    assert len(receipt_uid) == 1
    openssl_verify(env, msgs[receipt_uid[0]])


def test_folder_made_by_pecd_is_read_the_same_by_dovecot(
    env: Env, pecd_imap: PecdImap, signed_receipt: bytes
) -> None:
    address = f"ricevute@{DOMAIN}"
    with env.pecd_side():
        env.store.deliver(address, "r-1", signed_receipt)
        env.store.deliver(address, "r-2", text_message(1))
        with pecd_imap.login(address) as pc:
            assert pc.create('"Pratiche/2026"')[0] == "OK"
            for i in range(4):
                append(pc, "Pratiche/2026", text_message(20 + i))
            pc.select('"Pratiche/2026"')
            pc.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
            pc.expunge()
            pc.close()
            made = {box: fetch_all(pc, box) for box in ("INBOX", "Pratiche/2026")}
        with env.dovecot_imap(address) as dc:
            seen = {box: fetch_all(dc, box) for box in ("INBOX", "Pratiche/2026")}
            # And a message Dovecot adds is numbered after pecd's.
            append(dc, "Pratiche/2026", text_message(30))
            after = fetch_all(dc, "Pratiche/2026")
        with pecd_imap.login(address) as pc:
            assert fetch_all(pc, "Pratiche/2026") == after
    assert seen == made
    assert list(made["INBOX"][1].values()) == [signed_receipt, text_message(1)]
    assert max(after[1]) > max(made["Pratiche/2026"][1])


def test_dovecot_list_with_next_uid_above_listed_uids_keeps_uids(
    env: Env, pecd_imap: PecdImap
) -> None:
    """The known defect: a Dovecot-written list whose N header is above every UID listed (the
    last messages were expunged), then a new delivery; pymap renumbered and served another
    message's bytes under an old UID."""
    address = f"bob@{DOMAIN}"
    with env.pecd_side():
        with env.dovecot_imap(address) as dc:
            dc.create('"Ricevute"')
            for i in range(6):
                append(dc, "Ricevute", text_message(40 + i))
            dc.select('"Ricevute"')
            dc.uid("STORE", "4:6", "+FLAGS.SILENT", "(\\Deleted)")
            dc.expunge()
            dc.close()
            before = fetch_all(dc, "Ricevute")
        folder = env.store.folder_path(address, "Ricevute")
        header = (folder / uidlist.FILE_NAME).read_text().splitlines()[0]
        assert " N7 " in header + " "
        assert sorted(before[1]) == [1, 2, 3]
        env.store.deliver(address, "late", text_message(50), folder="Ricevute")
        with pecd_imap.login(address) as pc:
            seen = fetch_all(pc, "Ricevute")
        with env.dovecot_imap(address) as dc:
            again = fetch_all(dc, "Ricevute")
    assert seen == again
    assert seen[0] == before[0]
    assert {u: b for u, b in seen[1].items() if u <= 3} == before[1]
    assert seen[1][7] == text_message(50)


# -- the config without a server ------------------------------------------------------------------


def test_init_with_dovecot_and_postgresql_passdb(tmp_path: Path) -> None:
    from pecd.dovecot import lookup_mail_user, render

    if os.geteuid() == 0:
        with pytest.raises(ValueError, match="root"):
            lookup_mail_user(None)
    user = lookup_mail_user("nobody")
    result = asyncio.run(
        init_installation(
            tmp_path / "i",
            domain=DOMAIN,
            name="T",
            clock=SystemClock(),
            demo=False,
            mailbox_server="dovecot",
            mail_user="nobody",
        )
    )
    cfg = load_config(result.config)
    assert cfg.mailbox.server == "dovecot"
    conf = (tmp_path / "i" / "dovecot" / "dovecot.conf").read_text()
    assert f"mail_uid = {user.uid}" in conf and "user = nobody" in conf
    assert f"port = {cfg.listeners.imaps.port}" in conf if cfg.listeners.imaps else False
    pg = cfg.model_copy(
        update={
            "storage": cfg.storage.model_copy(
                update={"database_url": "postgresql://pecd:s3cr'et@127.0.0.1:5432/pecd"}
            )
        }
    )
    sql = render(pg, tmp_path / "d", mail_user=user)["sql.conf.ext"]
    assert "driver = pgsql" in sql
    assert "connect = host='127.0.0.1' port='5432' dbname='pecd' user='pecd'" in sql
    assert "password='s3cr\\'et'" in sql


# -- third-party clients against Dovecot --------------------------------------------------------


def _uid_of(env: Env, address: str, data: bytes) -> int:
    with env.dovecot_imap(address) as dc:
        _validity, msgs = fetch_all(dc)
    found = [uid for uid, body in msgs.items() if body == data]
    assert len(found) == 1
    return found[0]


def test_curl_imaps_reads_the_receipt_byte_exact(env: Env, signed_receipt: bytes) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    address = f"bob@{DOMAIN}"
    with env.pecd_side():
        env.store.deliver(address, "curl-1", signed_receipt)
    uid = _uid_of(env, address, signed_receipt)
    r = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--cacert",
            str(env.ca),
            "--user",
            f"{address}:{env.passwords[address]}",
            f"imaps://localhost:{env.imaps_port}/INBOX;UID={uid}",
        ],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == signed_receipt


def test_mbsync_over_imaps(env: Env, signed_receipt: bytes) -> None:
    if shutil.which("mbsync") is None:
        pytest.skip("mbsync is not installed")
    address = f"ricevute@{DOMAIN}"
    with env.pecd_side():
        env.store.deliver(address, "mbsync-1", signed_receipt)
    local = env.base / "mbsync"
    local.mkdir()
    rc = env.base / "mbsyncrc"
    rc.write_text(
        mbsyncrc(
            port=env.imaps_port,
            user=address,
            password=env.passwords[address],
            ca=env.ca,
            local=local,
            patterns="INBOX",
        )
    )
    r = subprocess.run(
        ["mbsync", "-c", str(rc), "-a"], capture_output=True, check=False, timeout=60
    )
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    got = [p.read_bytes() for sub in ("new", "cur") for p in (local / "INBOX" / sub).iterdir()]
    # mbsync stores Maildir files with LF line ends and may add its X-TUID: header line; the
    # bytes are otherwise the same, and the signature still verifies.
    got = [re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", g) for g in got]
    lf = signed_receipt.replace(b"\r\n", b"\n")
    assert lf in got
    openssl_verify(env, lf)
