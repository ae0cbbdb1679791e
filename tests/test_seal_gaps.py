"""A seal whose transaction never commits leaves a gap in the seal ids on PostgreSQL (a sequence
value is never given back): the node that was sealing is killed, its connection drops, or the
signer (an HSM) fails after the seal row was inserted. The chain still links across the gap, so
``pecd log verify`` must hold; a seal really removed is still found.

Found by tests/test_cluster.py: a node SIGKILLed while its sealer ran left seals 11 and 13
linked by their hashes, and ``pecd log verify`` said "seal 13: seal-missing: seals 12..12 are
gone" for ever after."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from sqlalchemy import delete, select

from helpers import EVENTS_T0, add_events
from pecd.pec.smime import DigestName, KeySigner
from pecd.store import seals
from pecd.store.db import Database
from pecd.store.models import TraceSeal
from store_fixtures import Backend, db_fixture, pg_url_fixture, sqlite_template_fixture

__all__ = ["db_fixture", "pg_url_fixture", "sqlite_template_fixture"]

T0 = EVENTS_T0
GRACE = timedelta(minutes=5)


class FailingOnce:
    """The provider's signer, as an HSM that fails its first signature."""

    def __init__(self, inner: KeySigner) -> None:
        self.inner = inner
        self.failed = False

    @property
    def certificate(self) -> x509.Certificate:
        return self.inner.certificate

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self.inner.chain

    def sign_digest_input(self, data: bytes, digest: DigestName) -> bytes:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the HSM did not answer")
        return self.inner.sign_digest_input(data, digest)


async def _log_with_a_failed_seal(d: Database, signer: KeySigner) -> list[int]:
    """Events sealed, a seal that fails after its row was inserted, more events sealed; the
    seal ids."""
    await add_events(d, 10)
    assert await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=1), node="n1")
    await add_events(d, 10, start=10)
    flaky = FailingOnce(signer)
    with pytest.raises(RuntimeError, match="HSM"):
        await seals.seal_pending(d, flaky, now=T0 + timedelta(minutes=2), node="n1")
    assert await seals.seal_pending(d, flaky, now=T0 + timedelta(minutes=3), node="n1")
    await add_events(d, 10, start=20)
    assert await seals.seal_pending(d, signer, now=T0 + timedelta(minutes=4), node="n1")
    async with d.read_session() as s:
        return list((await s.scalars(select(TraceSeal.id).order_by(TraceSeal.id))).all())


def test_a_seal_that_never_committed_leaves_the_log_verifiable(
    db: Backend, signer: KeySigner
) -> None:
    async def main(d: Database) -> tuple[list[int], seals.Report]:
        ids = await _log_with_a_failed_seal(d, signer)
        return ids, await seals.verify(d, now=T0 + timedelta(minutes=10), unsealed_grace=GRACE)

    ids, report = db.run(main)
    assert len(ids) == 3
    if db.name == "postgresql":
        assert ids == [1, 3, 4]  # the gap this is about
    assert report.ok, [str(f) for f in report.findings]
    assert (report.seals, report.events) == (3, 30)


def test_a_removed_seal_beside_a_gap_is_still_found(db: Backend, signer: KeySigner) -> None:
    async def main(d: Database) -> seals.Report:
        ids = await _log_with_a_failed_seal(d, signer)
        async with d.session() as s, s.begin():
            await s.execute(delete(TraceSeal).where(TraceSeal.id == ids[1]))
        return await seals.verify(d, now=T0 + timedelta(minutes=10), unsealed_grace=GRACE)

    report = db.run(main)
    whats = {f.what for f in report.findings}
    assert {"seal-missing", "seal-chain", "inserted"} <= whats, [str(f) for f in report.findings]
