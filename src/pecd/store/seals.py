"""Tamper evidence for the trace log: signed seals chained over every event.

Sealing takes every event no seal covers yet (``seal_id IS NULL``), marks it with a new seal in the
same transaction (``UPDATE … RETURNING``, so the seal lists exactly the rows it marked), and
stores in the seal the id and SHA-256 of each event, the previous seal's hash, and a signature by
the provider key over all of it. Marking by ``seal_id`` instead of by id range means an event whose
transaction commits late is simply taken by the next seal: nothing is skipped and nothing is
covered twice, with any number of nodes sealing (on PostgreSQL they take turns on an advisory
lock; SQLite has one writer anyway).

Verification recomputes everything and names each event that was changed (its digest differs),
deleted (listed by its seal, gone from the table), or inserted (marked with a seal that does not
list it, or left unsealed although older than the sealing interval), and each seal that was
changed, deleted or forged.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import multiprocessing
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from sqlalchemy import (
    ColumnElement,
    Text,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from pecd.pec.smime import Signer
from pecd.store import sealcheck, virus
from pecd.store.db import Database
from pecd.store.models import TraceEvent, TraceHorizon, TraceSeal, TraceSigner
from pecd.store.trace import FIELDS

_SEAL_LOCK = 0x7365616C  # "seal": one sealer at a time on PostgreSQL
_DIGEST = struct.Struct(">q32s")  # event id, SHA-256
# What a seal covers of an event: every field but the seal mark itself.
_COLUMNS = tuple(name for name in FIELDS if name != "seal_id")


def canonical(dialect: str) -> Any:
    """One event's canonical text, computed by the database: every column but ``seal_id`` as
    text (JSON as stored, the time in UTC), each quoted as an SQL literal (quotes doubled, NULL
    unquoted) and comma-separated, so that no two different rows give the same text. Doing
    this in SQL keeps verification at the speed of reading rows."""
    quote = func.quote_nullable if dialect == "postgresql" else func.quote
    parts: list[ColumnElement[Any]] = []
    for name in _COLUMNS:
        col = getattr(TraceEvent, name)
        if dialect != "postgresql":
            parts.append(quote(col))  # SQLite: quote() takes any stored value as it is
        elif name == "at":
            parts.append(quote(cast(func.timezone("UTC", col), Text)))  # whatever the TimeZone
        else:
            parts.append(quote(cast(col, Text)))
    expr = parts[0]
    for part in parts[1:]:
        expr = expr.op("||")(literal_column("','")).op("||")(part)
    return cast(expr, Text).label("canonical")


def event_digest(canonical_text: str) -> bytes:
    return hashlib.sha256(canonical_text.encode("utf-8")).digest()


def seal_content(seal: Any) -> bytes:
    """The canonical bytes a seal's hash and signature cover."""
    created = seal.created_at.astimezone(UTC).isoformat()
    return json.dumps(
        {
            "v": 1,
            "id": seal.id,
            "created_at": created,
            "node": seal.node,
            "first_event": seal.first_event,
            "last_event": seal.last_event,
            "count": seal.count,
            "digests_sha256": hashlib.sha256(seal.digests).hexdigest(),
            "prev_hash": seal.prev_hash,
            "signer_sha1": seal.signer_sha1,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _sign(signer: Signer, data: bytes) -> bytes:
    return signer.sign_digest_input(data, "sha256")


def _verify_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


async def seal_pending(
    db: Database, signer: Signer, *, now: datetime, node: str | None, limit: int = 100_000
) -> TraceSeal | None:
    """Seal every event not sealed yet (at most ``limit``, oldest first); None if none."""
    cert_der = signer.certificate.public_bytes(serialization.Encoding.DER)
    signer_sha1 = hashlib.sha1(cert_der).hexdigest()
    async with db.session() as s, s.begin():
        if db.dialect == "postgresql":
            await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEAL_LOCK})
        cap = await s.scalar(
            select(TraceEvent.id)
            .where(TraceEvent.seal_id.is_(None))
            .order_by(TraceEvent.id)
            .offset(limit - 1)
            .limit(1)
        )
        if not await s.scalar(select(TraceEvent.id).where(TraceEvent.seal_id.is_(None)).limit(1)):
            return None
        prev = await s.scalar(select(TraceSeal.seal_hash).order_by(TraceSeal.id.desc()).limit(1))
        if await s.get(TraceSigner, signer_sha1) is None:
            await s.execute(
                insert(TraceSigner).values(sha1=signer_sha1, certificate=cert_der, created_at=now)
            )
        seal_id = await s.scalar(
            insert(TraceSeal)
            .values(
                created_at=now,
                node=node,
                count=0,
                digests=b"",
                prev_hash=prev or "",
                seal_hash="",
                signer_sha1=signer_sha1,
                signature=b"",
            )
            .returning(TraceSeal.id)
        )
        mark = update(TraceEvent).where(TraceEvent.seal_id.is_(None))
        if cap is not None:
            mark = mark.where(TraceEvent.id <= cap)
        rows = (
            await s.execute(
                mark.values(seal_id=seal_id)
                .returning(TraceEvent.id, canonical(db.dialect))
                .execution_options(synchronize_session=False)
            )
        ).all()
        rows = sorted(rows, key=lambda r: r.id)
        seal = await s.get(TraceSeal, seal_id)
        assert seal is not None
        seal.digests = b"".join(_DIGEST.pack(r.id, event_digest(r.canonical)) for r in rows)
        seal.count = len(rows)
        seal.first_event = rows[0].id if rows else None
        seal.last_event = rows[-1].id if rows else None
        content = seal_content(seal)
        seal.seal_hash = hashlib.sha256(content).hexdigest()
        seal.signature = _sign(signer, content)
        return seal


