"""The operator port: Prometheus metrics on ``/metrics``, ``/healthz`` (the process is up) and
``/readyz`` (the database answers and the listeners are bound), on ``[metrics] listen``.

The counters are module-level (prometheus_client's default registry): the committed trace events
move them (:func:`count_event`, called by :mod:`pecd.runtime.observe` after each commit), the
Guard moves ``pecd_logins_failed_total`` and ``pecd_logins_succeeded_total`` (one label value per
protocol: ``smtp``, ``imap``, ``pop3``, ``web``), the stage runner observes the stage latencies.
The queue depth and the scanner's state are read when scraped, at most every
``queue_cache_seconds``.

The server is a few lines of asyncio: one request per connection, a bounded request head, a
timeout on reading it.

``pecd serve`` is one process with children: the mailbox process (IMAP, POP3), the web process
(HTTPS) and, with ``serve.processes`` > 1, the engine processes (SMTP and the pipeline). Each
child counts what happens in it (the mailbox and web processes their logins, an engine process
its events) in prometheus_client's multiprocess mode: when the port is served, ``pecd serve``
makes a fresh directory at each start (:func:`multiprocess_dir`, removed when it stops) and
starts every child with ``PROMETHEUS_MULTIPROC_DIR`` naming it, so the child's counters and
histograms live in files of that child (one set per pid). ``pecd serve`` itself counts in its own
memory as a single process does (with one engine, the access point and the pipeline run in it).
The port (:func:`use_multiprocess`) serves this process's registry with the children's files
added: a counter or histogram sample of the same name and labels is their sum. A child that
exits leaves its files, so its counts stay in the sum and counters never go back when it is
replaced; a replacement counts in files of its own pid (or, should the pid come again, goes on
from the counts in that pid's files). The gauges are this process's only (the queue depth and the
scanner, read when scraped; prometheus_client's ``process_*`` and ``python_*`` describe
``pecd serve`` itself): a child's gauge is never summed into them. ``*_created`` samples are left
out, as prometheus_client's multiprocess mode has none for the children's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from sqlalchemy import func, select, text

from pecd.engine.vocab import JobKind, TraceType
from pecd.pec.vocab import Ricevuta
from pecd.store import jobs
from pecd.store.db import Database
from pecd.store.models import Job

log = logging.getLogger(__name__)

# --- what is counted ---------------------------------------------------------------------------

EVENTS = Counter("pecd_events_total", "Trace events committed, by event", ["event"])
ACCEPTED = Counter("pecd_messages_accepted_total", "PEC submissions accepted (accettazione)")
REFUSED = Counter("pecd_messages_refused_total", "PEC submissions not accepted (non-accettazione)")
RECEIPTS = Counter("pecd_receipts_total", "Receipts emitted, by kind (X-Ricevuta)", ["kind"])
DELIVERIES = Counter(
    "pecd_deliveries_total", "Deliveries to local mailboxes, by outcome", ["outcome"]
)
RELAY = Counter("pecd_relay_total", "Relay attempts to other hosts, by outcome", ["outcome"])
RECEIVED = Counter(
    "pecd_received_total", "Messages taken in at the reception point, by outcome", ["outcome"]
)
LOGINS_FAILED = Counter("pecd_logins_failed_total", "Failed logins, by protocol", ["protocol"])
LOGINS_SUCCEEDED = Counter(
    "pecd_logins_succeeded_total", "Successful logins, by protocol", ["protocol"]
)
SMTP_REFUSED = Counter(
    "pecd_smtp_refused_total",
    "SMTP refusals before any trace event (MAIL, RCPT, DATA, a 421), by point and reply code",
    ["point", "code"],
)
STAGE_SECONDS = Histogram(
    "pecd_stage_seconds",
    "Run time of one job's stage (before its commit), by job kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOB_AGE_SECONDS = Histogram(
    "pecd_job_age_seconds",
    "Time from a job's creation to the end of its stage, by job kind",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
)
QUEUE = Gauge("pecd_queue_jobs", "Jobs not done, by kind and state", ["kind", "state"])
SCANNER_UP = Gauge(
    "pecd_scanner_up", "1 when the virus scanner answers PING, else 0 (absent: none)", ["scanner"]
)

_RECEIPT_KINDS = frozenset(r.value for r in Ricevuta)
_DELIVERY = {
    TraceType.AVVENUTA_CONSEGNA.value: "delivered",
    TraceType.ERRORE_CONSEGNA.value: "failed",
}
_RELAY = {
    TraceType.RELAYED.value: "relayed",
    TraceType.RELAY_RETRY.value: "deferred",
    TraceType.RELAY_FAILED.value: "failed",
}
_RECEIVED = {
    TraceType.RICEZIONE.value: "taken-in-charge",
    TraceType.ANOMALIA.value: "anomaly",
    TraceType.VIRUS.value: "virus",
    TraceType.DUPLICATE.value: "duplicate",
}


def count_event(event: str) -> None:
    """Move the counters for one committed trace event."""
    EVENTS.labels(event).inc()
    if event == TraceType.ACCETTAZIONE:
        ACCEPTED.inc()
    elif event == TraceType.NON_ACCETTAZIONE:
        REFUSED.inc()
    if event in _RECEIPT_KINDS:
        RECEIPTS.labels(event).inc()
    if (outcome := _DELIVERY.get(event)) is not None:
        DELIVERIES.labels(outcome).inc()
    elif (outcome := _RELAY.get(event)) is not None:
        RELAY.labels(outcome).inc()
    elif (outcome := _RECEIVED.get(event)) is not None:
        RECEIVED.labels(outcome).inc()


def logins_counted(protocol: str) -> None:
    """Show ``protocol``'s login counters from the start, at 0 until a login comes (a rate over
    a series that appears with its first failure misses that failure)."""
    LOGINS_FAILED.labels(protocol)
    LOGINS_SUCCEEDED.labels(protocol)


def login_failed(protocol: str) -> None:
    LOGINS_FAILED.labels(protocol).inc()


def login_succeeded(protocol: str) -> None:
    LOGINS_SUCCEEDED.labels(protocol).inc()


def smtp_refused(point: str, code: str) -> None:
    SMTP_REFUSED.labels(point, code).inc()


def clock() -> float:
    return time.perf_counter()


def stage_done(kind: str, t0: float, created_at: datetime | None, now: datetime) -> None:
    """One job's stage ran from ``t0`` (:func:`clock`) to now; the job was made at
    ``created_at``."""
    children = _stage_children.get(kind)
    if children is None:  # labels() takes a lock and builds a key: once per kind, not per job
        children = _stage_children[kind] = (
            STAGE_SECONDS.labels(kind),
            JOB_AGE_SECONDS.labels(kind),
        )
    children[0].observe(time.perf_counter() - t0)
    if created_at is not None:
        if created_at.tzinfo is None:  # SQLite hands datetimes back naive (stored as UTC)
            created_at = created_at.replace(tzinfo=UTC)
        age = (now - created_at).total_seconds()
        if age >= 0:
            children[1].observe(age)


_stage_children: dict[str, tuple[Any, Any]] = {}


# --- read when scraped -------------------------------------------------------------------------


@dataclass
class Scraped:
    """The gauges read from the database (and clamd) when scraped, cached a few seconds."""

    db: Database
    cache_seconds: float = 5.0
    ping: Callable[[], Any] | None = None  # clamd's PING (an awaitable of bool), if any
    _at: float = field(default=-1e9)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if now - self._at < self.cache_seconds:
                return
            self._at = now
            try:
                async with self.db.read_session() as s:
                    rows = (
                        await s.execute(
                            select(Job.kind, Job.state, func.count())
                            .where(Job.state.in_((jobs.READY, jobs.RUNNING, jobs.PARKED)))
                            .group_by(Job.kind, Job.state)
                        )
                    ).all()
            except Exception as exc:
                log.warning("metrics: reading the queue depth failed: %s", exc)
            else:
                QUEUE.clear()
                for kind in sorted({*(k.value for k in JobKind), *(r[0] for r in rows)}):
                    for state in (jobs.READY, jobs.RUNNING, jobs.PARKED):
                        QUEUE.labels(kind, state).set(0)
                for kind, state, n in rows:
                    QUEUE.labels(kind, state).set(n)
            if self.ping is not None:
                try:
                    up = bool(await asyncio.wait_for(self.ping(), 3.0))
                except Exception:
                    up = False
                SCANNER_UP.labels("clamd").set(1 if up else 0)


# --- the HTTP server ---------------------------------------------------------------------------

MAX_HEAD = 8192  # bytes of request line and headers read, at most
READ_TIMEOUT = 5.0  # seconds to send the request head
MAX_CLIENTS = 16  # served at once; more wait for their turn


@dataclass
class MetricsServer:
    """The operator port's HTTP/1.0-style server: GET only, one request per connection."""

    db: Database
    scraped: Scraped
    ready: Callable[[], bool]
    server: asyncio.Server | None = None
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CLIENTS))

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._client, host, port, limit=MAX_HEAD)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._slots:
                status, ctype, body = await self._answer(reader)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode("ascii") + body)
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except Exception as exc:
            log.debug("metrics port: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            head = exc.partial  # a request without its blank line (or HTTP/0.9): try its line
        except (asyncio.LimitOverrunError, ValueError):
            return "431 Request Header Fields Too Large", "text/plain", b"too large\n"
        except TimeoutError:
            return "408 Request Timeout", "text/plain", b"timeout\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            await self.scraped.refresh()
            return "200 OK", CONTENT_TYPE_LATEST, exposition()
        if path == b"/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == b"/readyz":
            why = await self._not_ready()
            if why:
                return "503 Service Unavailable", "text/plain", why.encode() + b"\n"
            return "200 OK", "text/plain", b"ready\n"
        return "404 Not Found", "text/plain", b"not found\n"

    async def _not_ready(self) -> str:
        if not self.ready():
            return "listeners not bound yet"
        try:
            async with asyncio.timeout(3.0), self.db.read_session() as s:
                await s.execute(text("SELECT 1"))
        except Exception as exc:
            return f"database unreachable: {type(exc).__name__}"
        return ""


# --- the child processes of `pecd serve` ---------------------------------------------------------

_MULTIPROCESS: CollectorRegistry | None = None
_MULTIPROCESS_PATH: Path | None = None
# Summed over the processes; any other type (the gauges) is this process's own.
_SUMMED = frozenset({"counter", "histogram", "summary"})
_Labels = tuple[tuple[str, str], ...]


def multiprocess_dir() -> Path:
    """A fresh directory for the child processes' counters, named after this process (so that
    what a killed ``pecd serve`` left is told from what a running one uses)."""
    return Path(tempfile.mkdtemp(prefix=f"pecd-metrics-{os.getpid()}-"))


def remove_multiprocess_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class _WithChildren:
    """This process's registry with the counters and histograms the child processes keep under
    a directory added in (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self._children = multiprocess.MultiProcessCollector(None, path=str(path))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        theirs: dict[str, Metric] = {
            m.name: m
            for m in self._children.collect()  # type: ignore[no-untyped-call]
            if m.type in _SUMMED
        }
        for mine in REGISTRY.collect():
            if mine.type in _SUMMED:
                yield _sum(mine, theirs.pop(mine.name, None))
            else:
                yield mine
        for other in theirs.values():  # counted only in children (none today: every counter
            yield _sum(other, None)  # is defined in this module, which this process imports)


def _sum(mine: Metric, theirs: Metric | None) -> Metric:
    """``mine``'s samples, each plus the sample of ``theirs`` of the same name and labels; the
    samples only ``theirs`` has after them; no ``*_created``. A histogram's samples of one
    series (buckets, count, sum) stay together."""
    series: dict[_Labels, dict[tuple[str, _Labels], float]] = {}
    for s in (*mine.samples, *(theirs.samples if theirs is not None else ())):
        if s.name.endswith("_created"):
            continue
        labels = tuple(sorted(s.labels.items()))
        one = series.setdefault(tuple(kv for kv in labels if kv[0] != "le"), {})
        one[(s.name, labels)] = one.get((s.name, labels), 0.0) + s.value
    out = Metric(mine.name, mine.documentation, mine.type, mine.unit)
    out.samples = [
        Sample(name, dict(labels), value)
        for one in series.values()
        for (name, labels), value in one.items()
    ]
    return out


def use_multiprocess(path: Path | None) -> None:
    """Serve this process's metrics with the counters of the child processes kept under
    ``path`` (their ``PROMETHEUS_MULTIPROC_DIR``) added in; None: this process's only again."""
    global _MULTIPROCESS, _MULTIPROCESS_PATH
    _MULTIPROCESS_PATH = path
    if path is None:
        _MULTIPROCESS = None
        return
    registry = CollectorRegistry()
    registry.register(_WithChildren(path))
    _MULTIPROCESS = registry


def process_gone(pid: int) -> None:
    """A child process has exited: drop its live-gauge files (its counters stay summed)."""
    if _MULTIPROCESS_PATH is not None:
        multiprocess.mark_process_dead(pid, str(_MULTIPROCESS_PATH))  # type: ignore[no-untyped-call]


def exposition() -> bytes:
    """The text of ``/metrics``."""
    if _MULTIPROCESS is not None:
        return generate_latest(_MULTIPROCESS)
    return generate_latest()


def scanner_ping(scanner: object) -> Callable[[], Any] | None:
    """clamd's PING, for the ``pecd_scanner_up`` gauge; None when no clamd is used."""
    ping = getattr(scanner, "ping", None)
    return ping if callable(ping) else None


async def start_server(
    db: Database,
    host: str,
    port: int,
    *,
    ready: Callable[[], bool],
    cache_seconds: float,
    ping: Callable[[], Any] | None,
) -> MetricsServer:
    srv = MetricsServer(db, Scraped(db, cache_seconds, ping), ready)
    await srv.start(host, port)
    log.info("metrics on http://%s:%d/metrics", host, srv.port)
    return srv
