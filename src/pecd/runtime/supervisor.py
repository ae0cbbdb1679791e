"""Supervised child processes: IMAP and POP3 (the mailbox process), HTTPS (the web process),
and with ``[serve] processes`` > 1 the engine processes (SMTP and the pipeline, :class:`EngineGroup`).

:class:`ChildSupervisor` is the machinery; :class:`MailboxSupervisor` and :class:`WebSupervisor`
say which module the child runs and which listeners it serves. What follows is said of the mailbox
process and holds for the web process alike (same heartbeat settings, ``[mailbox]``'s).

Why a process of its own: the access point, the reception point and the pipeline must keep
answering whatever happens to the mailbox protocols. A parser bug that spins forever (pymap's
modified UTF-7 decoder did), a memory blow-up or a crash in IMAP or POP3 code then stops only the
child, which the supervisor replaces. The layout:

* The parent (``pecd serve``) binds every IMAP/POP3 listening socket itself, once, and hands
  them to the child as inherited file descriptors. A replacement child serves the same sockets:
  the ports never change (port 0 in a test stays the port first bound) and a connection that
  arrives while the child is being replaced waits in the listen backlog instead of being refused.
* The child gets its config over a control socket (a ``socketpair``), opens its own database
  connection (accounts are read-only there), and writes a heartbeat line every
  ``mailbox.heartbeat_seconds`` from its event loop. A ``wake`` line (the web process has
  committed a job: an API or webmail submission) calls ``on_wake``: the parent's workers look
  for work at once instead of at their next poll. A child whose event loop stops turning
  (no heartbeat for ``mailbox.heartbeat_timeout_seconds``) is killed; one that exits is
  restarted, with a growing pause if it keeps dying at once. Every such event is one log line.
* SIGTERM of the parent stops the child with SIGTERM (it closes its listeners and sessions) and
  kills it if it has not gone within the drain time. A child whose parent dies sees end-of-file
  on the control socket and exits on its own.
* A child runs in a session of its own: the signals sent to the parent's process group (Ctrl-C in
  a terminal, a kill of the group) reach the parent only, and the child stops on the parent's
  word. Once the parent is stopping (:meth:`ChildSupervisor.shutting_down`, called from its
  signal handler), a child that exits is neither replaced nor reported as a failure.
* When ``pecd serve`` serves the metrics port, every child is started with
  ``PROMETHEUS_MULTIPROC_DIR`` naming the directory its counters go to (``metrics_dir``; the
  port sums them, see ``pecd.runtime.metrics``), set before the child's interpreter starts, so
  nothing it imports can load prometheus_client in the wrong mode; ``on_gone`` is told of each
  child that is gone.
* The engine processes (:class:`EngineGroup`) share the SMTP sockets the group binds once; when
  one is gone, the jobs its workers were running are released (``release``) before the next
  starts, and the worker ids of each start are ``host:pid:node.index`` (:func:`worker_prefix`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pecd.config import Config, Endpoint

__all__ = [
    "ChildSupervisor",
    "EngineGroup",
    "EngineSupervisor",
    "MailboxSupervisor",
    "WebSupervisor",
    "engine_listeners",
    "mailbox_listeners",
    "web_listeners",
    "worker_prefix",
]

log = logging.getLogger(__name__)

#: The listeners the mailbox process serves, in the order ports are reported.
LISTENERS = ("imaps", "imap", "pop3s", "pop3")

_MIN_RESTART_PAUSE = 0.2
_MAX_RESTART_PAUSE = 30.0
# A child that lived this long before dying is not crash-looping: its next start is immediate.
_HEALTHY_SECONDS = 30.0


def mailbox_listeners(cfg: Config) -> dict[str, Endpoint]:
    """The IMAP/POP3 listeners pecd itself serves under ``cfg`` (none when Dovecot serves)."""
    if cfg.mailbox.server != "pecd":
        return {}
    lst = cfg.listeners
    found = {name: getattr(lst, name) for name in LISTENERS}
    return {name: ep for name, ep in found.items() if ep is not None}


def web_listeners(cfg: Config) -> dict[str, Endpoint]:
    """The HTTPS listener of the web process under ``cfg`` (none when ``listeners.https`` is unset)."""
    ep = cfg.listeners.https
    return {} if ep is None else {"https": ep}


def _bind(ep: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    sock = socket.create_server((ep.host, ep.port), family=family, backlog=512)
    sock.setblocking(False)
    return sock


@dataclass
class ChildSupervisor(abc.ABC):
    """Runs and watches one child process. ``await start(stack)``; the stack stops it.

    A subclass names the child (``label``, in log lines), its entry module (``module``, run as
    ``python -m module FD``, speaking the protocol of ``pecd.runtime.mailbox_process``) and the
    listeners it serves (:meth:`listeners`)."""

    label: ClassVar[str] = "child"
    module: ClassVar[str] = ""
    # Started even when it has no listener of its own (an engine process runs the pipeline).
    needs_listeners: ClassVar[bool] = True

    cfg: Config
    debug: bool = False
    # Called for each ``wake`` line the child writes (the web process: it committed a job).
    on_wake: Callable[[], None] | None = None
    # Where the child counts its metrics (its PROMETHEUS_MULTIPROC_DIR), or None: not counted.
    metrics_dir: Path | None = None
    # Called with the pid of each child that is gone (exited or killed, and reaped).
    on_gone: Callable[[int], None] | None = None
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    restarts: int = 0
    pid: int | None = None
    _proc: asyncio.subprocess.Process | None = None
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False
    _serving: bool = False
    _writer: asyncio.StreamWriter | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ports(self) -> dict[str, int]:
        """Listener name -> bound port."""
        return {name: int(s.getsockname()[1]) for name, s in self.sockets.items()}

    def port(self, name: str) -> int:
        return self.ports[name]

    @abc.abstractmethod
    def listeners(self) -> dict[str, Endpoint]:
        """The listeners the child serves, bound by :meth:`start`."""

    @property
    def serving(self) -> bool:
        """Whether a child is up and has said ``ready`` (not while one is being replaced)."""
        return self._serving

    def bind(self, stack: contextlib.AsyncExitStack) -> None:
        """Bind the listeners the child serves (closed when ``stack`` closes)."""
        for name, ep in self.listeners().items():
            self.sockets[name] = _bind(ep)
        stack.callback(self._close_sockets)

    def hello(self) -> dict[str, Any]:
        """What the child's hello carries besides the config, listeners and debug switch."""
        return {}

    def on_line(self, line: bytes) -> None:
        """A line the child wrote besides ``ready`` and its heartbeats."""
        if line == b"wake\n" and self.on_wake is not None:
            self.on_wake()

    async def gone(self, pid: int) -> None:
        """The child ``pid`` has exited or was killed (and reaped)."""
        log.debug("%s process %d reaped", self.label, pid)
        if self.on_gone is not None:
            self.on_gone(pid)

    def send(self, line: bytes) -> None:
        """Write ``line`` to the running child's control socket (dropped when none runs)."""
        writer = self._writer
        if writer is not None and not writer.is_closing() and self._serving:
            writer.write(line)

    def shutting_down(self) -> None:
        """The parent is stopping (its signal came): from now on a child that exits is not
        replaced, and its exit is no error. (The child stops on the parent's word: :meth:`stop`.)"""
        self._stopping = True

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Bind the listeners, start the child and wait until it serves them."""
        self.bind(stack)
        if not self.sockets and self.needs_listeners:
            return
        stack.push_async_callback(self.stop)
        self._task = asyncio.create_task(self._supervise(), name=f"{self.label}-supervisor")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            self._task.result()  # raises what ended the supervisor
            raise RuntimeError(f"the {self.label} process did not start")
        log.info(
            "%s process serving %s",
            self.label,
            ", ".join(f"{n} {p}" for n, p in self.ports.items()),
        )

    def _close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_seconds())
            except TimeoutError:
                log.warning("%s process %d did not stop in time; killing it", self.label, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stop_seconds(self) -> float:
        """How long a child is given to stop after SIGTERM before it is killed."""
        return self.cfg.queue.drain_seconds

    # -- the loop --------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        pause = _MIN_RESTART_PAUSE
        while not self._stopping:
            started = time.monotonic()
            try:
                reason = await self._run_once()
            except OSError as exc:  # could not even start the child (fork failed, no memory)
                reason = f"could not start: {exc}"
            if self._stopping:
                return
            self.restarts += 1
            if time.monotonic() - started >= _HEALTHY_SECONDS:
                pause = _MIN_RESTART_PAUSE
            log.error("%s process %s; starting a new one in %.1f s", self.label, reason, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_RESTART_PAUSE)

    async def _run_once(self) -> str:
        """Start one child and watch it; return why it is gone."""
        parent_end, child_end = socket.socketpair()
        fds = {name: sock.fileno() for name, sock in self.sockets.items()}
        env = None
        if self.metrics_dir is not None:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                str(child_end.fileno()),
                pass_fds=[child_end.fileno(), *fds.values()],
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                # A session of its own: the signals of the parent's process group (Ctrl-C in a
                # terminal, a kill of the group) do not reach the child, which stops only on
                # the parent's word (SIGTERM from stop(), or the end of the control socket).
                start_new_session=True,
            )
        except BaseException:
            parent_end.close()  # or every failed start would leak a descriptor
            raise
        finally:
            child_end.close()
        self._proc = proc
        self.pid = proc.pid
        try:
            reader, writer = await asyncio.open_connection(sock=parent_end)
        except BaseException:
            parent_end.close()
            raise
        try:
            hello = {
                "config": self.cfg.model_dump(mode="json"),
                "listeners": fds,
                "debug": self.debug,
                **self.hello(),
            }
            writer.write(json.dumps(hello).encode("utf-8") + b"\n")
            await writer.drain()
            self._writer = writer
            return await self._watch(proc, reader)
        except (ConnectionError, OSError) as exc:
            return f"{proc.pid} lost its control channel ({exc})"
        finally:
            self._serving = False
            self._writer = None
            writer.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            try:
                await self.gone(proc.pid)
            except Exception:
                log.exception("%s process %d: cleaning up after it failed", self.label, proc.pid)

    async def _watch(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader) -> str:
        timeout = self.cfg.mailbox.heartbeat_timeout_seconds
        # The first start may import a lot and open the database: give it longer to say ready.
        first = max(timeout, 60.0)
        line = b""
        try:
            line = await asyncio.wait_for(reader.readline(), first)
        except TimeoutError:
            return f"{proc.pid} did not start within {first:.0f} s; killed"
        if line.strip() != b"ready":
            code = await proc.wait()
            return f"{proc.pid} failed to start (exit status {code})"
        self._ready.set()
        self._serving = True
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError:
                if self._stopping:
                    return "stopping"
                log.error(
                    "%s process %d sent no heartbeat for %.0f s (its event loop is stuck); "
                    "killing it",
                    self.label,
                    proc.pid,
                    timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return f"{proc.pid} was killed after its heartbeat stopped"
            if not line:
                code = await proc.wait()
                return f"{proc.pid} exited with status {code}"
            if line != b"alive\n":
                self.on_line(line)


class MailboxSupervisor(ChildSupervisor):
    """The mailbox process: IMAP and POP3 (``pecd.runtime.mailbox_process``)."""

    label = "mailbox"
    module = "pecd.runtime.mailbox_process"

    def listeners(self) -> dict[str, Endpoint]:
        return mailbox_listeners(self.cfg)


class WebSupervisor(ChildSupervisor):
    """The web process: the ASGI application over HTTPS (``pecd.runtime.web_process``)."""

    label = "web"
    module = "pecd.runtime.web_process"

    def listeners(self) -> dict[str, Endpoint]:
        return web_listeners(self.cfg)


# --- engine processes (serve.processes > 1) --------------------------------------------------


def engine_listeners(cfg: Config) -> dict[str, Endpoint]:
    """The SMTP listeners every engine process serves: the access point's and the reception
    point's."""
    lst = cfg.listeners
    found = {"smtps": lst.smtps, "submission": lst.submission, "reception": lst.reception}
    return {name: ep for name, ep in found.items() if ep is not None}


