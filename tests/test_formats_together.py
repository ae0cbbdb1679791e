"""Format calls made together (the jobs of a batch are prepared at once) go to the worker
processes together: fewer round trips, one Maildir flush per worker, and still one answer, or one
error, per call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from helpers import DOMAIN, install, wait_for_async
from pecd.clock import SystemClock
from pecd.engine.delivery import receipts_owed
from pecd.engine.effects import Delivery, TakeInCharge, TakenInCharge
from pecd.engine.vocab import DELIVERED, Stored, TraceType
from pecd.pec import builders
from pecd.pec.builders import ProviderIdentity, Transmission
from pecd.pec.classify import classify
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Ricevuta
from pecd.runtime.formats import FormatWorkers, WorkerDied
from pecd.runtime.identity import provider_identity

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = f"carol@{DOMAIN}"
SERVICE = f"posta-certificata@{DOMAIN}"


def original(n: int, to: str) -> bytes:
    return (
        f"From: {ALICE}\r\nTo: {to}\r\nSubject: insieme {n}\r\nMessage-ID: <t{n}@client>\r\n"
        f"\r\nmessaggio {n}\r\n"
    ).encode()


def take(provider: ProviderIdentity, n: int, to: str, *, corrupt: bool = False) -> TakeInCharge:
    """The delivery point's command for one transport envelope to ``to``, as the engine makes it."""
    when = pec_time(datetime.now(UTC))
    raw = original(n, to)
    tx = Transmission.from_submission(
        raw,
        mail_from=ALICE,
        rcpt_to=[to],
        identificativo=provider.new_msgid(when),
        is_certified=lambda _a: True,
    )
    envelope = builders.transport_envelope(raw, tx, provider, when).raw
    if corrupt:  # the signed text altered: not valid PEC
        envelope = envelope.replace(f"messaggio {n}".encode(), b"messaggio X")
    return TakeInCharge(
        envelope,
        (Delivery(to, f"{tx.identificativo}:{to}", envelope, None),),
        functools.partial(
            builders.presa_in_carico, tx=tx, when=when, ricezione=[to], mail_receipt=SERVICE
        ),
        functools.partial(receipts_owed, provider.name, tx, [to], {}, [to], False),
    )


async def started(
    tmp_path: Path, stack: contextlib.AsyncExitStack, processes: int
) -> tuple[FormatWorkers, list[str]]:
    """Format workers, and the names of the worker functions each round trip called."""
    cfg = await install(tmp_path / "inst", None)
    fw = FormatWorkers(cfg, provider_identity(cfg), processes=processes)
    await fw.start(stack)
    trips: list[str] = []
    run: Callable[..., Awaitable[Any]] = fw._run

    async def counted(fn: Any, *args: Any) -> Any:
        trips.append(fn.__name__)
        return await run(fn, *args)

    fw._run = counted  # type: ignore[method-assign]
    return fw, trips


def test_builds_made_together_take_one_trip_per_worker_and_fail_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            fw, trips = await started(tmp_path, stack, processes=2)
            provider = fw.provider
            when = pec_time(datetime.now(UTC))
            txs = [
                Transmission.from_submission(
                    original(i, BOB),
                    mail_from=ALICE,
                    rcpt_to=[BOB],
                    identificativo=provider.new_msgid(when),
                    is_certified=lambda _a: True,
                )
                for i in range(6)
            ]
            calls = [[functools.partial(builders.accettazione, tx=tx, when=when)] for tx in txs]
            calls[3] = [functools.partial(builders.accettazione)]  # no tx: a TypeError
            results = await asyncio.gather(
                *(fw.build_many(c) for c in calls), return_exceptions=True
            )
            assert isinstance(results[3], TypeError)
            for i, result in enumerate(results):
                if i == 3:
                    continue
                assert isinstance(result, list)
                [built] = result
                assert built.daticert is not None
                assert built.daticert.identificativo == txs[i].identificativo
                assert classify(built.raw).ricevuta is Ricevuta.ACCETTAZIONE
            assert trips == ["_build_groups", "_build_groups"]  # 6 calls, 2 workers

    asyncio.run(scenario())


