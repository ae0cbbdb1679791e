"""The one support module of the tests: every helper and shared fixture a test module uses from
elsewhere lives here (test modules never import each other, nor conftest).

What is here: the test PKI's constants and the real-message corpus; waiting on a condition with
a deadline (``wait_for``, ``wait_for_async``); pecd as a separate process (``python -m pecd
serve -c FILE``) and its memory; pecd's App or one of its services in a background event loop;
installations and clients for end-to-end tests; a throwaway TLS PKI and an IMAP server over a
Maildir; every PEC message kind; the configuration of stock clients (mbsync)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import imaplib
import ipaddress
import itertools
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from pecd.clock import Clock, SystemClock
from pecd.mailbox.maildir import MaildirStore

if TYPE_CHECKING:
    from pecd.app import App
    from pecd.config import Config
    from pecd.imap import ImapService  # noqa: F401 (a quoted type argument below)
    from pecd.pec.pki import DevPki

# Most of pecd (the App, IMAP, the store, the builders) is imported where it is used: conftest
# imports this module, and a run of the format tests need not load all of pecd.

DOMAIN = "pec.example.test"
PASSWORD = "correct horse battery"

# --- the test PKI and the real-message corpus ------------------------------------------------

PKI_DOMAIN = "pec.example.test"
PKI_NAME = "Example PEC S.p.A."
PKI_NOW = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
# Real messages from real providers, kept in the repository (MANIFEST.tsv names each public
# source), so that a fresh clone needs nothing beside it.
CORPUS_DIR = Path(__file__).resolve().parent / "data" / "pec-real"


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    """MANIFEST.tsv as one dict per row, keyed by the header line's column names."""
    lines = (corpus / "MANIFEST.tsv").read_text("utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


def openssl() -> str:
    path = shutil.which("openssl")
    assert path, "openssl is needed by these tests"
    return path


# --- waiting on a condition ----------------------------------------------------------------------

T = TypeVar("T")


def wait_for(
    pred: Callable[[], T], timeout: float = 30.0, what: str = "condition", interval: float = 0.1
) -> T:
    """Poll ``pred`` every ``interval`` s until it returns something true, and return that; fail
    the test if it has not within ``timeout`` s (a deadline, not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


async def wait_for_async(
    pred: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.005
) -> T:
    """:func:`wait_for` inside an event loop: other tasks run while it polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` different free ports: each held open until all are chosen (two calls of
    :func:`free_port` may get the same port once the first socket is closed: a CI run's
    `pecd serve` then found its IMAP port taken by its own submission listener)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def install(
    directory: Path,
    db_url: str | None,
    *,
    extra_config: str = "\n[queue]\nbase_delay_seconds = 0.2\nlease_seconds = 3\n",
) -> Config:
    """A fresh installation in ``directory`` with mailboxes alice, bob and carol (password
    PASSWORD) on free loopback ports; ``extra_config`` is appended to the config file."""
    from pecd.config import load_config
    from pecd.devinit import config_text, init_installation
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database, migrate_async

    await init_installation(
        directory, domain=DOMAIN, name="Example PEC S.p.A.", clock=SystemClock(), demo=False
    )
    smtps, submission, imaps = free_ports(3)
    ports = {"smtps": smtps, "submission": submission, "imaps": imaps}
    text = config_text(domain=DOMAIN, name="Example PEC S.p.A.", ports=ports)
    if db_url:
        text = text.replace('data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{db_url}"')
    (directory / "pecd.toml").write_text(text + extra_config, "utf-8")
    cfg = load_config(directory / "pecd.toml")
    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    try:
        acc = Accounts(db)
        if db_url:
            await acc.add_domain(DOMAIN)
            await acc.add_mailbox(cfg.provider.mail_receipt, PASSWORD)
        for user in ("alice", "bob", "carol"):
            await acc.add_mailbox(f"{user}@{DOMAIN}", PASSWORD)
    finally:
        await db.close()
    return cfg


def start(cfg: Config, log: Path) -> subprocess.Popen[bytes]:
    """Start `pecd serve` on ``cfg``, output appended to ``log``; return once SMTPS listens."""
    assert cfg.source is not None and cfg.listeners.smtps is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "pecd", "serve", "-c", str(cfg.source)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    port = cfg.listeners.smtps.port

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"pecd exited: {log.read_text()[-3000:]}") from None
            return False

    wait_for(listening, 30, "pecd listening on SMTPS", interval=0.05)
    return proc


# --- memory of a running process (Linux /proc) ---------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (pecd's format worker processes, among others)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for c in (task / "children").read_text().split():
                    found.append(int(c))
                    todo.append(int(c))
    return found


class RssSampler:
    """Samples VmRSS of a process and of its descendants in a thread, every ``interval`` s.

    ``peak`` is the largest VmRSS seen of the process itself, ``peak_children`` that of any one
    descendant, ``peak_total`` of the sum over the tree at one instant (all in KiB). ``hwm``
    reads the kernel's own high-water mark (VmHWM) of the process, which no sampling can miss.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_children = 0
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        own = proc_status_kib(self.pid, "VmRSS")
        kids = [proc_status_kib(c, "VmRSS") for c in children(self.pid)]
        self.peak = max(self.peak, own)
        self.peak_children = max(self.peak_children, *kids, 0)
        self.peak_total = max(self.peak_total, own + sum(kids))

    def hwm(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def reset_hwm(pid: int) -> None:
    """Reset the kernel's VmHWM of ``pid`` to its current RSS (Linux >= 4.0, same user)."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


# --- in-process: pecd's App or one service in a background event loop ------------------------


class Startable(Protocol):
    async def start(self, stack: contextlib.AsyncExitStack) -> None: ...


S = TypeVar("S", bound=Startable)


class BackgroundService(Generic[S]):
    """``service`` (``ImapService``, ``Pop3Service``) run by an event loop of its own in a daemon
    thread: ``with`` starts the loop and the service, leaving closes the service (its exit stack)
    and the loop."""

    def __init__(self, service: S) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stack = contextlib.AsyncExitStack()

    def __enter__(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(self.stack), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.stack.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class AppThread:
    """pecd's App in a background thread with its own event loop, as a real client sees it."""

    def __init__(self, cfg: Config, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.loop = asyncio.new_event_loop()
        self.app: App | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from pecd.app import App

        self._stop = asyncio.Event()
        try:
            async with App(self.cfg, clock=self.clock) as app:
                self.app = app
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def start(self) -> Self:
        self.thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run ``coro`` on the App's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, name: str) -> int:
        assert self.app is not None
        if name == "reception":
            assert self.app.reception is not None
            return self.app.reception.port
        if name in ("imaps", "imap", "pop3s", "pop3"):
            assert self.app.mailboxes is not None
            return self.app.mailboxes.port(name)
        assert self.app.access is not None
        return self.app.access.port(name)


# --- end to end in one process: an installation, its clients -------------------------------------


async def install_e2e(
    directory: Path, postgres_url: str | None, extra: str = "", queue: str = ""
) -> Config:
    """An installation for an in-process App (:class:`AppThread`), ports chosen at bind time,
    mailboxes alice, bob, carol and dan (disabled), password PASSWORD. ``queue`` adds lines to
    its [queue] section, ``extra`` sections."""
    from pecd.config import load_config
    from pecd.devinit import config_text, init_installation
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database, migrate_async

    await init_installation(
        directory, domain=DOMAIN, name="Example PEC S.p.A.", clock=SystemClock(), demo=False
    )
    text = config_text(
        domain=DOMAIN, name="Example PEC S.p.A.", ports={"smtps": 0, "submission": 0, "imaps": 0}
    )
    if postgres_url:
        text = text.replace(
            'data_dir = "data"', f'data_dir = "data"\ndatabase_url = "{postgres_url}"'
        )
    text += f"\n[queue]\nbase_delay_seconds = 0.2\n{queue}\n"
    text += '\n[limits]\nmax_recipients = 50\nmax_recipients_times_size = "30M"\n' + extra
    (directory / "pecd.toml").write_text(text, "utf-8")
    cfg = load_config(directory / "pecd.toml")
    if postgres_url:
        await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    acc = Accounts(db)
    if postgres_url:
        # init wrote the domain and the service mailbox into the SQLite file it created.
        await acc.add_domain(DOMAIN)
        await acc.add_mailbox(cfg.provider.mail_receipt, PASSWORD)
    else:
        await acc.set_password(cfg.provider.mail_receipt, PASSWORD)
    try:
        for user in ("alice", "bob", "carol", "dan"):
            await acc.add_mailbox(f"{user}@{DOMAIN}", PASSWORD)
        await acc.disable(f"dan@{DOMAIN}")
    finally:
        await db.close()
    return cfg


def client_tls(cfg: Config) -> ssl.SSLContext:
    assert cfg.tls.ca is not None
    return ssl.create_default_context(cafile=str(cfg.tls.ca))


def message(
    frm: str, to: list[str], cc: list[str], subject: str, extra: str = "", pad: int = 0
) -> bytes:
    """A plain submission as a mail client writes it (``pad`` bytes of filler lines)."""
    lines = [
        f"From: {frm}",
        "To: " + ",\r\n ".join(to),  # folded, as clients do
        *([f"Cc: {', '.join(cc)}"] if cc else []),
        f"Subject: {subject}",
        "Message-ID: <test-" + subject.replace(" ", "-") + "@client.example>",
        "Date: Tue, 24 Nov 2026 10:00:00 +0100",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        *([extra] if extra else []),
        "",
        "Buongiorno, questo è un messaggio di posta certificata.",
        *(["x" * 76] * (pad // 78)),
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def fetched_literal(data: list[Any]) -> bytes:
    """The message of an imaplib FETCH answer. imaplib also returns the unsolicited FETCH
    responses it collected (a flag change of another message, sent as plain bytes), and they
    can come first: the message is the one (head, literal) pair."""
    for item in data:
        if isinstance(item, tuple):
            return bytes(item[1])
    raise AssertionError(f"no message literal in {data!r}")


def fetch_all(srv: AppThread, user: str) -> list[bytes]:
    with imaplib.IMAP4_SSL("127.0.0.1", srv.port("imaps"), ssl_context=client_tls(srv.cfg)) as imap:
        imap.login(f"{user}@{DOMAIN}", PASSWORD)
        imap.select("INBOX")
        typ, data = imap.search(None, "ALL")
        assert typ == "OK"
        out = []
        for num in data[0].split():
            typ, msg = imap.fetch(num, "(BODY.PEEK[])")
            assert typ == "OK"
            out.append(fetched_literal(msg))
        return out


def pending_jobs(srv: AppThread, except_kinds: Sequence[str] = ()) -> list[str]:
    """The kinds of the jobs of ``srv`` still to be done (ready or running), but for
    ``except_kinds`` (say, relays to a peer that is down and keeps being retried)."""
    from pecd.store import jobs

    assert srv.app is not None and srv.app.runner is not None
    svc = srv.app.runner

    async def query() -> list[str]:
        async with svc.db.read_session() as s:
            found = await jobs.list_jobs(s, states=[jobs.READY, jobs.RUNNING], limit=1000)
            return [j.kind for j in found if j.kind not in except_kinds]

    return list(srv.call(query()))


def wait_settled(
    *servers: AppThread, except_kinds: Sequence[str] = (), timeout: float = 30.0
) -> None:
    """Wait until no job is left to do on any of ``servers``: whatever their work would still
    send or deliver is there. Two passes over all of them, so that a job one provider finishes
    between two looks (say, a receipt relayed to the other) is seen as the other's new job."""
    wait_for(
        lambda: not any(pending_jobs(s, except_kinds) for s in (*servers, *servers)),
        timeout,
        "every job done",
        interval=0.05,
    )


# --- every message pecd emits --------------------------------------------------------------------

#: When every message of :func:`every_kind` is dated.
WHEN_INSTANT = datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC)
#: A submission with lines that start with a dot (POP3 and SMTP dot-stuffing) and an attachment.
ORIGINAL = (
    b"Date: Mon, 02 Mar 2026 10:15:00 +0100\r\n"
    b"From: Alice Rossi <alice@pec.example.test>\r\n"
    b"To: Bob <bob@pec.example.test>\r\n"
    b"Cc: carol@pec.example.test\r\n"
    b"Subject: Fattura n. 12\r\n"
    b"Message-ID: <client-42@alice.laptop>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
    b"--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nCiao Bob.\r\n.\r\n.. dots\r\n"
    b'--XYZ\r\nContent-Type: application/pdf; name="f.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r\n--XYZ--\r\n"
)


def every_kind(
    dev_pki: DevPki,
    original: bytes = ORIGINAL,
    rcpt_to: Sequence[str] = ("bob@pec.example.test", "carol@pec.example.test"),
) -> dict[str, bytes]:
    """Every kind of message pecd emits (name -> bytes, CRLF as built) about the submission
    ``original`` from alice@pec.example.test to ``rcpt_to``, signed with the test PKI."""
    from pecd.pec import builders as b
    from pecd.pec.builders import ProviderIdentity, Transmission
    from pecd.pec.checks import Violation
    from pecd.pec.smime import KeySigner
    from pecd.pec.timefmt import pec_time
    from pecd.pec.vocab import Errore, TipoRicevuta

    when = pec_time(WHEN_INSTANT)
    signer = KeySigner.from_pem(dev_pki.signing.key_pem, dev_pki.signing.cert_pem)
    provider = ProviderIdentity(
        name="Example PEC S.p.A.",
        domain=DOMAIN,
        service_address=f"posta-certificata@{DOMAIN}",
        signer=signer,
    )
    tx = Transmission.from_submission(
        original,
        mail_from="alice@pec.example.test",
        rcpt_to=list(rcpt_to),
        identificativo="pecd.20260302101530.0123456789abcdef@pec.example.test",
        is_certified=lambda _: True,
    )
    postacert = b.postacert_of(original, tx.identificativo, tx.msgid)
    bob = "bob@pec.example.test"
    v = Violation("bcc-present", "Il campo Bcc non è ammesso", "Bcc is not allowed")
    built = {
        "busta-di-trasporto": b.transport_envelope(original, tx, provider, when),
        "accettazione": b.accettazione(tx, provider, when),
        "non-accettazione": b.non_accettazione(tx, provider, when, violations=[v]),
        "non-accettazione-virus": b.non_accettazione(tx, provider, when, virus="Eicar"),
        "presa-in-carico": b.presa_in_carico(
            tx, provider, when, ricezione=[bob], mail_receipt="ricevute@pec.sender.test"
        ),
        **{
            f"avvenuta-consegna-{kind.value}": b.avvenuta_consegna(
                tx, provider, when, recipient=bob, postacert=postacert, kind=kind
            )
            for kind in (TipoRicevuta.COMPLETA, TipoRicevuta.BREVE, TipoRicevuta.SINTETICA)
        },
        "errore-consegna": b.errore_consegna(
            tx,
            provider,
            when,
            recipient="nobody@pec.example.test",
            errore=Errore.NO_DEST,
            errore_esteso="5.1.1 - indirizzo non valido",
        ),
        **{
            f"preavviso-{hours}h": b.preavviso_errore_consegna(
                tx,
                provider,
                when,
                recipient=bob,
                sent=pec_time(when.instant - timedelta(hours=hours)),
                final=hours == 24,
            )
            for hours in (12, 24)
        },
        "rilevazione-virus": b.rilevazione_virus(
            tx,
            provider,
            when,
            recipient=bob,
            errore_esteso="virus Eicar",
            mail_receipt="ricevute@pec.sender.test",
        ),
        "busta-di-anomalia": b.anomaly_envelope(
            original, provider, when, rcpt_to=[bob], error="firma non valida"
        ),
    }
    return {name: m.raw for name, m in built.items()}


def openssl_verify(
    raw: bytes, ca_file: Path, tmp_path: Path, at: dt.datetime | None = None
) -> None:
    """``openssl cms -verify`` accepts the S/MIME signature of ``raw`` against ``ca_file``
    (checking the certificates as of ``at`` when given)."""
    msg = tmp_path / "verified.eml"
    msg.write_bytes(raw)
    attime = ("-attime", str(int(at.timestamp()))) if at is not None else ()
    r = subprocess.run(
        [
            *("openssl", "cms", "-verify", "-inform", "SMIME", "-in", str(msg)),
            *("-CAfile", str(ca_file), "-purpose", "any", "-out", "/dev/null"),
            *attime,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


# --- a throwaway TLS PKI, an IMAP server over a Maildir ------------------------------------------

IMAP_TIMEOUT = 10


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate for localhost / 127.0.0.1 (RSA 2048)."""
    now = dt.datetime.now(dt.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("pecd test CA"))
        .issuer_name(name("pecd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


class Authenticates(Protocol):
    passwords: dict[str, str]

    async def authenticate(self, address: str, password: str) -> str | None: ...


class FakeAccounts:
    """Authenticator over a dict of address -> password."""

    def __init__(self) -> None:
        self.passwords: dict[str, str] = {}

    async def authenticate(self, address: str, password: str) -> str | None:
        canonical = address.strip().lower()
        if password == "db-down":
            raise ConnectionError("database unreachable")
        if self.passwords.get(canonical) == password:
            return canonical
        return None


class ImapServer(BackgroundService["ImapService"]):
    """ImapService on loopback (IMAPS and IMAP+STARTTLS) over ``store``, logins checked by
    ``accounts``; ``new_user`` makes a fresh account."""

    def __init__(
        self, store: MaildirStore, accounts: Authenticates, pki: Pki, **options: Any
    ) -> None:
        """``accounts``: FakeAccounts or any other authenticator; ``options``: more keyword
        arguments for ImapService (limits, guard, ...)."""
        from pecd.imap import ImapService

        self.store = store
        self.accounts = accounts
        self.pki = pki
        service = ImapService(
            store=store,
            auth=accounts,
            tls_context=pki.server_context(),
            host="127.0.0.1",
            port=0,
            starttls_port=0,
            hostname="localhost",
            failed_login_delay=0.0,
            **options,
        )
        super().__init__(service)
        self._users = itertools.count(1)

    def __enter__(self) -> ImapServer:
        super().__enter__()
        self.imaps_port, self.imap_port = self.service.bound_ports
        return self

    def new_user(self) -> tuple[str, str]:
        n = next(self._users)
        address, password = f"user{n}@example.org", f"secret-{n}"
        self.accounts.passwords[address] = password
        return address, password

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL(
            "localhost",
            self.imaps_port,
            ssl_context=self.pki.client_context(),
            timeout=IMAP_TIMEOUT,
        )

    @contextlib.contextmanager
    def logged_in(self, address: str, password: str) -> Iterator[imaplib.IMAP4_SSL]:
        client = self.imaps()
        try:
            client.login(address, password)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()


@pytest.fixture(scope="module", name="pki")
def pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A module's throwaway PKI (import it as a fixture: ``pki``)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", name="server")
def imap_server_fixture(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ImapServer]:
    """A module's :class:`ImapServer` (import it as a fixture: ``server``)."""
    base = tmp_path_factory.mktemp("imap")
    with ImapServer(MaildirStore(base / "mail"), FakeAccounts(), pki) as srv:
        yield srv


#: A small CRLF message with a folded header.
PLAIN_CRLF = (
    b"From: Anna <anna@example.org>\r\n"
    b"To: holder@example.org\r\n"
    b"Subject: Riunione di domani\r\n"
    b"Message-ID: <m3@example.org>\r\n"
    b"Date: Thu, 15 Jan 2026 11:00:00 +0100\r\n"
    b"X-Folded: a header value that is\r\n"
    b"\tfolded on purpose\r\n"
    b"\r\n"
    b"Ci vediamo alle 10.\r\n"
)


# --- stock clients -------------------------------------------------------------------------------


def mbsyncrc(*, port: int, user: str, password: str, ca: Path, local: Path, patterns: str) -> str:
    """An mbsync (isync) configuration: IMAPS on localhost:``port`` mirrored into the Maildir
    ``local`` (INBOX at ``local``/INBOX), the far folders matching ``patterns``."""
    return f"""IMAPAccount pecd
Host localhost
Port {port}
User {user}
Pass "{password}"
SSLType IMAPS
CertificateFile {ca}

IMAPStore far
Account pecd

MaildirStore near
Path {local}/
Inbox {local}/INBOX

Channel all
Far :far:
Near :near:
Patterns {patterns}
Create Near
SyncState *
"""


# --- settling: memory, the trace log ---------------------------------------------------------


def wait_rss_steady(
    pid: int,
    *,
    tolerance_kib: int = 1024,
    steady_for: float = 0.5,
    timeout: float = 30.0,
    interval: float = 0.05,
) -> int:
    """Wait until the VmRSS of ``pid`` and of each of its descendants (the same ones all along)
    has stayed within ``tolerance_kib`` of one reading for ``steady_for`` s, a start-up or a
    finished message settled, and return the process's own VmRSS then; fail the test if that
    has not happened within ``timeout`` s."""

    def reading() -> dict[int, int]:
        return {p: proc_status_kib(p, "VmRSS") for p in (pid, *children(pid))}

    deadline = time.monotonic() + timeout
    ref, since = reading(), time.monotonic()
    while True:
        time.sleep(interval)
        now = reading()
        if now.keys() != ref.keys() or any(abs(now[p] - ref[p]) > tolerance_kib for p in now):
            ref, since = now, time.monotonic()
        elif time.monotonic() - since >= steady_for:
            return now[pid]
        if time.monotonic() > deadline:
            raise AssertionError(f"VmRSS of {pid} and its children not steady within {timeout} s")


if TYPE_CHECKING:
    from pecd.store.db import Database


#: When the first event :func:`add_events` writes is dated (one more second for each next one).
EVENTS_T0 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)


async def add_events(d: Database, n: int, start: int = 0) -> None:
    """Append ``n`` accettazione events numbered from ``start`` to the trace log of the
    ``Database`` ``d``, in one transaction (the seal tests, and the sealing nodes they start)."""
    from pecd.store.trace import TraceEventData, record_sync

    events = [
        TraceEventData(
            at=EVENTS_T0 + timedelta(seconds=i),
            event="accettazione",
            pec_msgid=f"id{i}@pec.test",
            sender="alice@pec.test",
            recipients=[{"address": "bob@pec.test", "tipo": "certificato"}],
            subject=f"Oggetto {i} è qui",
            daticert={"tipo": "accettazione", "identificativo": f"id{i}@pec.test"},
        )
        for i in range(start, start + n)
    ]
    async with d.session() as s, s.begin():
        await s.run_sync(lambda sync: [record_sync(sync, e) for e in events])


# --- a real clamd (pecd.antivirus) --------------------------------------------------------------

#: The largest message the session's clamd is set up for (its StreamMaxLength is one MiB more).
CLAMD_MAX_SCAN_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class RunningClamd:
    """A clamd started for the test session, on the database pecd generates (EICAR and
    ``Pecd.Test.Signature``): its unix socket, its TCP port on 127.0.0.1, its files."""

    socket: Path
    port: int
    config: Path
    log_file: Path
    max_scan_size: int
    proc: subprocess.Popen[bytes]


def clamd_pong(sock: Path) -> bool:
    """True if a clamd answers PING on the unix socket ``sock``."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
    except OSError:
        return False


@pytest.fixture(scope="session", name="clamd")
def clamd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningClamd]:
    """The session's real clamd (import it as a fixture: ``clamd``); stopped at the end. A
    missing clamd is a failure, never a skip (scripts/setup installs it)."""
    from pecd.antivirus.clamd import clamd_binary, write_clamd

    program = clamd_binary()
    if program is None:
        pytest.fail("clamd is not installed: run scripts/setup (Debian: clamav-daemon)")
    port = free_port()
    files = write_clamd(
        tmp_path_factory.mktemp("clamd"), max_scan_size=CLAMD_MAX_SCAN_SIZE, tcp_port=port
    )
    proc = subprocess.Popen(
        [program, "-c", str(files.config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or clamd_pong(files.socket),
            timeout=60,
            what="clamd answering PING",
        )
        if proc.poll() is not None:
            log = files.log_file.read_text("utf-8", "replace") if files.log_file.exists() else ""
            pytest.fail(f"clamd exited with {proc.returncode}:\n{log[-2000:]}")
        yield RunningClamd(
            socket=files.socket,
            port=port,
            config=files.config,
            log_file=files.log_file,
            max_scan_size=CLAMD_MAX_SCAN_SIZE,
            proc=proc,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a real slapd holding the provider index (RFC 6109 schema) -----------------------------------

#: The RFC 6109 schema for OpenLDAP that pecd ships (spec section 8).
RFC6109_SCHEMA = Path(__file__).resolve().parents[1] / "config" / "rfc6109.schema"
LDAP_BASE_DN = "o=postacert"
LDAP_ADMIN_DN = "cn=admin,o=postacert"
LDAP_ADMIN_PASSWORD = "slapd admin secret"
#: A read-only account (simple bind) that the slapd fixture's ACL lets read the index.
LDAP_READER_DN = "cn=pecd,o=postacert"
LDAP_READER_PASSWORD = "pecd reader secret"


@dataclass
class Slapd:
    """Debian's slapd on loopback (``ldap://`` and ``ldaps://``), its own config and mdb database
    under a temporary directory; ``o=postacert`` and a reader account loaded, nothing else."""

    directory: Path
    port: int
    tls_port: int
    pki: Pki
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}/"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}/"

    def _run(self, tool: str, args: Sequence[str], ldif: str | None = None) -> str:
        proc = subprocess.run(
            [tool, "-x", "-H", self.url, "-D", LDAP_ADMIN_DN, "-w", LDAP_ADMIN_PASSWORD, *args],
            input=None if ldif is None else ldif.encode("utf-8"),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed: {proc.stderr.decode()[-2000:]}")
        return proc.stdout.decode("utf-8", "replace")

    def add(self, ldif: str) -> None:
        """Add the entries of ``ldif`` (``ldapadd``)."""
        self._run("ldapadd", [], ldif)

    def modify(self, ldif: str) -> None:
        """Apply an LDIF of changes (``ldapmodify``: ``changetype: modify``, ``add:``, …)."""
        self._run("ldapmodify", [], ldif)

    def delete(self, *dns: str) -> None:
        self._run("ldapdelete", list(dns))

    def providers(self) -> list[str]:
        """The DNs of every entry under the base but the base itself and the reader."""
        out = self._run("ldapsearch", ["-LLL", "-b", LDAP_BASE_DN, "(providerName=*)", "1.1"])
        return [line[4:] for line in out.splitlines() if line.startswith("dn: ")]

    def clear(self) -> None:
        """Remove every provider entry (deepest first), leaving the base and the reader."""
        for dn in sorted(self.providers(), key=lambda d: -d.count(",")):
            self.delete(dn)


def _slapd_conf(directory: Path, pki: Pki) -> str:
    return f"""\
include /etc/ldap/schema/core.schema
include {RFC6109_SCHEMA}
pidfile {directory / "slapd.pid"}
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {pki.ca_file}
TLSCertificateFile {pki.cert_file}
TLSCertificateKeyFile {pki.key_file}
database mdb
maxsize 67108864
suffix "{LDAP_BASE_DN}"
rootdn "{LDAP_ADMIN_DN}"
rootpw "{LDAP_ADMIN_PASSWORD}"
directory {directory / "db"}
access to attrs=userPassword by anonymous auth by * none
access to * by * read
"""


def _slapd_base_ldif() -> str:
    return f"""\
dn: {LDAP_BASE_DN}
objectClass: top
objectClass: organization
objectClass: LDIFLocationURLObject
o: postacert
LDIFLocationURL: https://igpec.rupa.example.com/igpec.ldif.p7m

dn: {LDAP_READER_DN}
objectClass: person
cn: pecd
sn: pecd
userPassword: {LDAP_READER_PASSWORD}
"""


def slapd_answers(url: str) -> bool:
    proc = subprocess.run(
        ["ldapsearch", "-x", "-H", url, "-b", LDAP_BASE_DN, "-s", "base", "-LLL", "1.1"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return proc.returncode == 0


@pytest.fixture(scope="session", name="slapd")
def slapd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One slapd for the session (import it as a fixture: ``slapd``); tests leave its provider
    entries as they like, so each starts with :meth:`Slapd.clear`."""
    for tool in ("/usr/sbin/slapd", "/usr/sbin/slapadd"):
        assert Path(tool).exists(), f"{tool} missing: run scripts/setup (Debian's slapd)"
    assert shutil.which("ldapadd"), "ldapadd missing: run scripts/setup (ldap-utils)"
    directory = tmp_path_factory.mktemp("slapd")
    (directory / "db").mkdir()
    (directory / "pki").mkdir()
    pki = make_pki(directory / "pki")
    conf = directory / "slapd.conf"
    conf.write_text(_slapd_conf(directory, pki), "utf-8")
    base = directory / "base.ldif"
    base.write_text(_slapd_base_ldif(), "utf-8")
    # Offline load of the base entries (slapadd), then the server on two free loopback ports.
    # slapd runs as whoever runs the tests (root in CI is fine: it needs no privileged port).
    added = subprocess.run(
        ["/usr/sbin/slapadd", "-f", str(conf), "-l", str(base)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if added.returncode != 0:
        pytest.fail(f"slapadd failed: {added.stderr.decode('utf-8', 'replace')[-2000:]}")
    port, tls_port = free_ports(2)
    log = (directory / "slapd.log").open("wb")
    proc = subprocess.Popen(
        [
            "/usr/sbin/slapd",
            "-d",
            "0",  # in the foreground, logging nothing but errors
            "-f",
            str(conf),
            "-h",
            f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Slapd(directory, port, tls_port, pki, proc)
    try:
        wait_for(
            lambda: proc.poll() is not None or slapd_answers(server.url),
            timeout=30,
            what="slapd answering",
        )
        if proc.poll() is not None:
            text = (directory / "slapd.log").read_text("utf-8", "replace")
            pytest.fail(f"slapd exited with {proc.returncode}:\n{text[-2000:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- two providers on loopback (test_two_providers, test_index_ldap) ----------------------------


@dataclass
class Provider:
    """One of two providers exchanging PEC on loopback: its domain, config, running server."""

    domain: str
    cfg: Config
    server: AppThread | None = None

    def addr(self, user: str) -> str:
        return f"{user}@{self.domain}"


async def install_provider(
    directory: Path,
    domain: str,
    name: str,
    ports: dict[str, int],
    other: str,
    index: str,
    users: Sequence[str] = ("alice", "bob", "carol", "dan"),
) -> None:
    """An installation of ``domain`` whose reception point listens on ``ports[domain]`` and whose
    relay reaches ``other`` at ``ports[other]`` (STARTTLS required, the peers' CAs in
    ``../peers-ca.pem``); ``index`` is the body of its [index] section. The config is read once
    both providers exist (the index may name files written from both signing certificates)."""
    from pecd.devinit import config_text, init_installation
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database

    await init_installation(directory, domain=domain, name=name, clock=SystemClock(), demo=False)
    text = config_text(
        domain=domain, name=name, ports={"smtps": 0, "submission": 0, "imaps": 0}
    ).replace('hostname = "localhost"', 'hostname = "localhost"\nreception = "127.0.0.1:%d"')
    text = text % ports[domain]
    text += f"""
[queue]
base_delay_seconds = 0.2
max_delay_seconds = 1
format_processes = 0

[relay]
starttls = "required"
ca_bundle = "../peers-ca.pem"
timeout_seconds = 30

[index]
{index}

[timers]
check_seconds = 3600

[routes]
"{other}" = "127.0.0.1:{ports[other]}"
"""
    (directory / "pecd.toml").write_text(text, "utf-8")
    db = await Database.open(f"sqlite:///{directory / 'data/pecd.db'}")
    try:
        acc = Accounts(db)
        await acc.set_password(f"ricevute@{domain}", PASSWORD)
        for user in users:
            await acc.add_mailbox(f"{user}@{domain}", PASSWORD)
    finally:
        await db.close()


def provider_tls(p: Provider) -> ssl.SSLContext:
    assert p.cfg.tls.ca is not None
    return ssl.create_default_context(cafile=str(p.cfg.tls.ca))


def provider_send(p: Provider, frm: str, to: list[str], cc: list[str], subject: str) -> None:
    """``frm`` submits a message to ``p``'s access point over SMTPS."""
    assert p.server is not None
    with smtplib.SMTP_SSL("127.0.0.1", p.server.port("smtps"), context=provider_tls(p)) as smtp:
        smtp.login(frm, PASSWORD)
        smtp.sendmail(frm, [*to, *cc], message(frm, to, cc, subject))


def provider_inbox(p: Provider, user: str) -> list[bytes]:
    """Every message in ``user``'s INBOX at ``p``, read over IMAPS."""
    assert p.server is not None
    ctx = provider_tls(p)
    with imaplib.IMAP4_SSL("127.0.0.1", p.server.port("imaps"), ssl_context=ctx) as imap:
        imap.login(p.addr(user), PASSWORD)
        imap.select("INBOX")
        _, data = imap.search(None, "ALL")
        out = []
        for num in data[0].split():
            _, msg = imap.fetch(num, "(BODY.PEEK[])")
            out.append(fetched_literal(msg))
        return out
