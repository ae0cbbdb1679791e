"""The format worker processes: calls, errors, a process that dies, and stopping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import DOMAIN, install, wait_for_async
from pecd.engine.effects import Delivery
from pecd.engine.vocab import DELIVERED
from pecd.pec import builders
from pecd.runtime.formats import FormatWorkers, WorkerDied
from pecd.runtime.identity import provider_identity

ALICE = f"alice@{DOMAIN}"
MESSAGE = b"Subject: x\r\n\r\nx\r\n"


def test_a_worker_that_dies_fails_its_calls_and_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = await install(tmp_path / "inst", None)
        fw = FormatWorkers(cfg, provider_identity(cfg), processes=2)
        async with contextlib.AsyncExitStack() as stack:
            await fw.start(stack)
            first = list(fw._workers)
            assert len(first) == 2 and all(w.proc.is_alive() for w in first)

            # Calls are spread over the processes: a long one in one, others go to the other.
            slow = asyncio.create_task(fw._run(time.sleep, 60))
            busy = await wait_for_async(
                lambda: next((w for w in first if w.pending), None), what="the long call sent"
            )
            assert await fw.deliver_many([Delivery(ALICE, "k1", MESSAGE)]) == [DELIVERED]

            # An exception in the worker reaches the caller with its own type.
            with pytest.raises(TypeError):
                await fw.build_many([functools.partial(builders.accettazione)])

            # The process with the long call dies: that call fails, and no call hangs.
            os.kill(busy.proc.pid, signal.SIGKILL)
            with pytest.raises(WorkerDied):
                await asyncio.wait_for(slow, 10)

            # The next calls are served, a new process stands in the dead one's place.
            assert await fw.deliver_many([Delivery(ALICE, "k2", MESSAGE)]) == [DELIVERED]
            now = list(fw._workers)
            assert len(now) == 2 and all(w.alive and w.proc.is_alive() for w in now)
            assert busy.proc.pid not in {w.proc.pid for w in now}
            assert not busy.proc.is_alive()
        # Stopped: every worker process has exited.
        assert not any(w.proc.is_alive() for w in now)

    asyncio.run(scenario())


def test_inline_formats_deliver_in_a_thread(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = await install(tmp_path / "inst", None)
        fw = FormatWorkers(cfg, provider_identity(cfg), processes=0)
        async with contextlib.AsyncExitStack() as stack:
            await fw.start(stack)
            out = await fw.deliver_many(
                [Delivery(ALICE, "k", MESSAGE), Delivery(ALICE, "k", MESSAGE)]
            )
            assert out == [DELIVERED, DELIVERED]
            assert len(fw.maildir.list_folder(ALICE)) == 1

    asyncio.run(scenario())


class Picky(Exception):
    """An exception that pickles but cannot be rebuilt (its __init__ wants two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_picky() -> None:
    raise Picky("x", "y")


def test_an_answer_that_cannot_be_read_fails_only_its_call(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = await install(tmp_path / "inst", None)
        fw = FormatWorkers(cfg, provider_identity(cfg), processes=1)
        async with contextlib.AsyncExitStack() as stack:
            await fw.start(stack)
            [worker] = fw._workers
            with pytest.raises(RuntimeError, match="unreadable answer"):
                await fw._run(raise_picky)
            assert worker.alive and fw._workers == [worker]
            assert await fw.deliver_many([Delivery(ALICE, "k", MESSAGE)]) == [DELIVERED]

    asyncio.run(scenario())
