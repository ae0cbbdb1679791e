"""The scanners that answer the engine's ``Scan`` command.

``ClamdScanner`` speaks clamd's INSTREAM protocol itself (``man clamd``), over a unix socket or
TCP: ``zINSTREAM\\0``, then the data in chunks each preceded by its length (4 bytes, big-endian),
then a zero length; clamd answers one NUL-terminated line, ``stream: OK``,
``stream: <signature> FOUND`` or ``<reason> ERROR``. It is 60 lines; the client library
aioclamd (1.1) was not taken because it connects over TCP only (clamd's usual and pecd's own
setup is a unix socket), has no type annotations (mypy --strict), sends 1 KiB chunks each read
through a thread, and returns None for an empty reply instead of failing.

Never clean unless clamd said ``OK``: every other outcome raises ``ScannerUnavailable`` (the
engine's stage then fails this attempt and the job is retried, visible in ``pecd queue list`` and
in the log): no connection, a timeout, an ``ERROR`` reply (such as clamd's ``INSTREAM size limit
exceeded``), a reply that is not clamd's, data larger than ``max_scan_size``, and a
``Heuristics.Limits.Exceeded.*`` verdict (clamd with ``AlertExceedsMax yes`` could not scan all
of it: not clean, and not a virus either).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pecd.engine.effects import CLEAN, Scanned, Unavailable

if TYPE_CHECKING:
    from pecd.config import AntivirusConfig, Config

__all__ = [
    "ClamdScanner",
    "NullScanner",
    "Scanner",
    "ScannerUnavailable",
    "make_scanner",
]

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # bytes per INSTREAM chunk
MAX_REPLY = 64 * 1024  # clamd's replies are one short line; more is not clamd
LIMITS_EXCEEDED = "Heuristics.Limits.Exceeded"


class ScannerUnavailable(Unavailable):
    """The scanner gave no verdict. The message is not clean: its job waits and is retried
    (an Unavailable: the wait counts no attempt, so the job is never parked for it)."""


class ScanTimedOut(Exception):
    """clamd did not answer in time: this attempt fails and counts (see ClamdScanner)."""


HEADER_SLACK = 64 * 1024  # bytes a stored message may hold beyond what SMTP accepted


class Scanner(Protocol):
    async def scan(self, data: bytes) -> Scanned: ...

    async def close(self) -> None: ...


class NullScanner:
    """Scanning disabled (``[antivirus] enabled = false``): every message is clean."""

    async def scan(self, data: bytes) -> Scanned:
        return CLEAN

    async def close(self) -> None:
        return None


class ClamdScanner:
    """One INSTREAM connection per scan, to ``socket`` (a path) or to ``host``:``port``."""

    def __init__(
        self,
        *,
        socket: Path | None = None,
        host: str | None = None,
        port: int = 3310,
        timeout: float = 60.0,
        max_scan_size: int,
    ) -> None:
        if (socket is None) == (host is None):
            raise ValueError("ClamdScanner needs a socket or a host, not both")
        self.socket = socket
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_scan_size = max_scan_size

    @property
    def address(self) -> str:
        return str(self.socket) if self.socket is not None else f"{self.host}:{self.port}"

    async def scan(self, data: bytes) -> Scanned:
        # The stored message is what SMTP accepted plus our Received: field: a little slack.
        if len(data) > self.max_scan_size + HEADER_SLACK:
            return Scanned(
                False,
                None,
                f"{len(data)} bytes, over antivirus.max_scan_size ({self.max_scan_size})",
            )
        reply = await self._exchange(b"zINSTREAM\0", data)
        return self._verdict(reply)

    async def ping(self) -> bool:
        """True if clamd answers PING with PONG."""
        try:
            return await self._exchange(b"zPING\0", None) == "PONG"
        except ScannerUnavailable:
            return False

    async def close(self) -> None:
        return None

    def _verdict(self, reply: str) -> Scanned:
        if reply == "stream: OK":
            return CLEAN
        if reply.startswith("stream: ") and reply.endswith(" FOUND"):
            signature = reply[len("stream: ") : -len(" FOUND")].strip()
            if not signature:
                raise ScannerUnavailable(f"clamd at {self.address}: FOUND without a name")
            if signature.startswith(LIMITS_EXCEEDED):
                # This message is beyond what clamd scans (a zip bomb, deep nesting): neither
                # clean nor a virus, and the same on every try.
                return Scanned(False, signature, f"clamd could not scan all of it ({signature})")
            return Scanned(True, signature)
        if reply.endswith("ERROR"):
            if "size limit exceeded" in reply:
                log.warning(
                    "clamd at %s: %s (clamd's StreamMaxLength must be at least"
                    " antivirus.max_scan_size)",
                    self.address,
                    reply,
                )
                return Scanned(False, None, f"over clamd's StreamMaxLength ({reply})")
            raise ScannerUnavailable(f"clamd at {self.address}: {reply}")
        raise ScannerUnavailable(f"clamd at {self.address}: unexpected reply {reply[:200]!r}")

    async def _exchange(self, command: bytes, data: bytes | None) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._talk(command, data)
        except TimeoutError:
            # Counted as a failed attempt (not a wait): a message that keeps clamd busy past
            # the timeout every time is parked, with this error, instead of looping for ever.
            raise ScanTimedOut(
                f"clamd at {self.address}: no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None

    async def _talk(self, command: bytes, data: bytes | None) -> str:
        if self.socket is not None:
            reader, writer = await asyncio.open_unix_connection(self.socket, limit=MAX_REPLY)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_REPLY)
        try:
            sent = 0
            try:
                writer.write(command)
                if data is not None:
                    view = memoryview(data)
                    for start in range(0, len(view), CHUNK):
                        chunk = view[start : start + CHUNK]
                        writer.write(struct.pack(">I", len(chunk)))
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)
                    writer.write(b"\0\0\0\0")
                await writer.drain()
            except OSError as exc:
                # clamd stops reading and closes when the stream is over its StreamMaxLength;
                # its reply saying so is often lost with the connection.
                broken: OSError | None = exc
            else:
                broken = None
            try:
                raw = await reader.readuntil(b"\0")
            except asyncio.IncompleteReadError as exc:
                raw = exc.partial
            except asyncio.LimitOverrunError:
                raise ScannerUnavailable(
                    f"clamd at {self.address}: a reply over {MAX_REPLY} bytes"
                ) from None
            except OSError:
                if broken is None:
                    raise
                raw = b""
            if not raw and broken is not None and data is not None:
                raise ScannerUnavailable(
                    f"clamd at {self.address} closed the connection after {sent} of"
                    f" {len(data)} bytes ({broken}); its StreamMaxLength may be below"
                    " antivirus.max_scan_size"
                )
            if not raw:
                raise ScannerUnavailable(f"clamd at {self.address}: closed without a reply")
            return raw.rstrip(b"\0").decode("utf-8", "replace").strip()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def scanner_for(av: AntivirusConfig, *, max_message_size: int) -> Scanner:
    if not av.enabled:
        return NullScanner()
    return ClamdScanner(
        socket=av.socket,
        host=av.host if av.socket is None else None,
        port=av.port,
        timeout=av.timeout_seconds,
        max_scan_size=av.max_scan_size or max_message_size,
    )


def make_scanner(cfg: Config) -> Scanner:
    """The scanner ``cfg`` asks for: clamd's, or a NullScanner when antivirus is off."""
    scanner = scanner_for(cfg.antivirus, max_message_size=cfg.limits.max_message_size)
    if isinstance(scanner, NullScanner):
        log.warning(
            "antivirus disabled ([antivirus] enabled = false): messages are not scanned for"
            " viruses, which the PEC rules require (DPR 68/2005 art. 12)"
        )
    return scanner