def worker_prefix(node: str, index: int, pid: int) -> str:
    """What the worker ids of engine process ``index`` (pid ``pid``) of node ``node`` start
    with: ``host:pid:node.index`` (``pecd queue list`` shows who holds a lease)."""
    return f"{socket.gethostname()}:{pid}:{node}.{index}"


@dataclass
class EngineSupervisor(ChildSupervisor):
    """One engine process (``pecd.runtime.engine_process``): the access and reception points on
    the SMTP sockets the :class:`EngineGroup` bound, its own pipeline, relay and webhook workers
    and its own format processes. When it is gone, the jobs its workers held are given back
    (``release``) before a new one starts."""

    label = "engine"
    module = "pecd.runtime.engine_process"
    needs_listeners = False

    index: int = 0
    node: str = ""
    shared: dict[str, socket.socket] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    release: Callable[[str], Awaitable[int]] | None = None

    def listeners(self) -> dict[str, Endpoint]:
        return {}

    def bind(self, stack: contextlib.AsyncExitStack) -> None:
        self.sockets = dict(self.shared)  # bound once by the group, which closes them

    def hello(self) -> dict[str, Any]:
        assert self.pid is not None
        return {
            "index": self.index,
            "worker_prefix": worker_prefix(self.node, self.index, self.pid),
            **self.extra,
        }

    def stop_seconds(self) -> float:
        # Its workers drain for up to drain_seconds, then its listeners and format processes stop.
        return self.cfg.queue.drain_seconds + 10.0

    async def gone(self, pid: int) -> None:
        await super().gone(pid)
        if self.release is None:
            return
        prefix = worker_prefix(self.node, self.index, pid)
        n = await self.release(prefix)
        if n:
            log.info("engine process %d: %d jobs it was running are free again", pid, n)


