"""What operators watch: the mail log (one line per message event, as Postfix's log) and the
metrics, both fed by the trace events **once committed**.

The hook: every trace event is written by ``store.trace.record_sync`` as an INSERT into the
trace table, inside the stage's one transaction (``Database.write``; the timers' too). This module
listens to the SQLAlchemy sessions of one :class:`Database`: the rows of that INSERT are kept on
the session (``do_orm_execute``) and handed on only in ``after_commit``; a rollback drops them.
So an event that was rolled back is never logged nor counted, and no path that records events
(pipeline workers, relay workers, timers) needs a call of its own. On SQLite the commit happens
in the writer thread: the rows are passed to the event loop (``call_soon_threadsafe``), where
the log line is written and the counters move.

:func:`start` installs the hook, opens the mail log and starts the metrics port
(:mod:`pecd.runtime.metrics`); the exit stack undoes all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import ORMExecuteState, Session

from pecd.config import Config
from pecd.engine.vocab import TraceType
from pecd.runtime import metrics
from pecd.store.db import Database
from pecd.store.models import TraceEvent, table_of

log = logging.getLogger(__name__)

_TRACE = table_of(TraceEvent)
_PENDING = "pecd.observe.pending"

#: What happened, in one word, for each trace event (the ``status=`` of the mail log).
STATUS: Mapping[str, str] = {
    TraceType.ACCETTAZIONE.value: "accepted",
    TraceType.NON_ACCETTAZIONE.value: "not-accepted",
    TraceType.PRESA_IN_CARICO.value: "taken-in-charge",
    TraceType.AVVENUTA_CONSEGNA.value: "delivered",
    TraceType.ERRORE_CONSEGNA.value: "not-delivered",
    TraceType.PREAVVISO_ERRORE_CONSEGNA.value: "delivery-warning",
    TraceType.RILEVAZIONE_VIRUS.value: "virus-notice",
    TraceType.POSTA_CERTIFICATA.value: "envelope",
    TraceType.RICEZIONE.value: "received",
    TraceType.RICEVUTA_RICEVUTA.value: "receipt-received",
    TraceType.RICEVUTA_SCONOSCIUTA.value: "receipt-unknown",
    TraceType.ANOMALIA.value: "anomaly",
    TraceType.VIRUS.value: "virus",
    TraceType.DSN.value: "dsn",
    TraceType.DUPLICATE.value: "duplicate",
    TraceType.RELAYED.value: "relayed",
    TraceType.RELAY_FAILED.value: "relay-failed",
    TraceType.RELAY_RETRY.value: "relay-deferred",
}

Row = Mapping[str, Any]


# --- the mail log ------------------------------------------------------------------------------


def fields(row: Row) -> dict[str, Any]:
    """The mail log's fields of one trace row (as inserted), in their order."""
    data = row.get("data") or {}
    everyone = [
        str(r.get("address", "")) for r in row.get("recipients") or () if isinstance(r, dict)
    ]
    # A per-recipient event (a delivery, an esito) names its recipient; else everyone.
    one = data.get("consegna") if isinstance(data, dict) else None
    at = row.get("at")
    out: dict[str, Any] = {
        "at": at.isoformat() if isinstance(at, datetime) else str(at or ""),
        "event": row.get("event") or "",
        "status": STATUS.get(str(row.get("event")), "other"),
        "pec_msgid": row.get("pec_msgid") or "",
        "client_msgid": row.get("client_msgid") or "",
        "from": row.get("sender") or "",
        "to": [str(one)] if one else everyone,
    }
    if isinstance(data, dict):
        for key in ("to", "esterni"):
            if key in data and not one:
                v = data[key]
                out["to"] = [str(x) for x in v] if isinstance(v, list) else [str(v)]
        if "attempt" in data:
            out["attempt"] = data["attempt"]
    if row.get("generated_ids"):
        out["generated"] = list(row["generated_ids"])
    if row.get("error"):
        out["error"] = row["error"]
    if row.get("node"):
        out["node"] = row["node"]
    return out


_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")  # printable ASCII but space, '"', '=' and '\'


