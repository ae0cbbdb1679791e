"""The IMAPS service: pymap's IMAP protocol over the pecd Maildir store, on implicit TLS and STARTTLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
import uuid
from contextlib import AsyncExitStack, closing
from functools import partial

from proxyprotocol.sock import SocketInfo
from pymap.context import connection_exit

from pecd.config import MailboxConfig
from pecd.guard import Admission, Guard
from pecd.imap.backend import Authenticator, PecdImapConfig, PecdLogin
from pecd.imap.connection import ConnectionLimits, PecdConnection
from pecd.imap.state import PecdCommands, PecdConnectionState
from pecd.mailbox.maildir import MaildirStore
from pecd.runtime.listen import bound_ports, listen, stop_serving

__all__ = ["ImapService"]

_log = logging.getLogger(__name__)


_TOO_MANY = b"* BYE [UNAVAILABLE] Too many connections\r\n"


class ImapService:
    """IMAP for mailbox holders: implicit TLS on ``port`` (993), optional STARTTLS listener.

    Logins are checked through ``auth`` (pecd accounts); each holder sees the Maildir at
    ``store.path_for(address)``. Port 0 binds an ephemeral port (see ``bound_ports``).
    """

    def __init__(
        self,
        *,
        store: MaildirStore,
        auth: Authenticator,
        tls_context: ssl.SSLContext | None,
        host: str = "127.0.0.1",
        port: int | None = 993,
        starttls_port: int | None = None,
        hostname: str | None = None,
        failed_login_delay: float = 1.0,
        guard: Guard | None = None,
        limits: MailboxConfig | None = None,
        max_message_size: int = 100 * 1024 * 1024,
        sock: socket.socket | None = None,
        starttls_sock: socket.socket | None = None,
    ) -> None:
        if tls_context is None:
            raise ValueError(
                "IMAP needs a TLS certificate: set the TLS certificate and key in the config"
            )
        self.store = store
        self.host = host
        self.port = port
        self.starttls_port = starttls_port
        self._tls = tls_context
        # Pre-bound listening sockets (the supervised mailbox process gets them from its parent).
        self._sock = sock
        self._starttls_sock = starttls_sock
        self.guard = guard
        self.limits = limits
        self.max_message_size = max_message_size
        name = hostname or (host if host not in ("", "0.0.0.0", "::") else socket.gethostname())

        def config(tls_enabled: bool, listen_port: int) -> PecdImapConfig:
            return PecdImapConfig(
                store=store,
                ssl_context=tls_context,
                tls_enabled=tls_enabled,
                host=host,
                port=listen_port,
                hostname=name,
                failed_login_delay=failed_login_delay,
            )

        self._implicit = config(False, port or 0) if port is not None or sock is not None else None
        self._starttls = (
            config(True, starttls_port or 0)
            if starttls_port is not None or starttls_sock is not None
            else None
        )
        # One login for both listeners; it reads only invalid_user_sleep from the config.
        self._login = PecdLogin(
            auth, self._implicit or self._starttls or config(False, 0), guard=guard
        )
        mb = limits if limits is not None else MailboxConfig()
        self._limits = ConnectionLimits(
            max_line=mb.max_line_length,
            max_literal_unauthenticated=mb.max_literal_unauthenticated,
            max_message=max_message_size,
            idle_unauthenticated=mb.idle_timeout_unauthenticated,
            idle_authenticated=mb.idle_timeout_authenticated,
            disconnect_after_failures=guard.disconnect_after if guard is not None else 0,
        )
        self._commands = PecdCommands()
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def bound_ports(self) -> list[int]:
        """The ports actually listened on: implicit TLS first, then STARTTLS (if any)."""
        return bound_ports(self._servers)

    async def start(self, stack: AsyncExitStack) -> None:
        """Listen; on stack exit stop listening and close every open connection."""
        self._warn_tmpdir()
        await asyncio.to_thread(self.store.root.mkdir, parents=True, exist_ok=True)
        stack.push_async_callback(self._stop)
        if self._implicit is not None:
            self._servers.append(
                await listen(
                    partial(self._serve, self._implicit),
                    sock=self._sock,
                    host=self.host,
                    port=self.port,
                    tls=self._tls,
                    # A handshake that never completes holds a socket: no longer than an idle
                    # client before login may.
                    ssl_handshake_timeout=self._limits.idle_unauthenticated,
                    limit=self._limits.max_line,
                )
            )
        if self._starttls is not None:
            self._servers.append(
                await listen(
                    partial(self._serve, self._starttls),
                    sock=self._starttls_sock,
                    host=self.host,
                    port=self.starttls_port,
                    limit=self._limits.max_line,
                )
            )
        _log.info("IMAP listening on %s ports %s", self.host, self.bound_ports)

    async def _stop(self) -> None:
        await stop_serving(self._servers, list(self._connections))
        self._servers.clear()

    async def _serve(
        self, config: PecdImapConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        admission: Admission | None = None
        try:
            if self.guard is not None:
                peer = writer.get_extra_info("peername")
                host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
                listener = "imap" if config is self._starttls else "imaps"
                admission = self.guard.admit(listener, host)
                if admission is None:
                    writer.write(_TOO_MANY)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.drain(), 5)
                    return
            config.apply_context()
            sock_info = SocketInfo.get(writer, None, unique_id=uuid.uuid4().bytes)
            conn = PecdConnection(
                self._commands, config, reader, writer, sock_info, limits=self._limits
            )
            state = PecdConnectionState(self._login, config, max_message=self._limits.max_message)
            async with AsyncExitStack() as conn_stack:
                connection_exit.set(conn_stack)
                conn_stack.enter_context(closing(conn))
                await conn.run(state)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            # One line per failed session; the traceback only in the debug log.
            _log.warning("IMAP connection failed: %s: %s", type(exc).__name__, exc)
            _log.debug("IMAP connection failure", exc_info=True)
        finally:
            if admission is not None:
                admission.release()
            self._connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    def _warn_tmpdir(self) -> None:
        # pymap rewrites dovecot-uidlist by writing a temporary file in the system temporary
        # directory and renaming it into the Maildir: that rename fails across filesystems.
        try:
            store_dev = os.stat(
                self.store.root if self.store.root.exists() else self.store.root.parent
            ).st_dev
            tmp_dev = os.stat(tempfile.gettempdir()).st_dev
        except OSError:
            return
        if store_dev != tmp_dev:
            _log.warning(
                "IMAP: the mail directory %s and the temporary directory %s are on different "
                "filesystems; set TMPDIR to a directory on the mail filesystem",
                self.store.root,
                tempfile.gettempdir(),
            )
