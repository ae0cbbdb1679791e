"""Entry point of the web process (HTTPS): ``python -m pecd.runtime.web_process FD``.

Started only by :class:`pecd.runtime.supervisor.WebSupervisor`, with the protocol of the mailbox
process (``pecd.runtime.mailbox_process``): ``FD`` is its end of the control socket; the first
line read from it is JSON with the config, the inherited listening socket (``{"https": fd}``) and
the debug switch; the process answers ``ready`` once uvicorn serves the application
(``pecd.web.app.make_app``) on that socket with the ``[tls]`` certificate (connection limits and
deadlines against slow clients: ``pecd.runtime.web_protocol``), then a heartbeat line
every ``mailbox.heartbeat_seconds`` from its event loop, and a ``wake`` line whenever the
application has committed a job (``pecd.web.submit``), so that the parent's pipeline takes it
at once. It stops on SIGTERM/SIGINT, and when the
control socket reaches end-of-file (the parent is gone): uvicorn stops accepting, lets the
requests in progress finish (up to the drain time) and exits. Its logins (``web``) are counted
as the mailbox process counts its own: summed on the parent's metrics port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from pecd.config import Config
from pecd.runtime import child
from pecd.runtime.web_protocol import WebLimits, WebServer

log = logging.getLogger("pecd.web")


def _server(cfg: Config, debug: bool) -> WebServer:
    from pecd.runtime.tls import server_tls_context
    from pecd.web.app import make_app

    # The listener's limits (pecd.runtime.web_protocol): connections admitted by the app's
    # Guard (cfg.security), deadlines for the handshake, the head and the body.
    return WebServer(
        make_app(cfg),
        server_tls_context(cfg),
        security=cfg.security,
        limits=WebLimits(),
        access_log=debug,
        graceful_seconds=max(1, int(cfg.queue.drain_seconds) - 1),
    )


async def _main(ctrl_fd: int) -> int:
    cfg, data, reader, writer = await child.hello(ctrl_fd, "web")
    socks = [socket.socket(fileno=fd) for fd in data["listeners"].values()]
    for sock in socks:
        sock.setblocking(False)
    server = _server(cfg, bool(data.get("debug")))
    # What the application commits (pecd.web.submit) wakes the parent's workers at once.
    from pecd.web.submit import set_waker

    set_waker(child.waker(writer))

    def stop() -> None:
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    serving = asyncio.create_task(server.serve(sockets=socks))
    watch = asyncio.create_task(child.watch_parent(reader, stop))
    try:
        if not await child.beat(
            writer, serving, lambda: bool(server.started), cfg.mailbox.heartbeat_seconds
        ):
            return 1  # uvicorn gave up before serving (it logged why)
        log.info("web process stopped")
        return 0
    finally:
        watch.cancel()
        writer.close()


def main(argv: list[str]) -> int:
    return child.main(argv, "web process", _main)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
