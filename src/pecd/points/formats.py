"""The CPU-heavy PEC format work (building and signing messages, verifying envelopes), run in
worker processes so that it uses the machine's other cores instead of stalling the event loop.

The functions of ``pec/`` are pure, so a worker process only needs the provider identity, which
it builds once from the config (a private key cannot be pickled, so it is loaded there, not
sent). With ``processes = 0`` everything runs inline, as the tests of ``pec/`` do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pecd.config import Config
from pecd.memory import return_freed_messages_to_the_system
from pecd.pec import builders
from pecd.pec.builders import BuiltMessage, ProviderIdentity
from pecd.pec.classify import Classification, classify
from pecd.pec.smime import KeySigner

log = logging.getLogger(__name__)

BUILDERS = frozenset(
    {
        "transport_envelope",
        "anomaly_envelope",
        "accettazione",
        "non_accettazione",
        "presa_in_carico",
        "avvenuta_consegna",
        "errore_consegna",
        "preavviso_errore_consegna",
    }
)


def load_signer(cfg: Config) -> KeySigner:
    chain = b"".join(p.read_bytes() for p in cfg.signing.chain) or None
    return KeySigner.from_pem(cfg.signing.key.read_bytes(), cfg.signing.cert.read_bytes(), chain)


def provider_identity(cfg: Config) -> ProviderIdentity:
    return ProviderIdentity(
        name=cfg.provider.name,
        domain=cfg.provider.domain,
        service_address=cfg.provider.service_address,
        signer=load_signer(cfg),
        digest=cfg.signing.digest,
    )


# --- inside a worker process --------------------------------------------------------------------

_PROVIDER: ProviderIdentity | None = None


def _init(cfg: Config, parent: int) -> None:
    global _PROVIDER
    return_freed_messages_to_the_system()
    _PROVIDER = provider_identity(cfg)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A server killed with SIGKILL cannot stop its pool: its workers must notice by themselves.
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _ready() -> bool:
    return _PROVIDER is not None


def _build(name: str, kwargs: dict[str, Any]) -> BuiltMessage:
    assert _PROVIDER is not None
    fn = getattr(builders, name)
    result: BuiltMessage = fn(provider=_PROVIDER, **kwargs)
    return result


def _classify(raw: bytes) -> Classification:
    # The signer's certificate object does not cross a process boundary; its report does.
    return dataclasses.replace(classify(raw), signature_info=None)


def _carries_a_message(args: Any) -> bool:
    """Whether call arguments hold bytes of message size (at least 1 MiB)."""
    for arg in args:
        if isinstance(arg, bytes | bytearray | memoryview) and len(arg) >= 1024 * 1024:
            return True
        if isinstance(arg, dict) and _carries_a_message(arg.values()):
            return True
    return False


# --- in the server --------------------------------------------------------------------------------


class FormatWorkers:
    """``await formats.build("accettazione", tx=..., when=...)``, ``await formats.classify(raw)``."""

    def __init__(self, cfg: Config, provider: ProviderIdentity, *, processes: int) -> None:
        self.cfg = cfg
        self.provider = provider
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._replacing = asyncio.Lock()

    async def _current(self) -> ProcessPoolExecutor:
        """The pool; never runs the work inline when processes were asked for."""
        if self._pool is None:
            async with self._replacing:
                if self._pool is None:
                    await self._new_pool()
        assert self._pool is not None
        return self._pool

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        if self.processes > 0:
            await self._new_pool()
        stack.push_async_callback(self.stop)

    async def _new_pool(self) -> None:
        # spawn, not fork: the server has threads (database, Maildir) that fork would copy
        # in whatever state they are.
        pool = ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(self.cfg, os.getpid()),
        )
        loop = asyncio.get_running_loop()
        # Start them now, so that a bad key fails startup and not the first message.
        await asyncio.gather(*(loop.run_in_executor(pool, _ready) for _ in range(self.processes)))
        self._pool = pool

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self.processes == 0:
            return fn(*args)
        pool = await self._current()
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(pool, functools.partial(fn, *args))
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the first to notice replaces the pool,
            # the others find the new one; the job is retried.
            async with self._replacing:
                if self._pool is pool:
                    log.error("a format worker process died; starting new ones")
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
                    await self._new_pool()
            raise
        if self._pool is not None and _carries_a_message(args):
            # The call queue's feeder thread keeps the last call it pickled (a whole message
            # here) until it pickles the next one (multiprocessing.Queue._feed): give it a
            # small one, so that the message's bytes do not outlive its job.
            with contextlib.suppress(RuntimeError):  # shutting down
                self._pool.submit(_ready)
        return result

    async def build(self, name: str, **kwargs: Any) -> BuiltMessage:
        if name not in BUILDERS:
            raise ValueError(f"unknown builder {name!r}")
        if self.processes == 0:
            result: BuiltMessage = getattr(builders, name)(provider=self.provider, **kwargs)
            return result
        built: BuiltMessage = await self._run(_build, name, kwargs)
        return built

    async def classify(self, raw: bytes) -> Classification:
        if self.processes == 0:
            return classify(raw)
        result: Classification = await self._run(_classify, raw)
        return result
