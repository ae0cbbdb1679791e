"""Listening for the mailbox protocols (IMAP, POP3): on a socket bound before, or on host/port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable

__all__ = ["bound_ports", "buffered_bytes", "listen", "stop_serving"]

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def listen(
    callback: ClientConnected,
    *,
    sock: socket.socket | None,
    host: str,
    port: int | None,
    tls: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    limit: int,
) -> asyncio.Server:
    """``asyncio.start_server`` on ``sock`` if there is one (bound before, by the supervisor),
    else on ``host``:``port``; ``tls`` for implicit TLS, ``None`` for plaintext."""
    if sock is not None:
        return await asyncio.start_server(
            callback, sock=sock, ssl=tls, ssl_handshake_timeout=ssl_handshake_timeout, limit=limit
        )
    return await asyncio.start_server(
        callback,
        host,
        port,
        ssl=tls,
        ssl_handshake_timeout=ssl_handshake_timeout,
        limit=limit,
        reuse_address=True,
    )


def bound_ports(servers: Iterable[asyncio.Server | None]) -> list[int]:
    """The ports ``servers`` listen on, each once, in order (a ``None`` server is skipped)."""
    ports: list[int] = []
    for server in servers:
        if server is None:
            continue
        for sock in server.sockets:
            port = int(sock.getsockname()[1])
            if port not in ports:
                ports.append(port)
    return ports


async def stop_serving(
    servers: Iterable[asyncio.Server | None],
    connections: Iterable[asyncio.Task[None]],
    *,
    wait: float = 5.0,
) -> None:
    """Stop listening, cancel every connection task and wait for them (at most ``wait``
    seconds), then close what is left. Since Python 3.12 ``Server.wait_closed`` also waits for
    every connection's transport; a TLS peer that never answers close_notify would hold it for
    the SSL shutdown timeout, so what is still open after the wait is aborted (3.13's
    ``abort_clients``) and the wait for the server itself is bounded too."""
    live = [s for s in servers if s is not None]
    for server in live:
        server.close()
    tasks = [t for t in connections if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=wait)
    for server in live:
        abort = getattr(server, "abort_clients", None)
        if abort is not None:
            abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await server.wait_closed()


def buffered_bytes(reader: asyncio.StreamReader) -> int:
    """Bytes received and not read yet (a client that pipelined commands after STARTTLS/STLS:
    CVE-2011-0411). The StreamReader has no public call for it; if its internals ever change
    this raises, so the check fails closed, never open."""
    buffer = vars(reader).get("_buffer")
    if not isinstance(buffer, bytes | bytearray):
        raise RuntimeError("cannot inspect the stream buffer before starting TLS")
    return len(buffer)
