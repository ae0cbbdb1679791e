"""CPU cost of the PEC format core: building and signing each message, verifying an envelope.

.venv/bin/python bench/bench_formats.py [--digest sha256|sha1] [--size-kb 4] [--rounds 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pecd.pec import builders
from pecd.pec.builders import ProviderIdentity, Transmission
from pecd.pec.classify import classify
from pecd.pec.pki import create_dev_pki
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time


def timed(name: str, fn: Callable[[], Any], rounds: int) -> Any:
    result = fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        result = fn()
    print(f"  {name:<22} {(time.perf_counter() - t0) / rounds * 1000:7.2f} ms")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digest", choices=["sha256", "sha1"], default="sha256")
    ap.add_argument("--size-kb", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
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


if __name__ == "__main__":
    main()
