"""CPU cost of the PEC format core: building and signing each message, verifying an envelope,
and the format processes' whole work for one end-to-end local message, Maildir deliveries
included (those in a temporary directory, on the filesystem of ``--dir``).

.venv/bin/python bench/bench_formats.py [--digest sha256|sha1] [--size-kb 4] [--rounds 200]
    [--batch 16] [--dir /tmp] [--profile]

"per message" is what the format processes do for one message sent between two local mailboxes:
the accettazione and the transport envelope (one call), the delivery point's round trip (verify,
store the envelope, presa in carico, avvenuta consegna), and the three stored receipts, delivered
``--batch`` at a time as the store stage's outbox does. Each call's arguments and answer go
through pickle as they do between the server and a worker. CPU is this process's user + system
time (``resource.getrusage``); fsync's work in the kernel's own threads is not in it.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pickle
import pstats
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pecd.clock import SystemClock
from pecd.engine.delivery import receipts_owed
from pecd.engine.effects import Delivery, TakeInCharge
from pecd.mailbox.maildir import MaildirStore
from pecd.pec import builders
from pecd.pec.builders import ProviderIdentity, Transmission
from pecd.pec.classify import classify
from pecd.pec.pki import create_dev_pki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time
from pecd.runtime.delivering import build_each, deliver_each, portable, take_in_charge


def timed(name: str, fn: Callable[[], Any], rounds: int) -> Any:
    result = fn()
    t0, c0 = time.perf_counter(), cpu()
    for _ in range(rounds):
        result = fn()
    t1, c1 = time.perf_counter(), cpu()
    print(
        f"  {name:<22} {(t1 - t0) / rounds * 1000:7.2f} ms, CPU {(c1 - c0) / rounds * 1000:.2f} ms"
    )
    return result


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def usr() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def across(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as a worker call: arguments and answer through pickle (``fn`` is what
    runs in the worker: the provider and the Maildir store live there)."""
    args = pickle.loads(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
    return pickle.loads(pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digest", choices=["sha256", "sha1"], default="sha256")
    ap.add_argument("--size-kb", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="stored receipts per delivery call")
    ap.add_argument("--dir", default=None, help="where the Maildir tree goes (a temporary dir)")
    ap.add_argument("--profile", action="store_true", help="cProfile of the per-message work")
    args = ap.parse_args()
    now = datetime.now(UTC)
    pki = create_dev_pki(domain="pec.bench.test", name="Bench PEC", now=now)
    provider = ProviderIdentity(
        name="Bench PEC",
        domain="pec.bench.test",
        service_address="posta-certificata@pec.bench.test",
        signer=KeySigner.from_pem(pki.signing.key_pem, pki.signing.cert_pem),
        digest=args.digest,
    )
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    raw = (
        "From: a@pec.bench.test\r\nTo: b@pec.bench.test\r\nSubject: bench\r\n"
        "Message-ID: <m@client>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        + line
        * max(1, args.size_kb * 1024 // len(line))
    ).encode()
    when = pec_time(now)
    tx = Transmission.from_submission(
        raw,
        mail_from="a@pec.bench.test",
        rcpt_to=["b@pec.bench.test"],
        identificativo=provider.new_msgid(when),
        is_certified=lambda _a: True,
    )
    r = args.rounds
    print(f"pec/ format costs, {args.digest}, RSA-2048, {args.size_kb} KB original, {r} rounds")
    timed("accettazione", lambda: builders.accettazione(tx, provider, when), r)
    env = timed(
        "transport envelope", lambda: builders.transport_envelope(raw, tx, provider, when), r
    )
    c = timed("classify+verify env", lambda: classify(env.raw), r)
    timed(
        "presa in carico",
        lambda: builders.presa_in_carico(
            tx, provider, when, ricezione=["b@pec.bench.test"], mail_receipt="r@pec.bench.test"
        ),
        r,
    )
    timed(
        "avvenuta consegna",
        lambda: builders.avvenuta_consegna(
            tx, provider, when, recipient="b@pec.bench.test", postacert=c.postacert
        ),
        r,
    )

    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-formats-", dir=args.dir))
    try:
        store = MaildirStore(tmp)
        senders = [f"sender{i}@pec.bench.test" for i in range(10)]
        for s in [*senders, *(f"rcpt{i}@pec.bench.test" for i in range(10))]:
            store.ensure(s)
        store.ensure(provider.service_address)

        data = builders.accettazione(tx, provider, when).raw
        n = 0

        def deliveries(count: int, fresh: bool) -> None:
            nonlocal n
            items = []
            for _ in range(count):
                n += 1
                items.append(Delivery(senders[n % 10], f"bench:{n}", data, None))
            across(functools.partial(deliver_each, store), items, fresh)

        t0, c0 = time.perf_counter(), cpu()
        for _ in range(r):
            deliveries(1, False)
        t1, c1 = time.perf_counter(), cpu()
        print(
            f"  {'deliver 1 (call of 1)':<22} {(t1 - t0) / r * 1000:7.2f} ms,"
            f" CPU {(c1 - c0) / r * 1000:.2f} ms"
        )
        calls = max(1, r // args.batch)
        t0, c0 = time.perf_counter(), cpu()
        for _ in range(calls):
            deliveries(args.batch, False)
        t1, c1 = time.perf_counter(), cpu()
        k = calls * args.batch
        print(
            f"  {f'deliver 1 (call of {args.batch})':<22} {(t1 - t0) / k * 1000:7.2f} ms,"
            f" CPU {(c1 - c0) / k * 1000:.2f} ms"
        )

        def one_message(i: int, stored: list[Delivery]) -> None:
            sender, rcpt = senders[i % 10], f"rcpt{i % 10}@pec.bench.test"
            t = Transmission.from_submission(
                raw.replace(b"a@pec", sender.split("@")[0].encode() + b"@pec"),
                mail_from=sender,
                rcpt_to=[rcpt],
                identificativo=provider.new_msgid(when),
                is_certified=lambda _a: True,
            )
            acc, envelope = across(
                functools.partial(build_each, provider),
                [
                    functools.partial(builders.accettazione, tx=t, when=when),
                    functools.partial(builders.transport_envelope, raw, tx=t, when=when),
                ],
            )
            cmd = TakeInCharge(
                envelope.raw,
                (Delivery(rcpt, f"{t.identificativo}:{rcpt}", envelope.raw, None),),
                functools.partial(
                    builders.presa_in_carico,
                    tx=t,
                    when=when,
                    ricezione=[rcpt],
                    mail_receipt=provider.service_address,
                ),
                functools.partial(receipts_owed, provider.name, t, [rcpt], {}, [rcpt], False),
            )
            done = across(
                lambda cmd: portable(take_in_charge(provider, store, cmd, SystemClock())), cmd
            )
            assert done.presa is not None and done.receipts
            stored += [
                Delivery(sender, f"{t.identificativo}:acc", acc.raw, None),
                Delivery(provider.service_address, f"{t.identificativo}:presa", done.presa.raw),
                Delivery(sender, f"{t.identificativo}:esito", done.receipts[0][2].raw, None),
            ]
            while len(stored) >= args.batch:
                batch, stored[:] = stored[: args.batch], stored[args.batch :]
                across(functools.partial(deliver_each, store), batch, False)

        def messages(count: int) -> None:
            stored: list[Delivery] = []
            for i in range(count):
                one_message(i, stored)
            if stored:
                across(functools.partial(deliver_each, store), stored, False)

        messages(5)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            messages(r)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
            pstats.Stats(prof).sort_stats("tottime").print_stats(35)
        t0, c0, u0 = time.perf_counter(), cpu(), usr()
        messages(r)
        t1, c1, u1 = time.perf_counter(), cpu(), usr()
        print(
            f"  {'per message (e2e local)':<22} {(t1 - t0) / r * 1000:7.2f} ms,"
            f" CPU {(c1 - c0) / r * 1000:.2f} ms (user {(u1 - u0) / r * 1000:.2f} ms)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
