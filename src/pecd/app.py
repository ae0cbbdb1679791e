"""Composition root: builds every service from the config and starts/stops them in a known order."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pecd.antivirus.scanner import make_scanner
from pecd.clock import Clock, SystemClock
from pecd.config import Config
from pecd.engine.vocab import LOCAL_KINDS, JobKind
from pecd.guard import Guard
from pecd.index import IndexService
from pecd.mailbox.maildir import MaildirStore, start_tmp_cleanup
from pecd.memory import return_freed_messages_to_the_system
from pecd.runtime import observe
from pecd.runtime.access import AccessPoint
from pecd.runtime.formats import FormatWorkers
from pecd.runtime.identity import provider_identity
from pecd.runtime.intake import Intake
from pecd.runtime.metrics import MetricsServer, scanner_ping
from pecd.runtime.reception import ReceptionPoint
from pecd.runtime.relay import RelayClient
from pecd.runtime.sealer import Sealer
from pecd.runtime.stages import StageRunner, make_context
from pecd.runtime.supervisor import MailboxSupervisor, WebSupervisor
from pecd.runtime.timers import Timers
from pecd.runtime.tls import server_tls_context
from pecd.runtime.workers import WorkerPool
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async
from pecd.store.nodes import start_heartbeat

log = logging.getLogger(__name__)


@dataclass
class App:
    """A running pecd node. ``async with App(cfg) as app:`` starts it; leaving stops it cleanly."""

    cfg: Config
    clock: Clock = field(default_factory=SystemClock)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    runner: StageRunner | None = None
    access: AccessPoint | None = None
    mailboxes: MailboxSupervisor | None = None
    web: WebSupervisor | None = None
    workers: WorkerPool | None = None
    relay_workers: WorkerPool | None = None
    webhook_workers: WorkerPool | None = None
    timers: Timers | None = None
    sealer: Sealer | None = None
    reception: ReceptionPoint | None = None
    index: IndexService | None = None
    metrics: MetricsServer | None = None

    async def __aenter__(self) -> App:
        try:
            await self.start()
        except BaseException:
            await self.stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()

    async def start(self) -> None:
        cfg = self.cfg
        return_freed_messages_to_the_system()
        await migrate_async(cfg.database_url)
        db = await Database.open(cfg.database_url)
        self.stack.push_async_callback(db.close)
        if db.dialect == "sqlite":
            # One node owns an SQLite database: whatever a killed process was running is ours again.
            from pecd.store.jobs import release_all_running

            async with db.session() as s, s.begin():
                n = await release_all_running(s)
            if n:
                log.info("recovered %d jobs left running by a previous run", n)
        # On PostgreSQL this process is a node with a heartbeat: if it dies, the jobs it holds
        # go to other nodes within node_timeout_seconds (closed after the workers have stopped).
        await start_heartbeat(
            db,
            self.stack,
            every=cfg.queue.heartbeat_seconds,
            timeout=cfg.queue.node_timeout_seconds,
        )
        self.index = IndexService(cfg)
        await self.index.start(self.stack)
        maildir = MaildirStore(cfg.maildir_root)
        await start_tmp_cleanup(maildir, self.stack)  # what killed writers left in tmp/
        accounts = Accounts(db, max_hash_checks=cfg.security.max_hash_checks)
        provider = provider_identity(cfg)
        formats = FormatWorkers(
            cfg, provider, processes=cfg.queue.format_processes, maildir=maildir
        )
        await formats.start(self.stack)
        self.runner = runner = StageRunner(
            cfg=cfg,
            clock=self.clock,
            ctx=make_context(cfg, provider, self.index),
            db=db,
            accounts=accounts,
            formats=formats,
            relay=RelayClient(cfg, cfg.listeners.hostname),
            scanner=(scanner := make_scanner(cfg)),
        )
        self.stack.push_async_callback(scanner.close)
        # The mail log and the metrics, fed by committed trace events; the operator port.
        self.metrics = await observe.start(
            cfg,
            db,
            self.stack,
            ready=lambda: (
                self.mailboxes is not None and observe.serving(self.access, self.reception)
            ),
            ping=scanner_ping(scanner),
        )
        # Started before the workers, so it stops after them and seals what they drained.
        self.sealer = Sealer(
            db,
            provider.signer,
            self.clock,
            every=cfg.log.seal_seconds,
            node=f"{socket.gethostname()}:{os.getpid()}",
            retention_months=cfg.log.retention_months,
        )
        await self.sealer.start(self.stack)
        tls = server_tls_context(cfg)
        # Stop order is the reverse of start: listeners close first, then workers drain.
        self.workers = WorkerPool(runner, LOCAL_KINDS, count=cfg.queue.workers, name="pipeline")
        await self.workers.start(self.stack)
        # The relay has workers of its own, one job each: a peer that is slow or down holds
        # only the worker talking to it, never local delivery. (Its retries until the message
        # expires are new jobs made by the stage; the pool's attempts count only crashes.)
        self.relay_workers = WorkerPool(
            runner,
            [JobKind.RELAY],
            count=cfg.relay.workers,
            name="relay",
            batch=1,
            wake=runner.relay_wake,
            # Long enough for a whole SMTP dialogue with every MX of a slow destination, so
            # that no second worker takes the job over while the first is still sending.
            lease_seconds=max(cfg.queue.lease_seconds, cfg.relay.timeout_seconds * 8),
        )
        await self.relay_workers.start(self.stack)
        # Webhook events (pecd.web.webhooks): one POST per job, to a receiver that may be slow.
        self.webhook_workers = WorkerPool(
            runner,
            [JobKind.WEBHOOK],
            count=cfg.webhooks.workers,
            name="webhook",
            batch=1,
            wake=runner.webhook_wake,
            max_attempts=cfg.webhooks.max_attempts,
        )
        await self.webhook_workers.start(self.stack)
        self.timers = Timers(runner, check_seconds=cfg.timers.check_seconds, node=self.workers.node)
        await self.timers.start(self.stack)
        lst = cfg.listeners
        intake = Intake(db, runner.wake)
        await intake.start(self.stack)
        self.access = AccessPoint(
            cfg,
            self.clock,
            accounts,
            tls,
            intake=intake,
            smtps=lst.smtps,
            submission=lst.submission,
            hostname=lst.hostname,
            guard=(guard := Guard(cfg.security)),
        )
        await self.access.start(self.stack)
        if lst.reception is not None:
            self.reception = ReceptionPoint(
                cfg,
                self.clock,
                tls,
                intake=intake,
                endpoint=lst.reception,
                hostname=lst.hostname,
                guard=guard,
            )
            await self.reception.start(self.stack)
        # IMAP and POP3 run in a supervised process of their own (see runtime/supervisor.py).
        self.mailboxes = MailboxSupervisor(cfg, debug=log.isEnabledFor(logging.DEBUG))
        await self.mailboxes.start(self.stack)
        # The web application (HTTPS) likewise, when listeners.https is set.
        if lst.https is not None:
            # What the web process commits (an API or compose submission) wakes the pipeline.
            self.web = WebSupervisor(
                cfg, debug=log.isEnabledFor(logging.DEBUG), on_wake=runner.wake.set
            )
            await self.web.start(self.stack)

    def client_settings(self) -> list[str]:
        """What a person types into a mail client, printed at startup."""
        lst = self.cfg.listeners
        host = lst.hostname
        lines = []
        if self.access and "smtps" in self.access.servers:
            lines.append(
                f"  SMTP (send):   {host} port {self.access.port('smtps')}, SSL/TLS, normal password"
            )
        if self.access and "submission" in self.access.servers:
            lines.append(
                f"  SMTP (send):   {host} port {self.access.port('submission')}, STARTTLS, normal password"
            )
        ports = self.mailboxes.ports if self.mailboxes else {}
        for name, label, how in (
            ("imaps", "IMAP (read):  ", "SSL/TLS"),
            ("imap", "IMAP (read):  ", "STARTTLS"),
            ("pop3s", "POP3 (read):  ", "SSL/TLS"),
            ("pop3", "POP3 (read):  ", "STARTTLS"),
        ):
            if name in ports:
                lines.append(f"  {label} {host} port {ports[name]}, {how}, normal password")
        if self.cfg.mailbox.server == "dovecot":
            lines.append("  IMAP and POP3: served by Dovecot (see its configuration)")
        lines.append("  User name:     your full PEC address")
        if self.web and "https" in self.web.sockets:
            lines.append(f"  Web (HTTPS):   https://{host}:{self.web.port('https')}/")
        if self.reception and self.reception.server:
            lines.append(f"  Other providers deliver to: {host} port {self.reception.port} (SMTP)")
        if self.cfg.tls.ca:
            lines.append(f"  Trust this CA: {Path(self.cfg.tls.ca)}")
        return lines
