"""A clamd of pecd's own: its config file, its signature database, starting and stopping it.

Used by the tests (a real clamd on a temporary socket), by ``pecd init`` (``<data_dir>/clamav``)
and by ``pecd serve`` when ``[antivirus] managed = true`` (started, restarted if it dies,
stopped on exit). The database is the one pecd generates (``testsigs``); nothing is downloaded.

The limits matter: with clamd's defaults, the parts of a message past MaxFileSize or MaxScanSize
are silently not scanned and the verdict is ``OK``. The config written here raises them well past
the largest message pecd scans and sets ``AlertExceedsMax yes``, so a limit that is still hit is
reported (``Heuristics.Limits.Exceeded.*``), which the scanner never takes for clean. A
production clamd.conf needs the same three settings (docs in config/pecd.example.toml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pecd.antivirus.scanner import ClamdScanner
from pecd.antivirus.testsigs import write_database

__all__ = ["ClamdFiles", "ClamdProcess", "clamd_binary", "clamd_config_text", "write_clamd"]

log = logging.getLogger(__name__)

# clamd refuses larger values for its size limits (they are 32-bit there).
_CLAMD_MAX = 4000 * 1024 * 1024
# A LocalSocket path longer than this does not fit in sockaddr_un.
MAX_SOCKET_PATH = 107


def clamd_binary() -> str | None:
    """The clamd program, or None when it is not installed (Debian: /usr/sbin/clamd)."""
    return shutil.which("clamd") or next(
        (p for p in ("/usr/sbin/clamd", "/usr/local/sbin/clamd") if Path(p).is_file()), None
    )


def _mb(n: int) -> str:
    return f"{max(1, -(-min(n, _CLAMD_MAX) // (1024 * 1024)))}M"


def clamd_config_text(
    *,
    socket: Path,
    database: Path,
    log_file: Path,
    max_scan_size: int,
    tcp_port: int | None = None,
    threads: int = 4,
) -> str:
    """A clamd.conf: foreground, a unix socket (and TCP on 127.0.0.1 if ``tcp_port``), limits
    sized for ``max_scan_size`` byte messages."""
    if len(str(socket)) > MAX_SOCKET_PATH:
        raise ValueError(f"{socket}: a unix socket path must be at most {MAX_SOCKET_PATH} bytes")
    # StreamMaxLength is the message itself (one byte more: clamd refuses at the limit).
    # Decoding attachments and nested messages scans more bytes than the message has.
    lines = [
        "# clamd for pecd, written by pecd (pecd.antivirus.clamd). Signatures: the database",
        "# pecd generates (EICAR and Pecd.Test.Signature); nothing is downloaded.",
        "Foreground yes",
        f"LocalSocket {socket}",
        "LocalSocketMode 660",
        "FixStaleSocket yes",
        f"DatabaseDirectory {database}",
        f"LogFile {log_file}",
        "LogTime yes",
        "LogFileMaxSize 10M",
        "LogRotate yes",
        f"MaxThreads {threads}",
        "Bytecode no",
        "ConcurrentDatabaseReload no",
        "ScanMail yes",
        "ScanArchive yes",
        "AlertExceedsMax yes",
        f"StreamMaxLength {_mb(max_scan_size + 1)}",
        f"MaxFileSize {_mb(2 * max_scan_size)}",
        f"MaxScanSize {_mb(4 * max_scan_size)}",
        "ReadTimeout 120",
    ]
    if tcp_port is not None:
        lines += ["TCPAddr 127.0.0.1", f"TCPSocket {tcp_port}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ClamdFiles:
    config: Path
    socket: Path
    database: Path
    log_file: Path


def write_clamd(
    directory: Path, *, max_scan_size: int, tcp_port: int | None = None, threads: int = 4
) -> ClamdFiles:
    """Write ``directory/clamd.conf`` and the generated database ``directory/db``."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    files = ClamdFiles(
        config=directory / "clamd.conf",
        socket=directory / "clamd.sock",
        database=write_database(directory / "db"),
        log_file=directory / "clamd.log",
    )
    files.config.write_text(
        clamd_config_text(
            socket=files.socket,
            database=files.database,
            log_file=files.log_file,
            max_scan_size=max_scan_size,
            tcp_port=tcp_port,
            threads=threads,
        ),
        "utf-8",
    )
    return files


def _setting(config: Path, key: str) -> str | None:
    for line in config.read_text("utf-8").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == key:
            return parts[1].strip()
    return None


class ClamdProcess:
    """``clamd -c config`` as a child process (the config must say ``Foreground yes``).

    ``start()`` returns once clamd answers PING on its LocalSocket; ``supervise()`` runs until
    ``stop()``, starting clamd again (after a pause) whenever it exits; ``stop()`` ends it with
    SIGTERM, then SIGKILL.
    """

    def __init__(self, config: Path, *, program: str | None = None) -> None:
        found = program or clamd_binary()
        if found is None:
            raise FileNotFoundError(
                "clamd is not installed (Debian: apt-get install clamav-daemon)"
            )
        self.program = found
        self.config = config
        sock = _setting(config, "LocalSocket")
        if sock is None:
            raise ValueError(f"{config}: no LocalSocket")
        self.socket = Path(sock)
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Start clamd and wait until it answers (it loads its database first)."""
        self._stopping = False
        self.proc = await asyncio.create_subprocess_exec(
            self.program,
            "-c",
            str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        probe = ClamdScanner(socket=self.socket, timeout=2.0, max_scan_size=1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout
        while not await probe.ping():
            if self.proc.returncode is not None:
                raise RuntimeError(
                    f"clamd -c {self.config} exited with {self.proc.returncode};"
                    f" see its LogFile ({_setting(self.config, 'LogFile')})"
                )
            if loop.time() > deadline:
                await self._terminate()
                raise TimeoutError(f"clamd -c {self.config}: no PONG within {ready_timeout:g} s")
            await asyncio.sleep(0.1)
        log.info("clamd (pid %s) answers on %s", self.proc.pid, self.socket)

    def supervise(self) -> None:
        """Keep clamd running until ``stop()``: start it again whenever it exits."""
        self._supervisor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        pause = 1.0
        while not self._stopping:
            proc = self.proc
            if proc is not None:
                code = await proc.wait()
                if self._stopping:
                    return
                log.warning("clamd exited with %s; starting it again in %g s", code, pause)
            await asyncio.sleep(pause)
            try:
                await self.start()
                pause = 1.0
            except (OSError, RuntimeError, TimeoutError) as exc:
                log.error("clamd did not start: %s", exc)
                self.proc = None
                pause = min(pause * 2, 60.0)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
