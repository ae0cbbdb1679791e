"""What every supervised child process does the same way (``runtime/supervisor.py``): read its
hello (the config, its listening sockets) from the control socket, stop when the parent goes
away, announce ``ready`` once it serves, then write a heartbeat line until it stops; and, for a
child that commits jobs (the web process), a ``wake`` line that wakes the parent's workers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pecd.config import Config


async def hello(
    ctrl_fd: int, name: str
) -> tuple[Config, dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter]:
    """The control socket's first line: the config and the rest of the hello; logging set up
    with ``name`` in every line."""
    ctrl = socket.socket(fileno=ctrl_fd)
    reader, writer = await asyncio.open_connection(sock=ctrl)
    data: dict[str, Any] = json.loads(await reader.readline())
    cfg = Config.model_validate(data["config"])
    if data.get("debug"):
        logging.getLogger("pecd").setLevel(logging.DEBUG)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
    )
    return cfg, data, reader, writer


async def watch_parent(reader: asyncio.StreamReader, stop: Callable[[], None]) -> None:
    """Call ``stop`` when the parent is gone (end of the control socket); anything read after
    the hello is ignored."""
    while await reader.read(4096):
        pass
    stop()


async def beat(
    writer: asyncio.StreamWriter,
    serving: asyncio.Task[Any],
    started: Callable[[], bool],
    every: float,
) -> bool:
    """Wait until the child serves (``started``), say ``ready``, then ``alive`` every ``every``
    seconds until ``serving`` ends. False if it ended before it ever served."""
    while not started() and not serving.done():
        await asyncio.wait({serving}, timeout=0.02)
    if serving.done():
        serving.result()
        return False
    writer.write(b"ready\n")
    await writer.drain()
    while not serving.done():
        await asyncio.wait({serving}, timeout=every)
        if not serving.done():
            writer.write(b"alive\n")
            await writer.drain()
    serving.result()
    return True


def waker(writer: asyncio.StreamWriter) -> Callable[[], None]:
    """A call that has the parent wake its workers at once (a ``wake`` line on the control
    socket, after a job was committed); the calls of one turn of the event loop make one line.
    Call it from the event loop."""
    pending = False

    def flush() -> None:
        nonlocal pending
        pending = False
        if not writer.is_closing():
            writer.write(b"wake\n")

    def wake() -> None:
        nonlocal pending
        if not pending:
            pending = True
            asyncio.get_running_loop().call_soon(flush)

    return wake


def main(argv: list[str], what: str, run: Callable[[int], Coroutine[Any, Any, int]]) -> int:
    """``python -m <child> FD``: run the child on control socket FD."""
    if len(argv) != 2 or not argv[1].isdigit():
        print(f"pecd's {what} is started by `pecd serve`, not by hand", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(int(argv[1])))
    except KeyboardInterrupt:
        return 0
