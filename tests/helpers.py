"""What several test modules share: pecd as a separate process (`python -m pecd serve -c FILE`),
pecd's App or one of its services in a background event loop, every PEC message kind, and the
configuration of stock clients (mbsync)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

from pecd.app import App
from pecd.clock import Clock, SystemClock
from pecd.config import Config, load_config
from pecd.devinit import config_text, init_installation
from pecd.pec import builders as b
from pecd.pec.builders import ProviderIdentity, Transmission
from pecd.pec.checks import Violation
from pecd.pec.pki import DevPki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Errore, TipoRicevuta
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async

DOMAIN = "pec.example.test"
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def install(
    directory: Path,
    db_url: str | None,
    *,
    extra_config: str = "\n[queue]\nbase_delay_seconds = 0.2\nlease_seconds = 3\n",
) -> Config:
    """A fresh installation in ``directory`` with mailboxes alice, bob and carol (password
    PASSWORD) on free loopback ports; ``extra_config`` is appended to the config file."""
    await init_installation(
        directory, domain=DOMAIN, name="Example PEC S.p.A.", clock=SystemClock(), demo=False
    )
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", cfg.listeners.smtps.port), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"pecd exited: {log.read_text()[-3000:]}") from None
            time.sleep(0.1)
    raise AssertionError("pecd did not start listening")


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


# --- every message pecd emits -------------------------------------------------------------------

WHEN = pec_time(datetime(2026, 3, 2, 9, 15, 30, tzinfo=UTC))
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
        "busta-di-trasporto": b.transport_envelope(original, tx, provider, WHEN),
        "accettazione": b.accettazione(tx, provider, WHEN),
        "non-accettazione": b.non_accettazione(tx, provider, WHEN, violations=[v]),
        "non-accettazione-virus": b.non_accettazione(tx, provider, WHEN, virus="Eicar"),
        "presa-in-carico": b.presa_in_carico(
            tx, provider, WHEN, ricezione=[bob], mail_receipt="ricevute@pec.sender.test"
        ),
        **{
            f"avvenuta-consegna-{kind.value}": b.avvenuta_consegna(
                tx, provider, WHEN, recipient=bob, postacert=postacert, kind=kind
            )
            for kind in (TipoRicevuta.COMPLETA, TipoRicevuta.BREVE, TipoRicevuta.SINTETICA)
        },
        "errore-consegna": b.errore_consegna(
            tx,
            provider,
            WHEN,
            recipient="nobody@pec.example.test",
            errore=Errore.NO_DEST,
            errore_esteso="5.1.1 - indirizzo non valido",
        ),
        **{
            f"preavviso-{hours}h": b.preavviso_errore_consegna(
                tx,
                provider,
                WHEN,
                recipient=bob,
                sent=pec_time(WHEN.instant - timedelta(hours=hours)),
                final=hours == 24,
            )
            for hours in (12, 24)
        },
        "rilevazione-virus": b.rilevazione_virus(
            tx,
            provider,
            WHEN,
            recipient=bob,
            errore_esteso="virus Eicar",
            mail_receipt="ricevute@pec.sender.test",
        ),
        "busta-di-anomalia": b.anomaly_envelope(
            original, provider, WHEN, rcpt_to=[bob], error="firma non valida"
        ),
    }
    return {name: m.raw for name, m in built.items()}


def openssl_verify(raw: bytes, ca_file: Path, tmp_path: Path) -> None:
    """``openssl cms -verify`` accepts the S/MIME signature of ``raw`` against ``ca_file``."""
    msg = tmp_path / "pop3-msg.eml"
    msg.write_bytes(raw)
    r = subprocess.run(
        [
            *("openssl", "cms", "-verify", "-inform", "SMIME", "-in", str(msg)),
            *("-CAfile", str(ca_file), "-purpose", "any", "-out", "/dev/null"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


# --- stock clients -----------------------------------------------------------------------------


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