@dataclass
class EngineGroup:
    """``processes`` engine processes sharing the SMTP listening sockets, bound here once: a
    replacement serves the same sockets, and connections wait in the backlog meanwhile. Lines to
    every engine: ``wake`` (a job was committed elsewhere, say by the web process) and
    ``reload`` (SIGHUP: the provider index)."""

    cfg: Config
    processes: int
    node: str
    debug: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    release: Callable[[str], Awaitable[int]] | None = None
    metrics_dir: Path | None = None
    on_gone: Callable[[int], None] | None = None
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    engines: list[EngineSupervisor] = field(default_factory=list)
    _inner: contextlib.AsyncExitStack | None = None

    @property
    def ports(self) -> dict[str, int]:
        return {name: int(s.getsockname()[1]) for name, s in self.sockets.items()}

    def port(self, name: str) -> int:
        return self.ports[name]

    @property
    def serving(self) -> bool:
        return bool(self.engines) and all(e.serving for e in self.engines)

    @property
    def pids(self) -> list[int]:
        return [e.pid for e in self.engines if e.pid is not None]

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        for name, ep in engine_listeners(self.cfg).items():
            self.sockets[name] = _bind(ep)
        stack.callback(self._close_sockets)
        self.engines = [
            EngineSupervisor(
                self.cfg,
                debug=self.debug,
                index=i,
                node=self.node,
                shared=self.sockets,
                extra=self.extra,
                release=self.release,
                metrics_dir=self.metrics_dir,
                on_gone=self.on_gone,
            )
            for i in range(self.processes)
        ]
        # Each supervisor stops its own child; they stop together (one drain, not N in a row).
        stack.push_async_callback(self.stop)
        inner = contextlib.AsyncExitStack()
        self._inner = inner
        try:
            await asyncio.gather(*(e.start(inner) for e in self.engines))
        except BaseException:
            await self.stop()
            raise

    def shutting_down(self) -> None:
        for e in self.engines:
            e.shutting_down()

    async def stop(self) -> None:
        self.shutting_down()
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.aclose()

    def _close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()

    def wake(self) -> None:
        for e in self.engines:
            e.send(b"wake\n")

    def reload(self) -> None:
        for e in self.engines:
            e.send(b"reload\n")
