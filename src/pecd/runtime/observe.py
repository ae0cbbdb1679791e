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
from collections.abc import Callable, Iterable, Mapping
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


def format_line(row: Row, fmt: str) -> str:
    f = fields(row)
    if fmt == "json":
        return json.dumps(f, ensure_ascii=False, default=str)
    return " ".join(f"{k}={_text_value(v)}" for k, v in f.items() if v not in ("", []))


class MailLog:
    """Where the lines go: standard output (``"-"``) or a file, reopened when moved away."""

    def __init__(self, target: str, fmt: str) -> None:
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

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            try:
                self.logger.info("%s", format_line(row, self.fmt))
            except Exception:
                log.warning("mail log: an event could not be written", exc_info=True)

    def close(self) -> None:
        self.handler.close()


# --- the hook: committed trace rows --------------------------------------------------------------


class Committed:
    """Calls ``sinks`` with the trace rows of each transaction of ``db`` that commits."""

    def __init__(self, db: Database, sinks: list[Callable[[list[Row]], None]]) -> None:
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

    def remove(self) -> None:
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
