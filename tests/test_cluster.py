"""Two ``pecd serve`` nodes on one PostgreSQL database and one Maildir root, under load from
several SMTPS clients; one node is SIGKILLed mid-run (its whole process group: the format
workers and the mailbox process with it) and restarted on the same config.

For every message that got a 250 (and for every other one that was committed anyway, which
may exist at most once): exactly one accettazione in the sender's Maildir, one transport
envelope in each existing recipient's Maildir, one avvenuta-consegna or errore-consegna per
recipient, one presa in carico in the service mailbox; no duplicate file anywhere; one trace
event of each kind per transmission and recipient; ``pecd log verify`` holds after a seal.

Each node has a config file of its own (its own ports) in the one installation directory, so
that both read the same keys, the same data directory and the same Maildir root."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from helpers import DOMAIN, PASSWORD, children, free_port, install, wait_for
from pecd.config import Config, load_config
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.classify import classify
from pecd.pec.vocab import Kind
from pecd.store.db import Database
from pecd.store.models import Job, TraceEvent
from pecd.store.models import Node as NodeRow
from store_fixtures import PG_ENV, fresh_postgres_database

pytestmark = pytest.mark.slow

USERS = ("alice", "bob", "carol")
GHOST = f"ghost@{DOMAIN}"  # no such mailbox: an errore-consegna for it
CLIENTS = 6
# Acknowledged messages before node 1 is killed; after that, before each next step (node 1
# back, node 2 killed, node 2 back); and after the last step, before the clients stop.
PHASE = 30
# Submissions per second at most, all clients together: pecd answers 250 far faster than two
# nodes on two shared cores deliver, and the test is about what happens, not how much.
RATE = 25
SESSION = 10  # messages per SMTP session
# Takeover within seconds: a silent node is dead after 2 s; a lease lasts 6 s.
QUEUE = """
[queue]
base_delay_seconds = 0.2
max_delay_seconds = 2
lease_seconds = 6
heartbeat_seconds = 0.5
node_timeout_seconds = 2
format_processes = 1
workers = 2

[log]
seal_seconds = 3
"""


def _postgres_url() -> str:
    """The base URL of the test server, or a clean skip when there is none reachable."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} not set")
    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        socket.create_connection((u.host or "127.0.0.1", u.port or 5432), timeout=3).close()
    except OSError as exc:
        pytest.skip(f"PostgreSQL at {u.host}:{u.port} unreachable: {exc}")
    return url


@pytest.fixture(name="pg")
def pg_fixture() -> Iterator[str]:
    _postgres_url()
    url, drop = fresh_postgres_database()
    try:
        yield url
    finally:
        drop()