# --- retention ------------------------------------------------------------------------------------


def months_before(t: datetime, months: int) -> datetime:
    """``t`` moved back by whole calendar months (the day clamped to the month's length)."""
    y, m = divmod(t.year * 12 + (t.month - 1) - months, 12)
    m += 1
    days = [
        31,
        29 if y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) else 28,
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ][m - 1]
    return t.replace(year=y, month=m, day=min(t.day, days))


def horizon_content(h: Any) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "last_seal": h.last_seal,
            "last_seal_hash": h.last_seal_hash,
            "purged_at": h.purged_at.astimezone(UTC).isoformat(),
            "events_purged": h.events_purged,
            "signer_sha1": h.signer_sha1,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


async def purge(
    db: Database, signer: Signer, *, now: datetime, retention_months: int
) -> tuple[int, int]:
    """Remove whole seals made before ``retention_months`` ago, and their events. The signed
    horizon then says which seal was removed last, so the chain still verifies from there and
    the removal of anything else is still found. The virus store's messages older than the
    same cutoff (and than the oldest event left) go in the same transaction
    (:func:`pecd.store.virus.purge_expired`). Returns (seals, events) removed."""
    if retention_months < 30:
        raise ValueError("the trace log is kept at least 30 months")
    cutoff = months_before(now, retention_months)
    cert_der = signer.certificate.public_bytes(serialization.Encoding.DER)
    async with db.session() as s, s.begin():
        if db.dialect == "postgresql":
            await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEAL_LOCK})
        old = list(
            (
                await s.execute(
                    select(TraceSeal.id, TraceSeal.seal_hash)
                    .where(TraceSeal.created_at < cutoff)
                    .order_by(TraceSeal.id)
                )
            ).all()
        )
        if not old:
            await virus.purge_expired(s, cutoff=cutoff)  # the virus store goes with the log
            return 0, 0
        last_id, last_hash = old[-1]
        events = (
            await s.execute(
                delete(TraceEvent)
                .where(TraceEvent.seal_id <= last_id, TraceEvent.seal_id.is_not(None))
                .returning(TraceEvent.id)
                .execution_options(synchronize_session=False)
            )
        ).all()
        await s.execute(delete(TraceSeal).where(TraceSeal.id <= last_id))
        sha1 = hashlib.sha1(cert_der).hexdigest()
        if await s.get(TraceSigner, sha1) is None:
            s.add(TraceSigner(sha1=sha1, certificate=cert_der, created_at=now))
        h = await s.get(TraceHorizon, 1)
        before = h.events_purged if h is not None else 0
        fresh = TraceHorizon(
            id=1,
            last_seal=last_id,
            last_seal_hash=last_hash,
            purged_at=now,
            events_purged=before + len(events),
            signer_sha1=sha1,
            signature=b"",
        )
        fresh.signature = _sign(signer, horizon_content(fresh))
        await s.merge(fresh)
        await virus.purge_expired(s, cutoff=cutoff)  # the virus store goes with the log
        return len(old), len(events)