def test_takes_in_charge_made_together_are_answered_each(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            fw, trips = await started(tmp_path, stack, processes=1)
            provider = fw.provider
            cmds = [
                take(provider, 1, BOB),
                take(provider, 2, CAROL, corrupt=True),
                take(provider, 3, CAROL),
                take(provider, 4, BOB),
            ]
            answers = await asyncio.gather(*(fw.take_in_charge(cmd, SystemClock()) for cmd in cmds))
            assert trips == ["_take_in_charge_many"]
            for i, done in enumerate(answers):
                assert isinstance(done, TakenInCharge)
                if i == 1:  # verified and refused: nothing stored, nothing built
                    assert not done.classification.is_valid_pec
                    assert done.presa is None and not done.outcomes
                    continue
                assert done.classification.is_valid_pec
                assert done.outcomes == (DELIVERED,)
                assert done.presa is not None
                assert classify(done.presa.raw).ricevuta is Ricevuta.PRESA_IN_CARICO
                [(rcpt, event, receipt, error)] = done.receipts
                assert rcpt == cmds[i].deliveries[0].mailbox
                assert event == TraceType.AVVENUTA_CONSEGNA and error is None
                assert classify(receipt.raw).ricevuta is Ricevuta.AVVENUTA_CONSEGNA
            assert len(fw.maildir.list_folder(BOB)) == 2
            assert len(fw.maildir.list_folder(CAROL)) == 1
            # Again (a re-run of the same jobs): found, not stored twice.
            again = await asyncio.gather(*(fw.take_in_charge(c, SystemClock()) for c in cmds))
            assert [a.outcomes for a in again] == [(DELIVERED,), (), (DELIVERED,), (DELIVERED,)]
            assert len(fw.maildir.list_folder(BOB)) == 2

    asyncio.run(scenario())


def test_deliveries_made_together_keep_their_own_outcomes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            fw, trips = await started(tmp_path, stack, processes=1)
            msg = b"Subject: x\r\n\r\nx\r\n"
            big = Delivery(BOB, "big", msg * 1000, quota_bytes=100)
            results = await asyncio.gather(
                fw.deliver_many([Delivery(ALICE, "a1", msg), Delivery(BOB, "b1", msg)]),
                fw.deliver_many([Delivery(SERVICE, "s1", msg)], fresh=True),
                fw.deliver_many([big, Delivery(CAROL, "c1", msg)]),
            )
            assert trips == ["_deliver_groups"]
            assert results[0] == [DELIVERED, DELIVERED]
            assert results[1] == [DELIVERED]
            assert [o.stored for o in results[2]] == [Stored.FULL, Stored.DELIVERED]
            for address in (ALICE, BOB, CAROL):
                assert len(fw.maildir.list_folder(address)) == 1

    asyncio.run(scenario())


def test_a_worker_that_dies_fails_every_call_sent_with_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            fw, trips = await started(tmp_path, stack, processes=1)
            msg = b"Subject: x\r\n\r\nx\r\n"
            [worker] = fw._workers
            os.kill(worker.proc.pid, signal.SIGSTOP)  # it cannot answer
            calls = asyncio.gather(
                *(fw.deliver_many([Delivery(ALICE, f"k{i}", msg)]) for i in range(4)),
                return_exceptions=True,
            )
            await wait_for_async(lambda: worker.pending, what="the calls sent")
            worker.proc.kill()
            results = await asyncio.wait_for(calls, 10)
            assert trips == ["_deliver_groups"]
            assert all(isinstance(r, WorkerDied) for r in results), results
            # A new process stands in: the same deliveries go through.
            again = await asyncio.gather(
                *(fw.deliver_many([Delivery(ALICE, f"k{i}", msg)]) for i in range(4))
            )
            assert again == [[DELIVERED]] * 4
            assert len(fw.maildir.list_folder(ALICE)) == 4

    asyncio.run(scenario())