def _text_value(v: Any) -> str:
    s = ",".join(str(x) for x in v) if isinstance(v, list) else str(v)
    return s if _PLAIN.fullmatch(s) else json.dumps(s)


def render(f: Mapping[str, Any], fmt: str) -> str:
    """One mail log line of fields ``f``: JSON, or ``key=value`` (empty values left out)."""
    if fmt == "json":
        return json.dumps(f, ensure_ascii=False, default=str)
    return " ".join(f"{k}={_text_value(v)}" for k, v in f.items() if v not in ("", []))


def format_line(row: Row, fmt: str) -> str:
    return render(fields(row), fmt)


class MailLog:
    """Where the lines go: standard output (``"-"``) or a file, reopened when moved away. While
    open, it is this process's mail log for ``target``: the SMTP points' refusals (which no trace
    event carries) find it there (:func:`refused`), however the process opened it."""

    def __init__(self, target: str, fmt: str) -> None:
        self.target = target
        self.fmt = fmt
        handler: logging.Handler
        if target == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.handler = handler
        # A logger of its own, outside logging's tree: nothing else writes here, and the lines
        # never reach the root logger's handlers.
        self.logger = logging.Logger("pecd.maillog", logging.INFO)
        self.logger.propagate = False
        self.logger.addHandler(handler)
        self.refusals = RefusalLog(self)
        _OPEN[target] = self

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            try:
                self.logger.info("%s", format_line(row, self.fmt))
            except Exception:
                log.warning("mail log: an event could not be written", exc_info=True)

    def line(self, f: Mapping[str, Any]) -> None:
        """One line of fields ``f`` (not a trace row: an SMTP refusal, say)."""
        try:
            self.logger.info("%s", render(f, self.fmt))
        except Exception:
            log.warning("mail log: a line could not be written", exc_info=True)

    def close(self) -> None:
        if _OPEN.get(self.target) is self:
            del _OPEN[self.target]
        self.refusals.close()
        self.handler.close()


# The mail logs open in this process, by target (a file, or "-").
_OPEN: dict[str, MailLog] = {}


# --- SMTP refusals: before any trace event ------------------------------------------------------

#: The mail log's ``event`` of a message or connection refused at the SMTP level, before any
#: trace event (Postfix's ``NOQUEUE: reject:``), and of the line that sums up those left out.
SMTP_REFUSED = "smtp-refused"
REFUSALS_PER_INTERVAL = 200  # lines at most per interval; past it, counted
REFUSALS_PER_CLIENT = 20  # lines at most per client address and interval: one hammering
# client cannot use up the lines that other clients' refusals need
_MAX_CLIENTS_TRACKED = 4096  # per interval; beyond, new clients share the overall budget only
REFUSAL_INTERVAL_SECONDS = 60.0
_MAX_ADDRESS = 320  # what a line keeps of a client-given address (RFC 5321's limits)
_MAX_RECIPIENTS = 50  # recipients named on a refused DATA's line; the rest counted

_REPLY = re.compile(r"(\d{3})[ -](?:([245]\.\d{1,3}\.\d{1,3}) )?(.*)", re.DOTALL)


def split_reply(reply: str) -> tuple[str, str, str]:
    """(code, enhanced code or "", text) of an SMTP reply line."""
    m = _REPLY.fullmatch(reply.strip())
    if m is None:
        return reply[:3], "", reply[4:].strip()
    return m[1], m[2] or "", m[3].strip()


@dataclass(frozen=True, slots=True)
class Refusal:
    """An SMTP reply that refused a command of a transaction (MAIL, RCPT, DATA) or closed the
    connection (421), as the mail log tells it. ``command`` is "" for a connection refused
    before any command (too many connections)."""

    at: datetime
    point: str  # "access" or "reception"
    command: str
    client: str
    user: str | None
    sender: str | None
    recipients: tuple[str, ...]
    reply: str

    def fields(self) -> dict[str, Any]:
        code, enhanced, reason = split_reply(self.reply)
        rcpts = [r[:_MAX_ADDRESS] for r in self.recipients[:_MAX_RECIPIENTS]]
        out: dict[str, Any] = {
            "at": self.at.isoformat(),
            "event": SMTP_REFUSED,
            "status": "refused",
            "point": self.point,
            "command": self.command,
            "client": self.client,
            "user": self.user or "",
            "from": (self.sender or "")[:_MAX_ADDRESS],
            "to": rcpts,
            "code": code,
            "enhanced": enhanced,
            "reason": reason,
        }
        if len(self.recipients) > _MAX_RECIPIENTS:
            out["to_more"] = len(self.recipients) - _MAX_RECIPIENTS
        return out