# --- verification ---------------------------------------------------------------------------------


@dataclass
class Finding:
    what: str  # "changed" | "deleted" | "inserted" | "unsealed" | "seal-changed" | "seal-missing" | ...
    event_id: int | None
    seal_id: int | None
    detail: str

    def __str__(self) -> str:
        where = f"event {self.event_id}" if self.event_id is not None else f"seal {self.seal_id}"
        return f"{where}: {self.what}: {self.detail}"


@dataclass
class Report:
    seals: int = 0
    events: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def _unpack(blob: bytes) -> Iterator[tuple[int, bytes]]:
    if len(blob) % _DIGEST.size:
        raise ValueError("digest list has a torn entry")
    for off in range(0, len(blob), _DIGEST.size):
        yield _DIGEST.unpack_from(blob, off)


async def verify(
    db: Database,
    *,
    now: datetime,
    unsealed_grace: timedelta,
    first_seal: int | None = None,
    last_seal: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check the chain, every signature and every event; see the module docstring."""
    report = Report()
    async with db.read_session() as s:
        signers = {
            r.sha1: x509.load_der_x509_certificate(r.certificate)
            for r in (await s.scalars(select(TraceSigner))).all()
        }
        q = select(TraceSeal).order_by(TraceSeal.id)
        if first_seal is not None:
            q = q.where(TraceSeal.id >= first_seal)
        if last_seal is not None:
            q = q.where(TraceSeal.id <= last_seal)
        seals = list((await s.scalars(q)).all())
        total_events = int(await s.scalar(select(func.count()).select_from(TraceEvent)) or 0)
        prev_hash: str | None = None
        horizon = await s.get(TraceHorizon, 1)
        if horizon is not None:
            cert = signers.get(horizon.signer_sha1)
            if cert is None or not _verify_signature(
                cert, horizon.signature, horizon_content(horizon)
            ):
                report.findings.append(
                    Finding(
                        "horizon-forged",
                        None,
                        horizon.last_seal,
                        "the purge record does not verify",
                    )
                )
        if first_seal is None:
            # The chain starts at the genesis, or right after the last purged seal.
            prev_hash = horizon.last_seal_hash if horizon is not None else ""
        if seals and first_seal is not None:
            prev_hash = await s.scalar(
                select(TraceSeal.seal_hash)
                .where(TraceSeal.id < seals[0].id)
                .order_by(TraceSeal.id.desc())
                .limit(1)
            )
        prev_id: int | None = (
            horizon.last_seal if horizon is not None and first_seal is None else None
        )
        for seal in seals:
            report.seals += 1
            _check_seal(seal, prev_hash, prev_id, signers, report)
            prev_hash, prev_id = seal.seal_hash, seal.id
        # The events of each seal, two seals at a time on connections of their own: the
        # database computes the canonical text and releases the GIL meanwhile, so both cores
        # work.
        limit = asyncio.Semaphore(2)
        path = _sqlite_path(db)
        pool = _verify_pool() if path is not None and len(seals) > 1 else None

        async def one(seal: TraceSeal) -> None:
            async with limit:
                if pool is not None and path is not None:
                    # Fast path on SQLite: read and hash in another process, compare here.
                    loop = asyncio.get_running_loop()
                    try:
                        n, actual = await loop.run_in_executor(
                            pool, sealcheck.digests, path, _seal_sql(), seal.id
                        )
                    except (BrokenProcessPool, OSError):
                        n, actual = 0, b""  # no helper process: check it here instead
                    if actual == seal.digests and n:
                        report.events += n
                        if progress is not None:
                            progress(report.events, total_events)
                        return
                async with db.read_session() as s2:
                    await _check_events(s2, seal, report)
            if progress is not None:
                progress(report.events, total_events)

        try:
            await asyncio.gather(*(one(seal) for seal in seals))
        finally:
            if pool is not None:
                pool.shutdown(wait=False)
        report.findings.sort(key=lambda f: (f.event_id is None, f.event_id or 0, f.seal_id or 0))
        # Events marked with a seal that does not exist, or never sealed although old enough.
        known = select(TraceSeal.id)
        orphans = (
            await s.execute(
                select(TraceEvent.id, TraceEvent.seal_id)
                .where(TraceEvent.seal_id.is_not(None), TraceEvent.seal_id.not_in(known))
                .order_by(TraceEvent.id)
            )
        ).all()
        for eid, sid in orphans:
            report.findings.append(
                Finding("inserted", eid, sid, f"marked with seal {sid}, which does not exist")
            )
        if first_seal is None and last_seal is None:
            stale = (
                await s.execute(
                    select(TraceEvent.id)
                    .where(TraceEvent.seal_id.is_(None), TraceEvent.at < now - unsealed_grace)
                    .order_by(TraceEvent.id)
                )
            ).all()
            for (eid,) in stale:
                report.findings.append(
                    Finding(
                        "unsealed",
                        eid,
                        None,
                        "older than the sealing interval and not sealed (inserted?)",
                    )
                )
    return report


def _check_seal(
    seal: TraceSeal,
    prev_hash: str | None,
    prev_id: int | None,
    signers: dict[str, x509.Certificate],
    report: Report,
) -> None:
    content = seal_content(seal)
    if hashlib.sha256(content).hexdigest() != seal.seal_hash:
        report.findings.append(
            Finding("seal-changed", None, seal.id, "content does not match its hash")
        )
    cert = signers.get(seal.signer_sha1)
    if cert is None:
        report.findings.append(Finding("seal-forged", None, seal.id, "signer certificate unknown"))
    elif not _verify_signature(cert, seal.signature, content):
        report.findings.append(Finding("seal-forged", None, seal.id, "signature does not verify"))
    # A gap in the ids alone is no finding: on PostgreSQL a seal whose transaction never
    # committed (its node killed, its connection lost, the signer failing after the insert)
    # used up its sequence value. A seal really removed also breaks the chain of hashes.
    linked = prev_hash is not None and seal.prev_hash == prev_hash
    if prev_id is not None and seal.id != prev_id + 1 and not linked:
        report.findings.append(
            Finding("seal-missing", None, seal.id, f"seals {prev_id + 1}..{seal.id - 1} are gone")
        )
    if prev_hash is not None and seal.prev_hash != prev_hash:
        report.findings.append(
            Finding(
                "seal-chain",
                None,
                seal.id,
                "does not follow the previous seal (changed or removed)",
            )
        )


def _sqlite_path(db: Database) -> str | None:
    if db.dialect != "sqlite":
        return None
    name = db.engine.url.database
    return name if name and name != ":memory:" and not name.startswith("file:") else None


@functools.cache
def _seal_sql() -> str:
    stmt = (
        select(TraceEvent.id, canonical("sqlite"))
        .where(TraceEvent.seal_id == bindparam("sid"))
        .order_by(TraceEvent.id)
    )
    compiled = stmt.compile(dialect=sqlite_dialect(), compile_kwargs={"literal_binds": False})
    return str(compiled)


def _verify_pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))


async def _check_events(s: AsyncSession, seal: TraceSeal, report: Report) -> None:
    rows = (
        await s.execute(
            select(TraceEvent.id, canonical(s.get_bind().dialect.name))
            .where(TraceEvent.seal_id == seal.id)
            .order_by(TraceEvent.id)
        )
    ).all()
    report.events += len(rows)
    sha256 = hashlib.sha256
    actual = b"".join(_DIGEST.pack(eid, sha256(text_.encode()).digest()) for eid, text_ in rows)
    if actual == seal.digests:
        return  # the usual case: byte for byte what was sealed
    try:
        listed = dict(_unpack(seal.digests))
    except ValueError as exc:
        report.findings.append(Finding("seal-changed", None, seal.id, str(exc)))
        listed = {}
    seen: set[int] = set()
    for eid, text_ in rows:
        seen.add(eid)
        want = listed.get(eid)
        if want is None:
            report.findings.append(Finding("inserted", eid, seal.id, "not listed by its seal"))
        elif want != event_digest(text_):
            report.findings.append(Finding("changed", eid, seal.id, "differs from what was sealed"))
    for eid in sorted(set(listed) - seen):
        report.findings.append(Finding("deleted", eid, seal.id, "sealed, and gone from the log"))
