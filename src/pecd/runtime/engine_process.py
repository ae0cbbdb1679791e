"""Entry point of an engine process: ``python -m pecd.runtime.engine_process FD``.

Started only by :class:`pecd.runtime.supervisor.EngineSupervisor` when ``[serve] processes`` is
more than 1, with the protocol of the mailbox process (``pecd.runtime.mailbox_process``): ``FD``
is its end of the control socket; the first line read from it is JSON with the config, the SMTP
listening sockets its parent bound (``smtps``, ``submission``, ``reception``: name -> inherited
file descriptor), the debug switch, its ``index`` and its ``worker_prefix``. (When the parent
serves metrics, the process starts with ``PROMETHEUS_MULTIPROC_DIR`` set, as every child of
``pecd serve``: its counters go to files the parent sums, see ``pecd.runtime.metrics``.) It runs
an :class:`pecd.app.App` in the engine role: the access and reception points on those sockets,
its own pipeline, relay and webhook workers, its own format processes, a node heartbeat of its
own (PostgreSQL), and the timers and sealer when it holds the leader lock. It answers ``ready``
once it serves, then a heartbeat line every ``mailbox.heartbeat_seconds`` from its event loop.

Lines from the parent: ``wake`` (a job was committed in another process: look for work now) and
``reload`` (SIGHUP of ``pecd serve``: reload the provider index). It stops, draining as
``pecd serve`` does (421 to open SMTP sessions, workers finish their stage), on SIGTERM from the
parent and when the control socket reaches end-of-file (the parent is gone). It runs in a session
of its own, so the signals of the parent's process group do not reach it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from pecd.runtime import child

log = logging.getLogger("pecd.engine")


async def _commands(reader: asyncio.StreamReader, app: Any, stop: asyncio.Event) -> None:
    """The parent's lines, until its end of the control socket closes (then stop)."""
    while line := await reader.readline():
        if line == b"wake\n" and app.runner is not None:
            app.runner.wake.set()
            app.runner.relay_wake.set()
            app.runner.webhook_wake.set()
        elif line == b"reload\n" and app.index is not None:
            asyncio.get_running_loop().create_task(app.index.reload())
    # End of file: `pecd serve` is gone (its stop would have come as SIGTERM, with the socket
    # still open). Exit at once, as if killed with it, rather than drain: a new `pecd serve` on
    # SQLite frees every running job at its start, and a relay still running here would then go
    # out twice. What this process held runs again (every stage is idempotent); its format
    # processes die with it (PR_SET_PDEATHSIG); its SMTP clients got no 250 for what was cut.
    log.warning("pecd serve is gone: this engine process exits at once")
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


async def _main(ctrl_fd: int) -> int:
    cfg, data, reader, writer = await child.hello(ctrl_fd, "engine")
    index = int(data["index"])
    if not data.get("debug"):
        # As `pecd serve` does: aiosmtpd's INFO lines repeat every SMTP command.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # say which engine process wrote each line
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s [engine {index} pid {os.getpid()}] "
                "%(name)s: %(message)s"
            )
        )
    from pecd.app import App, EngineRole

    socks = {name: socket.socket(fileno=fd) for name, fd in data["listeners"].items()}
    for sock in socks.values():
        sock.setblocking(False)
    formats = data.get("format_processes")
    role = EngineRole(
        index=index,
        sockets=socks,
        worker_prefix=str(data["worker_prefix"]),
        format_processes=int(formats) if formats is not None else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = asyncio.Event()
    app = App(cfg, role=role)

    async def serve() -> None:
        async with app:
            started.set()
            log.info("engine process %d serving (workers %s:...)", index, role.worker_prefix)
            await stop.wait()
            accepted = app.access.accepted if app.access is not None else 0
            log.info("engine process %d stopping; it took %d SMTP connections", index, accepted)

    serving = asyncio.create_task(serve())
    commands = asyncio.create_task(_commands(reader, app, stop))
    try:
        if not await child.beat(writer, serving, started.is_set, cfg.mailbox.heartbeat_seconds):
            return 1
        return 0
    finally:
        commands.cancel()
        writer.close()


def main(argv: list[str]) -> int:
    return child.main(argv, "engine process", _main)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