class RefusalLog:
    """Refusals into a mail log, rate-safe: at most ``burst`` lines per ``interval`` seconds,
    and at most ``per_client`` of them for one client address; past that they are counted, and
    one line says how many were left out (and their codes) when the interval ends, so that a
    flood of refusals (a client hammering, an outage answering 451 to everybody) is a bounded
    number of lines, and one client's flood does not hide the others' refusals."""

    def __init__(
        self,
        mail_log: MailLog,
        *,
        burst: int = REFUSALS_PER_INTERVAL,
        per_client: int = REFUSALS_PER_CLIENT,
        interval: float = REFUSAL_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mail_log = mail_log
        self.burst = burst
        self.per_client = per_client
        self.interval = interval
        self._by_client: Counter[str] = Counter()  # lines written this interval, per client
        self.clock = clock
        self._start = clock()
        self._written = 0
        self._left_out: Counter[str] = Counter()  # code -> refusals not written this interval
        self._last_at: datetime | None = None
        self._timer: asyncio.TimerHandle | None = None

    def write(self, r: Refusal) -> None:
        now = self.clock()
        if now - self._start >= self.interval:
            self.flush(now)
        if self._written < self.burst and self._client_may(r.client):
            self._written += 1
            self.mail_log.line(r.fields())
            return
        self._left_out[split_reply(r.reply)[0]] += 1
        self._last_at = r.at
        if self._timer is None:
            # The summary goes out when the interval ends, even if the flood has stopped.
            with contextlib.suppress(RuntimeError):  # no loop (a synchronous caller)
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(
                    max(0.0, self._start + self.interval - now), self._interval_over
                )

    def _client_may(self, client: str) -> bool:
        """Whether ``client`` has lines left this interval (and count this one)."""
        if client not in self._by_client and len(self._by_client) >= _MAX_CLIENTS_TRACKED:
            return True  # many clients at once: the overall budget bounds them
        if self._by_client[client] >= self.per_client:
            return False
        self._by_client[client] += 1
        return True

    def _interval_over(self) -> None:
        self._timer = None
        self.flush()

    def flush(self, now: float | None = None) -> None:
        """End the interval: the line of what was left out, if anything was."""
        if self._left_out:
            at = self._last_at
            self.mail_log.line(
                {
                    "at": at.isoformat() if at is not None else "",
                    "event": SMTP_REFUSED,
                    "status": "suppressed",
                    "suppressed": sum(self._left_out.values()),
                    "codes": ",".join(f"{c}:{n}" for c, n in sorted(self._left_out.items())),
                }
            )
        self._left_out.clear()
        self._by_client.clear()
        self._written = 0
        self._start = self.clock() if now is None else now

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


def refused(cfg: Config, r: Refusal) -> None:
    """An SMTP refusal: counted (``pecd_smtp_refused_total``) and, when this process has the
    configured mail log open, one line in it (rate-limited)."""
    metrics.smtp_refused(r.point, split_reply(r.reply)[0])
    if cfg.log.mail_log and (mail_log := _OPEN.get(cfg.log.mail_log)) is not None:
        mail_log.refusals.write(r)


# --- the hook: committed trace rows --------------------------------------------------------------


class Committed:
    """Calls ``sinks`` with the trace rows of each transaction of ``db`` that commits."""

    def __init__(self, db: Database, sinks: list[Callable[[list[Row]], None]]) -> None:
        self.db = db
        self.sinks = sinks
        self.loop = asyncio.get_running_loop()
        engines: set[Engine] = {db.engine.sync_engine}
        writer = getattr(db, "_writer", None)  # SQLite's synchronous writer engine
        if isinstance(writer, Engine):
            engines.add(writer)
        self.engines = engines

    def install(self) -> None:
        event.listen(Session, "do_orm_execute", self._executed)
        event.listen(Session, "after_commit", self._committed)
        event.listen(Session, "after_rollback", self._rolled_back)
        _HOOKS[id(self.db)] = self

    def remove(self) -> None:
        if _HOOKS.get(id(self.db)) is self:
            del _HOOKS[id(self.db)]
        for name, fn in (
            ("do_orm_execute", self._executed),
            ("after_commit", self._committed),
            ("after_rollback", self._rolled_back),
        ):
            with contextlib.suppress(Exception):
                event.remove(Session, name, fn)

    def _executed(self, state: ORMExecuteState) -> None:
        stmt = state.statement
        if not isinstance(stmt, Insert) or stmt.table is not _TRACE:
            return
        if state.session.get_bind() not in self.engines:
            return
        params = state.parameters
        rows = params if isinstance(params, list) else [params] if params else []
        state.session.info.setdefault(_PENDING, []).extend(rows)

    def _committed(self, session: Session) -> None:
        rows = session.info.pop(_PENDING, None)
        if rows:
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                self.loop.call_soon_threadsafe(self._deliver, rows)

    def _rolled_back(self, session: Session) -> None:
        session.info.pop(_PENDING, None)

    def _deliver(self, rows: list[Row]) -> None:
        for sink in self.sinks:
            try:
                sink(rows)
            except Exception:
                log.warning("observing %d committed events failed", len(rows), exc_info=True)


# The installed hooks, by database: for the commits that bypass SQLAlchemy's sessions.
_HOOKS: dict[int, Committed] = {}


def committed(db: Database, rows: Iterable[Row]) -> None:
    """Trace rows that ``db`` committed without a SQLAlchemy session (PostgreSQL's one-statement
    stage commit, :mod:`pecd.store.pgfast`), observed as a session's would be: the caller hands
    them over, on the event loop, once the commit has returned, and only the rows inserted (an
    event that depended on a job that already existed was not). Nothing when no hook is
    installed (neither a mail log nor a metrics port): ``rows`` may be a generator, not even
    run then."""
    hook = _HOOKS.get(id(db))
    if hook is not None and (found := list(rows)):
        hook._deliver(found)


def count(rows: list[Row]) -> None:
    for row in rows:
        metrics.count_event(str(row.get("event")))


# --- wiring --------------------------------------------------------------------------------------


def serving(*points: object) -> bool:
    """Whether the listening sockets of ``points`` (an access point's ``servers``, a reception
    point's ``server``) all still accept connections: not once the drain has closed them."""
    for point in points:
        if point is None:
            continue
        found = dict(getattr(point, "servers", None) or {})
        if (one := getattr(point, "server", None)) is not None:
            found["server"] = one
        if not all(isinstance(s, asyncio.Server) and s.is_serving() for s in found.values()):
            return False
    return True


async def start(
    cfg: Config,
    db: Database,
    stack: contextlib.AsyncExitStack,
    *,
    ready: Callable[[], bool],
    ping: Callable[[], Any] | None = None,
) -> metrics.MetricsServer | None:
    """Install the committed-events hook (the counters, and the mail log if configured) and start
    the metrics port if configured; with neither configured, nothing. ``stack`` undoes it all."""
    listen = cfg.metrics.listen
    if listen is None and not cfg.log.mail_log:
        return None  # neither is wanted: no hook on the hot path
    sinks: list[Callable[[list[Row]], None]] = [count]
    if cfg.log.mail_log:
        mail_log = MailLog(cfg.log.mail_log, cfg.log.mail_log_format)
        stack.callback(mail_log.close)
        sinks.append(mail_log.write)
    hook = Committed(db, sinks)
    hook.install()
    stack.callback(hook.remove)
    if listen is None:
        return None
    srv = await metrics.start_server(
        db,
        listen.host,
        listen.port,
        ready=ready,
        cache_seconds=cfg.metrics.queue_cache_seconds,
        ping=ping,
    )
    stack.push_async_callback(srv.close)
    return srv