@dataclass
class Node:
    """One ``pecd serve`` in a process group of its own."""

    name: str
    cfg: Config
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def port(self) -> int:
        assert self.cfg.listeners.smtps is not None
        return self.cfg.listeners.smtps.port

    def start(self) -> None:
        assert self.cfg.source is not None
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts} ===\n".encode())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pecd", "serve", "-c", str(self.cfg.source)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches its children
        )
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(listening, 60, f"{self.name} listening on SMTPS", interval=0.05)

    def kill_group(self) -> list[int]:
        """SIGKILL the node's process group and every process of its tree, as a machine that
        dies takes them all: pecd serve, its mailbox process, its engine processes (each in a
        session of its own, so that a signal to the group does not reach them) and every
        format worker. The tree is stopped first (SIGSTOP) so that nothing forks meanwhile.
        Return the pids of the tree."""
        assert self.proc is not None
        pid = self.proc.pid
        os.killpg(pid, signal.SIGSTOP)
        tree: set[int] = set()
        while new := set(children(pid)) - tree:
            for p in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
            tree |= new
        os.killpg(pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self.proc.wait(30)
        with self.log.open("ab") as out:  # where in its log it died
            out.write(
                f"\n=== SIGKILL {time.strftime('%H:%M:%S')}: {pid} {sorted(tree)} ===\n".encode()
            )
        return sorted(tree)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Ledger:
    """What the clients saw, per client Message-ID."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # mid -> (from, rcpts)
    # Sent without a 250: the reply (4xx/5xx), or none at all (the connection broke).
    refused: dict[str, tuple[str, list[str], str]] = field(default_factory=dict)
    unknown: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # what no client should ever meet
    next_index: int = 0
    limit: int = 100_000  # messages to submit: set once the kills are over

    next_at: float = 0.0  # when the next message may go (RATE)

    def take(self) -> int | None:
        """The number of the next message to send, once its time has come; None: stop."""
        with self.lock:
            if self.next_index >= self.limit:
                return None
            self.next_index += 1
            now = time.monotonic()
            self.next_at = max(now, self.next_at) + 1 / RATE
            wait = self.next_at - now - 1 / RATE
        time.sleep(max(0.0, wait))
        return self.next_index - 1


def _submission(n: int, i: int) -> tuple[str, list[str], list[str]]:
    """Sender, To and Cc of client ``n``'s message ``i``: local mailboxes, one in eight with a
    missing one too."""
    sender = USERS[n % 3]
    others = [u for u in USERS if u != sender]
    to = [f"{others[i % 2]}@{DOMAIN}"]
    cc = [f"{others[(i + 1) % 2]}@{DOMAIN}"] if i % 4 else []
    if i % 8 == 5:
        to.append(GHOST)
    return f"{sender}@{DOMAIN}", to, cc


def _raw(frm: str, to: list[str], cc: list[str], mid: str) -> bytes:
    lines = [
        f"From: {frm}",
        f"To: {', '.join(to)}",
        *([f"Cc: {', '.join(cc)}"] if cc else []),
        f"Subject: cluster {mid}",
        f"Message-ID: {mid}",
        "Date: Tue, 01 Dec 2026 10:00:00 +0100",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Messaggio di prova del cluster.",
        "",
    ]
    return "\r\n".join(lines).encode()


def _client(n: int, nodes: list[Node], ctx: ssl.SSLContext, ledger: Ledger) -> None:
    """Submit messages until there are none left: to node ``n % 2`` first, to the other when
    that one does not answer. A message that gets no 250 is sent again under a new Message-ID
    (the client cannot know whether the first one was committed)."""
    pending: list[tuple[str, list[str], list[str], str]] = []
    attempt = 0
    while True:
        if not pending:
            i = ledger.take()
            if i is None:
                return
            frm, to, cc = _submission(n, i)
            pending.append((frm, to, cc, f"<c{n}-m{i}-a0@client.example>"))
        order = [nodes[n % 2], nodes[(n + 1) % 2]]
        smtp: smtplib.SMTP_SSL | None = None
        for node in order:
            try:
                smtp = smtplib.SMTP_SSL("127.0.0.1", node.port, context=ctx, timeout=30)
                break
            except (OSError, smtplib.SMTPException):
                continue
        if smtp is None:
            time.sleep(0.1)
            continue
        try:
            smtp.login(pending[0][0], PASSWORD)  # a client has one sender
            # Ten messages a session, then a new one: back to the preferred node once it is
            # up again, so that a restarted node takes submissions too.
            for _ in range(SESSION):
                if not pending:
                    break
                frm, to, cc, mid = pending[0]
                try:
                    refused = smtp.sendmail(frm, [*to, *cc], _raw(frm, to, cc, mid))
                except smtplib.SMTPResponseException as exc:
                    with ledger.lock:
                        reply = f"{exc.smtp_code} {exc.smtp_error!r}"
                        ledger.refused[mid] = (frm, [*to, *cc], reply)
                    attempt += 1
                    pending[0] = (frm, to, cc, mid.replace("-a", f"-r{attempt}-a", 1))
                    break  # a new session for the retry
                except smtplib.SMTPRecipientsRefused as exc:
                    refused = exc.recipients
                    if all(400 <= code < 500 for code, _ in refused.values()):
                        # A node stopping says 421 at RCPT: try again, as for a 4xx at DATA.
                        with ledger.lock:
                            ledger.refused[mid] = (frm, [*to, *cc], repr(refused))
                        attempt += 1
                        pending[0] = (frm, to, cc, mid.replace("-a", f"-r{attempt}-a", 1))
                        break
                with ledger.lock:
                    if refused:  # every recipient is accepted at RCPT, the missing one too
                        ledger.errors.append(f"{mid}: recipients refused: {refused}")
                        return
                    ledger.acked[mid] = (frm, [*to, *cc])
                pending.pop(0)
                i = ledger.take()
                if i is not None:
                    nfrm, nto, ncc = _submission(n, i)
                    pending.append((nfrm, nto, ncc, f"<c{n}-m{i}-a0@client.example>"))
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
        except (OSError, smtplib.SMTPException):
            # The connection broke (the node was killed): what was in flight is unknown.
            if pending:
                frm, to, cc, mid = pending[0]
                with ledger.lock:
                    if mid not in ledger.acked and mid not in ledger.refused:
                        ledger.unknown[mid] = (frm, [*to, *cc])
                attempt += 1
                pending[0] = (frm, to, cc, mid.replace("-a", f"-r{attempt}-a", 1))
            with contextlib.suppress(OSError):
                smtp.close()
            time.sleep(0.05)


# --- what is in the Maildirs and the trace log ------------------------------------------------


@dataclass
class Tally:
    """Files by (client Message-ID, what, mailbox), e.g. ("<m>", "accettazione:", alice)."""

    files: Counter[tuple[str, str, str]]
    idents: dict[str, set[str]]  # client Message-ID -> PEC identificativi seen


def _tally(store: MaildirStore, service: str) -> Tally:
    files: Counter[tuple[str, str, str]] = Counter()
    idents: dict[str, set[str]] = {}
    for box in (*(f"{u}@{DOMAIN}" for u in USERS), service):
        for path in store.list_folder(box):
            try:
                c = classify(path.read_bytes())
            except FileNotFoundError:  # moved new/ -> cur/ meanwhile: never here, no reader
                continue
            assert c.daticert is not None, path
            mid = c.daticert.msgid or ""
            if c.ricevuta is not None:
                what = f"{c.ricevuta.value}:{c.daticert.consegna or ''}"
            else:
                assert c.kind is Kind.TRANSPORT_ENVELOPE, (path, c.kind)
                what = "envelope"
            files[(mid, what, box)] += 1
            idents.setdefault(mid, set()).add(c.daticert.identificativo or "")
    return Tally(files, idents)


def _expected(frm: str, rcpts: list[str], service: str) -> Counter[tuple[str, str]]:
    """(what, mailbox) -> 1 for every file one transmission must leave."""
    want: Counter[tuple[str, str]] = Counter({("accettazione:", frm): 1})
    for r in rcpts:
        if r == GHOST:
            want[(f"errore-consegna:{r}", frm)] = 1
        else:
            want[("envelope", r)] = 1
            want[(f"avvenuta-consegna:{r}", frm)] = 1
    want[("presa-in-carico:", service)] = 1
    return want


async def _db_state(url: str) -> tuple[Counter[str], list[TraceEvent]]:
    db = await Database.open(url)
    try:
        async with db.read_session() as s:
            states = Counter((await s.scalars(select(Job.state))).all())
            events = list((await s.scalars(select(TraceEvent).order_by(TraceEvent.id))).all())
            return states, events
    finally:
        await db.close()


async def _nodes_of(url: str, pids: list[int]) -> list[str]:
    """The node ids the processes ``pids`` (a ``pecd serve`` and its children) beat under."""
    db = await Database.open(url)
    try:
        async with db.read_session() as s:
            ids = (await s.scalars(select(NodeRow.id).where(NodeRow.pid.in_(pids)))).all()
            assert ids, f"no node row for the processes {pids}"
            return list(ids)
    finally:
        await db.close()


async def _held_by(url: str, nodes: list[str], ids: list[int] | None = None) -> list[int]:
    """The running jobs leased by one of ``nodes`` (among ``ids``, if given)."""
    db = await Database.open(url)
    try:
        async with db.read_session() as s:
            q = select(Job.id).where(Job.state == "running", Job.leased_by.in_(nodes))
            if ids is not None:
                q = q.where(Job.id.in_(ids))
            return list((await s.scalars(q)).all())
    finally:
        await db.close()


async def _unfinished(url: str) -> list[tuple[str, str, str | None]]:
    db = await Database.open(url)
    try:
        async with db.read_session() as s:
            rows = await s.execute(
                select(Job.kind, Job.state, Job.last_error).where(Job.state != "done")
            )
            return [(k, st, e) for k, st, e in rows.all()]
    finally:
        await db.close()


def _pecd(cfg: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pecd", *args, "-c", str(cfg.source)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_two_nodes_one_killed_deliver_everything_exactly_once(pg: str, tmp_path: Path) -> None:
    base = asyncio.run(install(tmp_path / "inst", pg, extra_config=QUEUE))
    assert base.source is not None and base.tls.ca is not None
    # Node 2: the same file with ports of its own, beside node 1's (same keys, data, Maildir).
    text = base.source.read_text("utf-8")
    assert base.listeners.smtps and base.listeners.submission and base.listeners.imaps
    for ep in (base.listeners.smtps, base.listeners.submission, base.listeners.imaps):
        text = text.replace(f'"127.0.0.1:{ep.port}"', f'"127.0.0.1:{free_port()}"')
    second = base.source.with_name("pecd-node2.toml")
    second.write_text(text, "utf-8")
    nodes = [
        Node("node1", base, tmp_path / "node1.log"),
        Node("node2", load_config(second), tmp_path / "node2.log"),
    ]
    assert nodes[0].cfg.maildir_root == nodes[1].cfg.maildir_root
    assert nodes[0].cfg.database_url == nodes[1].cfg.database_url == pg
    assert nodes[0].port != nodes[1].port
    service = base.provider.mail_receipt
    ctx = ssl.create_default_context(cafile=str(base.tls.ca))
    ledger = Ledger()
    # (node, acknowledged then, running jobs it held, seconds until all were done elsewhere)
    kills: list[tuple[str, int, int, float]] = []
    starts: list[float] = []  # seconds each restart took until SMTPS answered
    killed_pids: set[int] = set()
    try:
        for node in nodes:
            node.start()
        threads = [
            threading.Thread(target=_client, args=(n, nodes, ctx, ledger), daemon=True)
            for n in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        # Mid-run, each node in turn: its whole process tree dies at once (every process of
        # it must be gone), the other carries on alone and takes over the running jobs the
        # dead one held, then the dead one starts again on its config file.
        for dead, other in [(nodes[0], nodes[1]), (nodes[1], nodes[0])]:
            at = len(ledger.acked) + PHASE
            wait_for(lambda at=at: len(ledger.acked) >= at, 120, f"{at} acknowledged", 0.02)
            assert dead.proc is not None
            pid = dead.proc.pid
            node_ids = asyncio.run(_nodes_of(pg, [dead.proc.pid, *children(dead.proc.pid)]))
            tree = dead.kill_group()
            assert tree, f"{dead.name} had no child processes (format workers) to kill"
            killed_pids.update([pid, *tree])
            wait_for(lambda t=tree: not any(map(_alive, t)), 10, f"{dead.name}'s tree gone")
            acked_at_kill, t_kill = len(ledger.acked), time.monotonic()
            held = asyncio.run(_held_by(pg, node_ids))
            wait_for(
                lambda n=node_ids, h=held: asyncio.run(_held_by(pg, n, ids=h)) == [],
                60,
                f"{other.name} taking over the jobs {dead.name} held",
                interval=0.2,
            )
            took = time.monotonic() - t_kill
            kills.append((dead.name, acked_at_kill, len(held), round(took, 1)))
            back = acked_at_kill + PHASE
            wait_for(
                lambda back=back: len(ledger.acked) >= back,
                120,
                f"{other.name} taking the load alone",
                0.02,
            )
            t_start = time.monotonic()
            dead.start()  # the same config file
            starts.append(round(time.monotonic() - t_start, 1))
        with ledger.lock:
            ledger.limit = ledger.next_index + PHASE
        for t in threads:
            t.join(180)
            assert not t.is_alive(), "a client is stuck"
        assert not ledger.errors, ledger.errors
        assert len(ledger.acked) >= ledger.limit, (ledger.limit, ledger.refused, ledger.unknown)

        # Settle: no job left to do on the database both nodes share.
        def settled() -> bool:
            return not [u for u in asyncio.run(_unfinished(pg)) if u[1] != "parked"]

        wait_for(settled, 120, "every job done", interval=0.5)
        parked = asyncio.run(_unfinished(pg))
        assert not parked, parked
        # A seal now (the sealer runs every 3 s anyway; both nodes may try: one wins).
        sealed = _pecd(base, "log", "seal")
        assert sealed.returncode == 0, sealed.stdout + sealed.stderr
        tally = _tally(MaildirStore(base.maildir_root), service)
        # Maildir tmp/ files ("<name>.<pid>.<random>") left behind: by killed processes only.
        leftovers = [p for p in base.maildir_root.glob("*/*/**/tmp/*") if p.is_file()]
        strays = [p for p in leftovers if int(p.name.rsplit(".", 2)[1]) not in killed_pids]
        assert not strays, strays
    finally:
        codes = [node.stop() for node in nodes]
    assert codes == [0, 0], [n.log.read_text()[-3000:] for n in nodes]

    # --- the Maildirs ---
    dupes = {k: v for k, v in tally.files.items() if v > 1}
    assert not dupes, f"duplicate files: {sorted(dupes)[:20]}"
    assert all(len(ids) == 1 for ids in tally.idents.values()), "one transmission per Message-ID"
    by_mid: dict[str, Counter[tuple[str, str]]] = {}
    for (mid, what, box), n in tally.files.items():
        by_mid.setdefault(mid, Counter())[(what, box)] += n
    for mid, (frm, rcpts) in ledger.acked.items():
        assert by_mid.get(mid) == _expected(frm, rcpts, service), (mid, by_mid.get(mid))
    # What the client never saw acknowledged exists at most once, and then whole.
    sent = {**ledger.unknown, **{m: (f, r) for m, (f, r, _) in ledger.refused.items()}}
    unacked = set(by_mid) - set(ledger.acked)
    assert unacked <= set(sent), unacked - set(sent)
    for mid in unacked:
        frm, rcpts = sent[mid]
        assert by_mid[mid] == _expected(frm, rcpts, service), (mid, by_mid[mid])

    # --- the trace log: one event of each kind per transmission and recipient ---
    _states, events = asyncio.run(_db_state(pg))
    per: Counter[tuple[str, str, str]] = Counter()
    kinds_of: dict[str, Counter[str]] = {}
    for e in events:
        # A delivery event names its one recipient in its daticert (consegna).
        who = str((e.daticert or {}).get("consegna") or "")
        per[(e.event, e.pec_msgid or "", who)] += 1
        if e.client_msgid:
            kinds_of.setdefault(e.client_msgid, Counter())[e.event] += 1
    dup_events = {k: v for k, v in per.items() if v > 1}
    assert not dup_events, (
        f"duplicate trace events: {sorted(dup_events)[:20]}",
        [(e.event, e.daticert, e.data) for e in events[:12]],
    )
    for mid, (_frm, rcpts) in [*ledger.acked.items(), *((m, sent[m]) for m in unacked)]:
        seen = kinds_of.get(mid, Counter())
        locals_ = [r for r in rcpts if r != GHOST]
        assert seen["accettazione"] == 1, (mid, seen)
        assert seen["posta-certificata"] == 1, (mid, seen)
        assert seen["presa-in-carico"] == 1, (mid, seen)
        assert seen["avvenuta-consegna"] == len(locals_), (mid, seen)
        assert seen["errore-consegna"] == len(rcpts) - len(locals_), (mid, seen)
    assert all(e.seal_id is not None for e in events), "events left unsealed after the seal"

    verified = _pecd(base, "log", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    print(
        f"cluster: {len(ledger.acked)} acknowledged, {len(ledger.refused)} refused, "
        f"{len(ledger.unknown)} unanswered ({len(unacked)} of those committed anyway), "
        f"{len(events)} trace events; killed (node, acknowledged, running jobs it held, "
        f"seconds until done elsewhere): {kills}, restarts took {starts} s; events by kind: {dict(Counter(e.event for e in events))}"
    )
