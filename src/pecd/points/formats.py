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
from pecd.mailbox.maildir import MailboxFull, MaildirStore
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
_MAILDIR: MaildirStore | None = None


def _init(cfg: Config, parent: int) -> None:
    global _PROVIDER, _MAILDIR
    return_freed_messages_to_the_system()
    _PROVIDER = provider_identity(cfg)
    _MAILDIR = MaildirStore(cfg.maildir_root)
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


def _build_many(calls: list[tuple[str, dict[str, Any]]]) -> list[BuiltMessage]:
    return [_build(name, kwargs) for name, kwargs in calls]


def _classify(raw: bytes) -> Classification:
    # The signer's certificate object does not cross a process boundary; its report does.
    return dataclasses.replace(classify(raw), signature_info=None)


# One Maildir delivery: (address, key, bytes, quota in bytes or None).
Delivery = tuple[str, str, bytes, int | None]
DELIVERED = "delivered"
FULL = "full"


def deliver_each(store: MaildirStore, items: list[Delivery], fresh: bool = False) -> list[str]:
    """Deliver every item; for each, ``DELIVERED`` (now or before), ``FULL`` (over its quota),
    or the error that stopped it. One failure does not stop the others. ``fresh``: no key of
    ``items`` was ever delivered (see :meth:`MaildirStore.deliver`)."""
    outcomes = []
    for address, key, data, quota in items:
        try:
            store.deliver(address, key, data, quota_bytes=quota, fresh=fresh)
        except MailboxFull:
            outcomes.append(FULL)
        except Exception as exc:  # reported to the stage, which retries or gives up
            log.exception("delivery of %s to %s failed", key, address)
            outcomes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes.append(DELIVERED)
    return outcomes


def _deliver_many(items: list[Delivery], fresh: bool) -> list[str]:
    assert _MAILDIR is not None
    return deliver_each(_MAILDIR, items, fresh)


@dataclasses.dataclass(frozen=True)
class TakenInCharge:
    """What :meth:`FormatWorkers.take_in_charge` gives: the envelope's classification; when it
    is valid PEC, each delivery's outcome (as :func:`deliver_each`) and the presa in carico."""

    classification: Classification
    outcomes: list[str]
    presa: BuiltMessage | None


def take_in_charge(
    provider: ProviderIdentity,
    store: MaildirStore,
    env: bytes,
    deliveries: list[Delivery],
    presa: dict[str, Any],
) -> TakenInCharge:
    c = classify(env)
    if not c.is_valid_pec:
        return TakenInCharge(c, [], None)
    outcomes = deliver_each(store, deliveries)
    return TakenInCharge(c, outcomes, builders.presa_in_carico(provider=provider, **presa))


def _take_in_charge(env: bytes, deliveries: list[Delivery], presa: dict[str, Any]) -> TakenInCharge:
    assert _PROVIDER is not None and _MAILDIR is not None
    taken = take_in_charge(_PROVIDER, _MAILDIR, env, deliveries, presa)
    return dataclasses.replace(
        taken, classification=dataclasses.replace(taken.classification, signature_info=None)
    )


def _carries_a_message(args: Any) -> bool:
    """Whether call arguments hold bytes of message size (at least 1 MiB)."""
    for arg in args:
        if isinstance(arg, bytes | bytearray | memoryview) and len(arg) >= 1024 * 1024:
            return True
        if isinstance(arg, dict) and _carries_a_message(arg.values()):
            return True
        if isinstance(arg, list | tuple) and _carries_a_message(arg):
            return True
    return False


# --- in the server --------------------------------------------------------------------------------


class FormatWorkers:
    """``await formats.build("accettazione", tx=..., when=...)``, ``await formats.classify(raw)``."""

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

    async def build_many(self, *calls: tuple[str, dict[str, Any]]) -> list[BuiltMessage]:
        """Several :meth:`build` calls in one round trip, results in order."""
        for name, _ in calls:
            if name not in BUILDERS:
                raise ValueError(f"unknown builder {name!r}")
        if self.processes == 0:
            return [getattr(builders, name)(provider=self.provider, **kw) for name, kw in calls]
        built: list[BuiltMessage] = await self._run(_build_many, list(calls))
        return built

    async def deliver_many(self, items: list[Delivery], *, fresh: bool = False) -> list[str]:
        """Maildir deliveries, outcomes in order (see :func:`deliver_each`)."""
        if not items:
            return []
        if self.processes == 0:
            return await asyncio.to_thread(deliver_each, self.maildir, items, fresh)
        outcomes: list[str] = await self._run(_deliver_many, items, fresh)
        return outcomes

    async def take_in_charge(
        self, env: bytes, deliveries: list[Delivery], presa: dict[str, Any]
    ) -> TakenInCharge:
        """Verify ``env``; if it is valid PEC, deliver it (``deliveries``) and build the presa in
        carico from the ``presa`` arguments, all in one round trip."""
        if self.processes == 0:
            return await asyncio.to_thread(
                take_in_charge, self.provider, self.maildir, env, deliveries, presa
            )
        taken: TakenInCharge = await self._run(_take_in_charge, env, deliveries, presa)
        return taken
