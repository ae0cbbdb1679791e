"""Composition root: builds every service from the config and starts/stops them in a known order."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
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
from pecd.runtime.diskspace import FreeSpace, storage_watch
from pecd.runtime.formats import FormatWorkers
from pecd.runtime.identity import provider_identity
from pecd.runtime.intake import Intake
from pecd.runtime.leadership import Leadership
from pecd.runtime.metrics import (
    MetricsServer,
    multiprocess_dir,
    process_gone,
    remove_multiprocess_dir,
    scanner_ping,
    use_multiprocess,
)
from pecd.runtime.reception import ReceptionPoint
from pecd.runtime.relay import RelayClient
from pecd.runtime.sealer import Sealer
from pecd.runtime.stages import StageRunner, make_context
from pecd.runtime.supervisor import (
    EngineGroup,
    MailboxSupervisor,
    WebSupervisor,
    worker_prefix,
)
from pecd.runtime.timers import Timers
from pecd.runtime.tls import server_tls_context
from pecd.runtime.workers import WorkerPool
from pecd.store.accounts import Accounts
from pecd.store.db import Database, migrate_async
from pecd.store.engines import release_worker_jobs
from pecd.store.leader import leader_lock
from pecd.store.nodes import new_node_id, start_heartbeat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRole:
    """What makes an App one engine process of a `pecd serve` (runtime/engine_process.py): its
    index, the SMTP listening sockets its parent bound (``smtps``, ``submission``,
    ``reception``) and what its worker ids start with."""

    index: int
    sockets: Mapping[str, socket.socket]
    worker_prefix: str
    # Its share of the machine's format processes, when the config does not set their number.
    format_processes: int | None = None


def engine_format_processes(total: int, engines: int) -> int:
    """Format processes per engine process when ``[queue] format_processes`` is not set: its
    default (``total``, one per CPU plus one) shared among ``engines``, at least one each."""
    return max(1, -(-total // engines))


def observe_events(cfg: Config, db: Database, stack: contextlib.AsyncExitStack) -> None:
    """The committed-events hook of an engine process: its counters (summed by its parent's
    metrics port) and its lines of the mail log; no port of its own."""
    if cfg.metrics.listen is None and not cfg.log.mail_log:
        return
    sinks: list[Callable[[list[observe.Row]], None]] = [observe.count]
    if cfg.log.mail_log:
        mail_log = observe.MailLog(cfg.log.mail_log, cfg.log.mail_log_format)
        stack.callback(mail_log.close)
        sinks.append(mail_log.write)
    hook = observe.Committed(db, sinks)
    hook.install()
    stack.callback(hook.remove)


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
    # This App is one engine process of a `pecd serve` (runtime/engine_process.py), or None:
    # it is `pecd serve` itself.
    role: EngineRole | None = None
    # serve.processes > 1: the engine processes this `pecd serve` supervises.
    engines: EngineGroup | None = None
    leadership: Leadership | None = None
    # Engine processes to run; None: ``[serve] processes`` if set, else 1. (`pecd serve` passes
    # cfg.processes, whose default is one per CPU on PostgreSQL; an App made in a program or a
    # test keeps everything in its own process unless the config says otherwise.)
    processes: int | None = None
    # Where the child processes count their metrics, summed on this process's port (metrics.py).
    metrics_dir: Path | None = None

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
        if self.role is None:  # an engine process's parent has migrated already
            await migrate_async(cfg.database_url)
        db = await Database.open(cfg.database_url)
        self.stack.push_async_callback(db.close)
        if self.role is None and db.dialect == "sqlite":
            # One node owns an SQLite database: whatever a killed process was running is ours again.
            from pecd.store.jobs import release_all_running

            async with db.session() as s, s.begin():
                n = await release_all_running(s)
            if n:
                log.info("recovered %d jobs left running by a previous run", n)
        if self.role is None and cfg.metrics.listen is not None:
            # The children (mailbox, web, engine processes) count in files of their own under a
            # directory made fresh for this start, summed by this process's port. Removed after
            # they have stopped (the stack closes in reverse).
            self.metrics_dir = path = multiprocess_dir()
            self.stack.callback(remove_multiprocess_dir, path)
            use_multiprocess(path)
            self.stack.callback(use_multiprocess, None)
        processes = self.processes if self.processes is not None else cfg.serve.processes or 1
        if self.role is None and processes > 1:
            await self._start_supervisor(db, processes)
        else:
            await self._start_engine(db)

    def shutting_down(self) -> None:
        """The stop signal came: supervised processes that exit from now on are not replaced."""
        for sup in (self.engines, self.mailboxes, self.web):
            if sup is not None:
                sup.shutting_down()

    async def _start_supervisor(self, db: Database, processes: int) -> None:
        """serve.processes > 1: this process binds the SMTP sockets and supervises the engine
        processes, the mailbox process and the web process; it serves the metrics port."""
        cfg = self.cfg
        node = new_node_id()[:12]
        extra: dict[str, object] = {}
        if "format_processes" not in cfg.queue.model_fields_set:
            # The default (one per CPU, plus one) is for the machine: shared among the engines,
            # not had by each (four engines on two cores ran twelve format processes).
            extra["format_processes"] = engine_format_processes(
                cfg.queue.format_processes, processes
            )
        self.engines = EngineGroup(
            cfg,
            processes,
            node,
            debug=log.isEnabledFor(logging.DEBUG),
            extra=extra,
            release=lambda prefix: release_worker_jobs(db, prefix),
            metrics_dir=self.metrics_dir,
            on_gone=process_gone,
        )
        scanner = make_scanner(cfg)
        self.stack.push_async_callback(scanner.close)
        self.metrics = await observe.start(
            cfg,
            db,
            self.stack,
            ready=lambda: (
                self.mailboxes is not None and self.engines is not None and self.engines.serving
            ),
            ping=scanner_ping(scanner),
        )
        await self.engines.start(self.stack)
        log.info(
            "node %s: %d engine processes (pids %s) serving %s",
            node,
            processes,
            ", ".join(str(p) for p in self.engines.pids),
            ", ".join(f"{n} {p}" for n, p in self.engines.ports.items()),
        )
        await self._start_children(wake=self.engines.wake)

    async def _start_children(self, wake: Callable[[], None]) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        # IMAP and POP3 run in a supervised process of their own (see runtime/supervisor.py).
        # Their metrics are summed on this process's port (metrics_dir: None when none is served).
        self.mailboxes = MailboxSupervisor(
            self.cfg, debug=debug, metrics_dir=self.metrics_dir, on_gone=process_gone
        )
        await self.mailboxes.start(self.stack)
        # The web application (HTTPS) likewise, when listeners.https is set.
        if self.cfg.listeners.https is not None:
            # What the web process commits (an API or compose submission) wakes the pipeline.
            self.web = WebSupervisor(
                self.cfg,
                debug=debug,
                on_wake=wake,
                metrics_dir=self.metrics_dir,
                on_gone=process_gone,
            )
            await self.web.start(self.stack)

    async def _start_engine(self, db: Database) -> None:
        """The SMTP points and the pipeline: in `pecd serve` itself (serve.processes = 1) or in
        one engine process (``self.role``)."""
        cfg = self.cfg
        role = self.role
        # On PostgreSQL this process is a node with a heartbeat: if it dies, the jobs it holds
        # go to other nodes within node_timeout_seconds (closed after the workers have stopped).
        beat = await start_heartbeat(
            db,
            self.stack,
            every=cfg.queue.heartbeat_seconds,
            timeout=cfg.queue.node_timeout_seconds,
        )
        # What every worker id of this process starts with: host, pid, node, process index.
        prefix = (
            role.worker_prefix
            if role is not None
            else worker_prefix(beat.node.id[:12] if beat else "local", 0, os.getpid())
        )
        self.index = IndexService(cfg)
        await self.index.start(self.stack)
        maildir = MaildirStore(cfg.maildir_root)
        await start_tmp_cleanup(maildir, self.stack)  # what killed writers left in tmp/
        accounts = Accounts(db, max_hash_checks=cfg.security.max_hash_checks)
        provider = provider_identity(cfg)
        format_processes = cfg.queue.format_processes
        if self.role is not None and self.role.format_processes is not None:
            format_processes = self.role.format_processes
        formats = FormatWorkers(cfg, provider, processes=format_processes, maildir=maildir)
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
        if role is None:
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
        else:
            # An engine process counts and logs its events; its parent serves the port.
            observe_events(cfg, db, self.stack)
        self.sealer = sealer = Sealer(
            db,
            provider.signer,
            self.clock,
            every=cfg.log.seal_seconds,
            node=f"{socket.gethostname()}:{os.getpid()}",
            retention_months=cfg.log.retention_months,
        )
        self.timers = timers = Timers(runner, check_seconds=cfg.timers.check_seconds, node=prefix)

        async def lead(stack: contextlib.AsyncExitStack) -> None:
            await sealer.start(stack)
            await timers.start(stack)

        # Timers, sealer and purge run in one process of the installation, the holder of the
        # leader lock (store/leader.py); the others take over if it dies. Started before the
        # workers, so it stops after them and seals what they drained.
        self.leadership = Leadership(
            leader_lock(cfg.database_url), lead, every=cfg.queue.heartbeat_seconds
        )
        await self.leadership.start(self.stack)
        tls = server_tls_context(cfg)
        # Stop order is the reverse of start: listeners close first, then workers drain.
        self.workers = WorkerPool(runner, LOCAL_KINDS, count=cfg.queue.workers, name="pipeline")
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
        for pool in (self.workers, self.relay_workers, self.webhook_workers):
            pool.node = prefix
            await pool.start(self.stack)
        lst = cfg.listeners
        # Room for two of the largest messages on the data and Maildir filesystems, else 452.
        space = FreeSpace(*storage_watch(cfg))
        intake = Intake(db, runner.wake, space=space)
        await intake.start(self.stack)
        socks = role.sockets if role is not None else {}
        self.access = AccessPoint(
            cfg,
            self.clock,
            accounts,
            tls,
            intake=intake,
            smtps=lst.smtps,
            submission=lst.submission,
            hostname=lst.hostname,
            guard=(guard := Guard(cfg.security, protocol="smtp")),
            sockets={k: v for k, v in socks.items() if k in ("smtps", "submission")},
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
                sock=socks.get("reception"),
            )
            await self.reception.start(self.stack)
        if role is None:
            await self._start_children(wake=runner.wake.set)

    def smtp_ports(self) -> dict[str, int]:
        """The bound SMTP ports: ``smtps``, ``submission``, ``reception`` (those configured)."""
        if self.engines is not None:
            return self.engines.ports
        ports = (
            {name: self.access.port(name) for name in self.access.servers} if self.access else {}
        )
        if self.reception is not None and self.reception.server is not None:
            ports["reception"] = self.reception.port
        return ports

    def client_settings(self) -> list[str]:
        """What a person types into a mail client, printed at startup."""
        lst = self.cfg.listeners
        host = lst.hostname
        lines = []
        smtp = self.smtp_ports()
        if "smtps" in smtp:
            lines.append(f"  SMTP (send):   {host} port {smtp['smtps']}, SSL/TLS, normal password")
        if "submission" in smtp:
            lines.append(
                f"  SMTP (send):   {host} port {smtp['submission']}, STARTTLS, normal password"
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
        if "reception" in smtp:
            lines.append(f"  Other providers deliver to: {host} port {smtp['reception']} (SMTP)")
        if self.engines is not None:
            lines.append(f"  Engine processes: {len(self.engines.engines)} (serve.processes)")
        if self.cfg.tls.ca:
            lines.append(f"  Trust this CA: {Path(self.cfg.tls.ca)}")
        return lines
