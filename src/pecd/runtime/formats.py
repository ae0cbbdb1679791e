"""The CPU-heavy PEC format work (building and signing messages, verifying envelopes) and the
Maildir writes, run in worker processes so that they use the machine's other cores instead of
stalling the event loop.

The functions of ``pec/`` are pure, so a worker process only needs the provider identity, which
it builds once from the config (a private key cannot be pickled, so it is loaded there, not
sent), and the Maildir root. Each round trip to a worker costs the server a few hundred
microseconds of CPU (pickling, the pool's feeder and result threads), so the stages ask for
everything they can at once: :meth:`FormatWorkers.build_many`, :meth:`FormatWorkers.deliver_many`
and :meth:`FormatWorkers.take_in_charge` (verify an envelope, store it for its recipients, build
the presa in carico). Maildir deliveries are idempotent and process-safe (an flock per mailbox),
so where they run does not matter. With ``processes = 0`` everything runs inline (the Maildir
writes in a thread), as the tests of ``pec/`` do.

Calls of one kind made in the same turn of the event loop (the jobs of a batch are prepared
together) are sent together, split over the live workers: fewer round trips, and each
worker's Maildir deliveries made durable with one flush for all of them
(:meth:`MaildirStore.deliver_many`). Each call still gets its own answer or its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from pecd.clock import Clock
from pecd.config import Config
from pecd.engine.effects import BuildCall, Delivery, TakeInCharge, TakenInCharge
from pecd.engine.vocab import Outcome
from pecd.fastpickle import fast_pickle
from pecd.mailbox.maildir import MaildirStore
from pecd.memory import return_freed_messages_to_the_system
from pecd.pec.builders import BuiltMessage, ProviderIdentity
from pecd.pec.classify import Classification, classify
from pecd.pec.daticert import Daticert, Destinatario
from pecd.pec.timefmt import PecTime
from pecd.runtime.delivering import (
    build_each,
    deliver_each,
    deliver_groups,
    portable,
    take_in_charge,
    take_in_charge_many,
)
from pecd.runtime.identity import provider_identity
from pecd.runtime.logutil import RateLimitedLog

log = logging.getLogger(__name__)

# The slotted dataclasses of pec/ that cross in every message (a daticert in each built message,
# its recipients, the times in the builder calls): registered here, in both the server and the
# worker processes, which import this module, so they take the fast path of pecd.fastpickle.
for _cls in (Daticert, Destinatario, PecTime):
    fast_pickle(_cls)
del _cls

# --- inside a worker process --------------------------------------------------------------------

_PROVIDER: ProviderIdentity | None = None
_MAILDIR: MaildirStore | None = None


def _init(cfg: Config, parent: int) -> None:
    global _PROVIDER, _MAILDIR
    # Ctrl-C or a SIGTERM to the process group is the server's to act on: it drains, then
    # closes our socket. Dying at once would fail the stage in progress with WorkerDied.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(parent)
    return_freed_messages_to_the_system()
    _PROVIDER = provider_identity(cfg)
    _MAILDIR = MaildirStore(cfg.maildir_root)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """On Linux, have the kernel send SIGKILL to this process when the server dies, however it
    dies (SIGKILL included), at once. The server starts its workers from its main thread (the
    kernel's "parent" is the thread that forked), which lives as long as the server does.
    Elsewhere, and in case prctl is unavailable, :func:`_exit_with_parent` polls."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the server died before prctl took effect
        os._exit(0)


def _exit_with_parent(parent: int) -> None:
    # A server killed with SIGKILL cannot stop its workers: they must notice by themselves
    # (one busy with a long call would not see its socket close until the call ends).
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


_HEADER = struct.Struct("!QQ")  # call id, length of the pickle that follows
# A call smaller than this goes to the socket in one write with its header: copying a few KB
# costs the server less than a second system call; a larger one (a big message) is not copied.
_JOIN_BELOW = 1 << 16


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes from ``sock``, or None at end of stream (the server has gone). A bytearray,
    which pickle and struct read as they are: a message is not copied once more into bytes."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def _send_all(sock: socket.socket, head: bytes, body: bytes) -> None:
    """``head`` then ``body`` on ``sock``, in one system call when the socket takes them (they
    are not joined: that would copy the body)."""
    sent = sock.sendmsg([head, body])
    if sent < len(head):
        sock.sendall(memoryview(head)[sent:])
        sent = len(head)
    if sent - len(head) < len(body):
        sock.sendall(memoryview(body)[sent - len(head) :])


def _serve(sock: socket.socket, cfg: Config, parent: int) -> None:
    """A worker process: answer calls on ``sock`` until the server closes it."""
    _init(cfg, parent)
    while True:
        head = _recv_exactly(sock, _HEADER.size)
        if head is None:
            return
        call_id, size = _HEADER.unpack(head)
        body = _recv_exactly(sock, size)
        if body is None:
            return
        try:
            fn, args = pickle.loads(body)
            del body
            result = fn(*args)
            del fn, args  # the message is not kept until the next call
            reply = pickle.dumps((True, result), protocol=pickle.HIGHEST_PROTOCOL)
            del result
        except Exception as exc:
            try:
                reply = pickle.dumps((False, exc), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # an exception that cannot be pickled: its text can
                failure = RuntimeError(f"{type(exc).__name__}: {exc}")
                reply = pickle.dumps((False, failure), protocol=pickle.HIGHEST_PROTOCOL)
        _send_all(sock, _HEADER.pack(call_id, len(reply)), reply)
        del reply


def _ready() -> bool:
    return _PROVIDER is not None


Answer = tuple[bool, Any]  # (True, the result) or (False, the exception)


def _answer(result: Any) -> Answer:
    if not isinstance(result, Exception):
        return True, result
    try:  # the whole list of answers must cross: this one as it is, or as text
        pickle.loads(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # an exception that cannot be pickled, or rebuilt: its text can
        return False, RuntimeError(f"{type(result).__name__}: {result}")
    return False, result


def _build_groups(groups: list[list[BuildCall]]) -> list[Answer]:
    """Several callers' :func:`_build_many`, each answered on its own."""
    assert _PROVIDER is not None
    answers = []
    for calls in groups:
        try:
            answers.append(_answer(build_each(_PROVIDER, calls)))
        except Exception as exc:
            answers.append(_answer(exc))
    return answers


def _classify(raw: bytes) -> Classification:
    # The signer's certificate object does not cross a process boundary; its report does.
    return dataclasses.replace(classify(raw), signature_info=None)


def _classify_many(raws: list[bytes]) -> list[Answer]:
    answers = []
    for raw in raws:
        try:
            answers.append(_answer(_classify(raw)))
        except Exception as exc:
            answers.append(_answer(exc))
    return answers


def _deliver_groups(groups: list[tuple[list[Delivery], bool]]) -> list[Answer]:
    assert _MAILDIR is not None
    return [_answer(a) for a in deliver_groups(_MAILDIR, groups)]


def _take_in_charge_many(calls: list[tuple[TakeInCharge, Clock]]) -> list[Answer]:
    assert _PROVIDER is not None and _MAILDIR is not None
    return [
        _answer(a if isinstance(a, Exception) else portable(a))
        for a in take_in_charge_many(_PROVIDER, _MAILDIR, calls)
    ]


# --- in the server --------------------------------------------------------------------------------


_respawn_failures = RateLimitedLog(every=60.0)

CALL_TIMEOUT_SECONDS = 600  # far beyond any call (a 100 MB message takes seconds)
RESPAWN_DELAY_SECONDS = 5.0  # between tries to replace a dead worker that would not start


def _stop_resource_tracker() -> None:
    """End the helper process multiprocessing started with the first worker (its resource
    tracker, which pecd does not use): left to itself it exits only after the server has, and
    is then seen as a worker that outlived it."""
    from multiprocessing import resource_tracker

    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()


class WorkerDied(Exception):
    """A format worker process died (killed, out of memory) with this call in hand; the call's
    job fails this attempt and is retried, and a new process takes the dead one's place."""


class _Worker:
    """One worker process and the server's end of its socket. Calls are pickled and written
    by the event loop, answers read by a task of it: no helper threads in the server, which
    multiprocessing's pool needs two of (and a hand-off between threads for every call)."""

    def __init__(self, proc: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.alive = True
        self.task: asyncio.Task[None] | None = None

    async def read_answers(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(_HEADER.size)
                call_id, size = _HEADER.unpack(head)
                body = await self.reader.readexactly(size)
                fut = self.pending.pop(call_id, None)
                try:
                    ok, value = pickle.loads(body)
                except Exception as exc:  # an exception class that cannot be rebuilt here
                    ok, value = False, RuntimeError(f"unreadable answer from a worker: {exc!r}")
                del body
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(value)
                    elif isinstance(value, Exception) and not isinstance(value, StopIteration):
                        fut.set_exception(value)
                    else:
                        fut.set_exception(RuntimeError(f"worker failed: {value!r}"))
                # Not kept until the next answer: an answer may hold a whole message.
                del fut, value
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.alive = False
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(WorkerDied("a format worker process died"))
            self.pending.clear()
            self.writer.close()


class FormatWorkers:
    """The format worker processes: ``await formats.build_many([partial(builders.x, ...)])``,
    ``await formats.classify(raw)``, deliveries, and the delivery point's round trip."""

    def __init__(
        self,
        cfg: Config,
        provider: ProviderIdentity,
        *,
        processes: int,
        maildir: MaildirStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.processes = processes
        self.maildir = maildir or MaildirStore(cfg.maildir_root)
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._replacing = asyncio.Lock()
        self._stopped = False
        self._respawn_after = 0.0  # after a failed respawn, when to try again
        # Calls waiting for the end of this turn of the loop, by worker function (see the
        # module docstring), and the tasks sending them.
        self._queued: dict[Any, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        stack.push_async_callback(self.stop)
        if self.processes > 0:
            # Started now, so that a bad key fails startup and not the first message.
            started = await asyncio.gather(
                *(self._spawn() for _ in range(self.processes)), return_exceptions=True
            )
            self._workers = [w for w in started if isinstance(w, _Worker)]
            for failure in started:
                if isinstance(failure, BaseException):
                    await self.stop()  # the ones that did start
                    raise failure

    async def _spawn(self) -> _Worker:
        # spawn, not fork: the server has threads (database) that fork would copy in whatever
        # state they are.
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = socket.socketpair()
        proc = ctx.Process(target=_serve, args=(theirs, self.cfg, os.getpid()), daemon=True)
        # Started from this (the event loop's) thread, not a helper thread: the worker's
        # PR_SET_PDEATHSIG fires when the thread that forked it ends, and a pool thread may end
        # long before the server does. Starting is a fork and exec, a few milliseconds.
        proc.start()
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
        worker = _Worker(proc, reader, writer)
        worker.task = asyncio.create_task(worker.read_answers(), name="format-worker")
        try:
            if not await self._call(worker, _ready):
                raise RuntimeError("a format worker did not initialise")
        except WorkerDied:
            await asyncio.to_thread(proc.join, 5)
            raise RuntimeError(
                f"a format worker process could not start (exit code {proc.exitcode}); "
                "see its error above"
            ) from None
        return worker

    async def _call(self, worker: _Worker, fn: Any, *args: Any) -> Any:
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending[call_id] = fut
        try:
            body = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
            head = _HEADER.pack(call_id, len(body))
            if len(body) < _JOIN_BELOW:
                worker.writer.write(head + body)
            else:
                worker.writer.write(head)
                worker.writer.write(body)
            del body
            await worker.writer.drain()
        except (ConnectionError, OSError):
            worker.pending.pop(call_id, None)
            raise WorkerDied("a format worker process died") from None
        except BaseException:
            worker.pending.pop(call_id, None)
            raise
        try:
            return await asyncio.wait_for(asyncio.shield(fut), CALL_TIMEOUT_SECONDS)
        except TimeoutError:
            # Stuck (an fsync that never returns, a stopped process): its calls must not hold
            # their jobs for ever. Killed, it fails them all (WorkerDied) and is replaced.
            log.error("a format worker did not answer in %d s; killing it", CALL_TIMEOUT_SECONDS)
            worker.pending.pop(call_id, None)
            fut.cancel()
            worker.proc.kill()
            raise WorkerDied("a format worker process did not answer") from None

    async def _worker(self) -> _Worker:
        """The live worker with the fewest calls in hand; dead ones are replaced first."""
        if (
            any(not w.alive for w in self._workers)
            and not self._stopped
            and time.monotonic() >= self._respawn_after
        ):
            async with self._replacing:
                for i, w in enumerate(list(self._workers)):
                    if w.alive or self._stopped:
                        continue
                    log.error("a format worker process died; starting a new one")
                    await asyncio.to_thread(w.proc.join, 5)
                    try:
                        new = await self._spawn()
                    except Exception as exc:
                        # The others still serve; calls try again a little later (every few
                        # seconds while it lasts: one line a minute, the traceback once).
                        _respawn_failures.failure(
                            log, "a new format worker process could not start", exc
                        )
                        self._respawn_after = time.monotonic() + RESPAWN_DELAY_SECONDS
                        break
                    if self._stopped or i >= len(self._workers):
                        new.writer.close()
                        await asyncio.to_thread(new.proc.join, 10)
                        break
                    self._workers[i] = new
        live = [w for w in self._workers if w.alive]
        if not live:
            raise WorkerDied("no format worker process is running")
        return min(live, key=lambda w: len(w.pending))

    async def stop(self) -> None:
        self._stopped = True
        workers, self._workers = self._workers, []
        for w in workers:
            w.writer.close()  # the worker sees the end of its socket and exits
        for w in workers:
            if w.task is not None:
                await asyncio.gather(w.task, return_exceptions=True)
            await asyncio.to_thread(w.proc.join, 10)
            if w.proc.is_alive():
                w.proc.kill()
                await asyncio.to_thread(w.proc.join, 5)
        if workers:
            await asyncio.to_thread(_stop_resource_tracker)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self.processes == 0:
            return fn(*args)
        return await self._call(await self._worker(), fn, *args)

    async def _together(self, fn: Any, item: Any) -> Any:
        """``item``'s answer from ``fn``, a worker function that takes a list of items and
        answers each (:data:`Answer`): the items of every call made in this turn of the loop
        go in as few calls as there are live workers."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queued = self._queued.setdefault(fn, [])
        queued.append((item, fut))
        if len(queued) == 1:
            loop.call_soon(self._send_queued, fn)
        return await fut

    def _send_queued(self, fn: Any) -> None:
        queued = self._queued.pop(fn, [])
        queued = [(item, fut) for item, fut in queued if not fut.done()]  # not cancelled
        if not queued:
            return
        live = sum(1 for w in self._workers if w.alive) or 1
        size = -(-len(queued) // min(live, len(queued)))
        for start in range(0, len(queued), size):
            task = asyncio.create_task(self._send(fn, queued[start : start + size]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, fn: Any, calls: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            answers: list[Answer] = await self._run(fn, [item for item, _ in calls])
        except asyncio.CancelledError:
            for _, fut in calls:
                fut.cancel()
            raise
        except Exception as exc:  # the worker died, or did not answer: every call fails
            for _, fut in calls:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), (ok, value) in zip(calls, answers, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    async def build_many(self, calls: Sequence[BuildCall]) -> list[BuiltMessage]:
        """Builder calls carried out as this provider, in one round trip, results in order."""
        if self.processes == 0:
            return build_each(self.provider, calls)
        built: list[BuiltMessage] = await self._together(_build_groups, list(calls))
        return built

    async def classify(self, raw: bytes) -> Classification:
        if self.processes == 0:
            return classify(raw)
        result: Classification = await self._together(_classify_many, raw)
        return result

    async def deliver_many(
        self, items: Sequence[Delivery], *, fresh: bool = False
    ) -> list[Outcome]:
        """Maildir deliveries, outcomes in order (see :func:`deliver_each`)."""
        if not items:
            return []
        if self.processes == 0:
            return await asyncio.to_thread(deliver_each, self.maildir, items, fresh)
        outcomes: list[Outcome] = await self._together(_deliver_groups, (list(items), fresh))
        return outcomes

    async def take_in_charge(self, cmd: TakeInCharge, clock: Clock) -> TakenInCharge:
        """The delivery point's round trip (see :func:`delivering.take_in_charge`). ``clock``
        gives the receipts' time, read after the deliveries; it crosses to the worker process
        (the system clock, or a fixed copy of an injected one)."""
        if self.processes == 0:
            return await asyncio.to_thread(take_in_charge, self.provider, self.maildir, cmd, clock)
        taken: TakenInCharge = await self._together(_take_in_charge_many, (cmd, clock))
        return taken
