"""Listening for the mailbox protocols (IMAP, POP3): on a socket bound before, or on host/port."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable

__all__ = ["bound_ports", "listen"]

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
