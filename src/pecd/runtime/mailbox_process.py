"""Entry point of the mailbox process (IMAP and POP3): ``python -m pecd.runtime.mailbox_process FD``.

Started only by :class:`pecd.runtime.supervisor.MailboxSupervisor`. ``FD`` is its end of the
control socket: the first line read from it is JSON with the config, the inherited listening
sockets (name -> file descriptor) and the debug switch; the process answers ``ready`` once it
serves them, then a heartbeat line every ``mailbox.heartbeat_seconds`` from its event loop. It
stops on SIGTERM/SIGINT, and when the control socket reaches end-of-file (the parent is gone).
Its logins (``imap``, ``pop3``) are counted in the files of ``PROMETHEUS_MULTIPROC_DIR``, which
the parent sets when it serves metrics and sums on its port (``pecd.runtime.metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

from pecd.config import Config
from pecd.runtime import child

log = logging.getLogger("pecd.mailbox")


async def _serve(
    cfg: Config, listeners: dict[str, int], started: asyncio.Event, stop: asyncio.Event
) -> None:
    from pecd.guard import Guard
    from pecd.imap.service import ImapService
    from pecd.mailbox.maildir import MaildirStore
    from pecd.runtime.tls import server_tls_context
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database

    socks = {name: socket.socket(fileno=fd) for name, fd in listeners.items()}
    for sock in socks.values():
        sock.setblocking(False)
    lst = cfg.listeners
    async with contextlib.AsyncExitStack() as stack:
        db = await Database.open(cfg.database_url)
        stack.push_async_callback(db.close)
        accounts = Accounts(db, max_hash_checks=cfg.security.max_hash_checks)
        # One Guard for both protocols (a guesser gets no more tries by switching), each
        # counting its logins under its own name.
        guard = Guard(cfg.security)
        store = MaildirStore(cfg.maildir_root)
        tls = server_tls_context(cfg)
        if "imaps" in socks or "imap" in socks:
            imap = ImapService(
                store=store,
                auth=accounts,
                tls_context=tls,
                hostname=lst.hostname,
                guard=guard.speaking("imap"),
                limits=cfg.mailbox,
                max_message_size=cfg.limits.max_message_size,
                sock=socks.get("imaps"),
                starttls_sock=socks.get("imap"),
                port=0 if "imaps" in socks else None,
                starttls_port=0 if "imap" in socks else None,
            )
            await imap.start(stack)
        if "pop3s" in socks or "pop3" in socks:
            from pecd.pop3 import Pop3Service

            pop3 = Pop3Service(
                store=store,
                auth=accounts,
                tls_context=tls,
                guard=guard.speaking("pop3"),
                limits=cfg.mailbox,
                hostname=lst.hostname,
                sock=socks.get("pop3s"),
                stls_sock=socks.get("pop3"),
                port=0 if "pop3s" in socks else None,
                stls_port=0 if "pop3" in socks else None,
            )
            await pop3.start(stack)
        started.set()
        await stop.wait()
        log.info("mailbox process stopping")


async def _main(ctrl_fd: int) -> int:
    cfg, data, reader, writer = await child.hello(ctrl_fd, "mailbox")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = asyncio.Event()
    serving = asyncio.create_task(_serve(cfg, data["listeners"], started, stop))
    watch = asyncio.create_task(child.watch_parent(reader, stop.set))
    try:
        await child.beat(writer, serving, started.is_set, cfg.mailbox.heartbeat_seconds)
        return 0
    finally:
        watch.cancel()
        writer.close()


def main(argv: list[str]) -> int:
    return child.main(argv, "mailbox process", _main)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
