"""What the two SMTP points (access and reception) share: reply codes, address and trace-header
helpers, and the listener lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import Session


class Reply:
    """SMTP replies pecd gives, named once (aiosmtpd's statuscodes habit)."""

    AUTH_OK = "235 2.7.0 Authentication successful"
    AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
    AUTH_REQUIRED = "530 5.7.0 Authentication required"
    SENDER_NOT_OWNED = "553 5.7.1 Sender address does not belong to the authenticated mailbox"
    RELAY_DENIED = "550 5.7.1 Relaying denied: not a domain of this provider"
    BAD_ADDRESS = "553 5.1.3 Not a valid mail address"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    NO_RCPTS = "554 5.5.1 No valid recipients"
    TEMP_FAILURE = "451 4.3.0 Temporary failure, message not accepted; try again later"
    OK = "250 2.1.0 OK"
    RCPT_OK = "250 2.1.5 OK"

    @staticmethod
    def queued(key: str) -> str:
        return f"250 2.0.0 OK: queued as {key}"


def bare(address: str) -> str:
    """``<Foo@Example.it>`` -> ``foo@example.it``."""
    return address.strip().strip("<>").strip().lower()


def valid_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and "." in domain and " " not in address)


def peer_of(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)


def received_header(
    session: Session, *, by: str, protocol: str, key: str, now: datetime, rcpt: str | None = None
) -> bytes:
    """The ``Received:`` field this hop prepends (RFC 5321 4.4)."""
    for_ = f"\r\n\tfor <{rcpt}>" if rcpt else ""
    return (
        f"Received: from {session.host_name or 'unknown'} ([{peer_of(session)}])\r\n"
        f"\tby {by} (pecd) with {protocol} id {key}{for_}; {format_datetime(now)}\r\n"
    ).encode()


def bound_port(server: asyncio.Server) -> int:
    sockets: Sequence[Any] = server.sockets
    return int(sockets[0].getsockname()[1])


async def close_servers(servers: Sequence[asyncio.Server]) -> None:
    for srv in servers:
        srv.close()
    for srv in servers:
        with contextlib.suppress(Exception):
            await srv.wait_closed()
