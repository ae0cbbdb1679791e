"""The status of a transmission, per recipient, from the trace log: shared by the REST API and
the webmail's timeline.

A recipient's status is its latest receipt by weight: a later receipt of a lower weight (a presa
in carico that arrives after the delivery receipt) does not undo a higher one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from pecd.engine.vocab import JobKind, TraceType
from pecd.pec.address import normalize_address
from pecd.store.db import Database
from pecd.store.models import Job, TraceEvent

__all__ = ["transmission_status"]

_WEIGHT = {
    TraceType.PRESA_IN_CARICO.value: 1,
    TraceType.PREAVVISO_ERRORE_CONSEGNA.value: 2,
    TraceType.AVVENUTA_CONSEGNA.value: 3,
    TraceType.ERRORE_CONSEGNA.value: 3,
}


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


async def transmission_status(
    db: Database,
    mailbox: str,
    key: str | None = None,
    *,
    pec_msgid: str | None = None,
    client_msgid: str | None = None,
) -> dict[str, Any] | None:
    """What the trace log says of one submission of ``mailbox``, named by exactly one of: its
    intake ``key`` (the id the API hands back), its ``pec_msgid`` (the Message-ID of the
    accettazione and of the envelope) or its ``client_msgid`` (the Message-ID the client gave
    the message; the first submission with it, if the client reused it). None if that mailbox
    has no such submission."""
    named = [v for v in (key, pec_msgid, client_msgid) if v is not None]
    if len(named) != 1:
        raise ValueError("name a transmission by exactly one of key, pec_msgid, client_msgid")
    if len(named[0]) > 998:
        return None
    if key is not None:
        which = TraceEvent.data["intake"].as_string() == key
    elif pec_msgid is not None:
        which = TraceEvent.pec_msgid == pec_msgid
    else:
        which = TraceEvent.client_msgid == client_msgid
    async with db.read_session() as s:
        first = (
            await s.scalars(
                select(TraceEvent)
                .where(
                    TraceEvent.sender == mailbox,
                    TraceEvent.event.in_(
                        (TraceType.ACCETTAZIONE.value, TraceType.NON_ACCETTAZIONE.value)
                    ),
                    which,
                )
                .order_by(TraceEvent.id)
                .limit(1)
            )
        ).first()
        if first is None:
            if key is None:
                return None
            job = (await s.scalars(select(Job).where(Job.key == key))).first()
            if (
                job is None
                or job.kind != JobKind.SUBMISSION.value
                or job.payload.get("user") != mailbox
            ):
                return None
            return {"id": key, "status": "queued", "recipients": [], "events": []}
        events = list(
            await s.scalars(
                select(TraceEvent)
                .where(TraceEvent.pec_msgid == first.pec_msgid)
                .order_by(TraceEvent.at, TraceEvent.id)
            )
        )
    accepted = first.event == TraceType.ACCETTAZIONE.value
    recipients: dict[str, dict[str, Any]] = {}
    for r in first.recipients or []:
        address = normalize_address(str(r.get("address", "")))
        recipients[address] = {
            "address": address,
            "tipo": r.get("tipo"),
            "status": "accettazione" if accepted else "non-accettazione",
            "at": _iso(first.at),
            "error": None,
        }
    timeline: list[dict[str, Any]] = []

    def apply(kind: str, who: list[str], e: TraceEvent) -> None:
        for address in who:
            r = recipients.get(normalize_address(address))
            if r is None:
                continue
            if _WEIGHT.get(kind, 0) >= _WEIGHT.get(r["status"], 0):
                r.update(status=kind, at=_iso(e.at), error=e.error)

    for e in events:
        data = e.data or {}
        if e.event in _WEIGHT:
            kind = e.event
            consegna = data.get("consegna")
            who = [str(consegna)] if consegna else list(recipients)
        elif e.event == TraceType.RICEVUTA_RICEVUTA.value and data.get("pertinent"):
            kind = str(data.get("ricevuta"))
            if kind not in _WEIGHT:
                continue
            consegna = data.get("consegna")
            who = [str(consegna)] if consegna else [str(r) for r in data.get("ricezione") or ()]
        elif e is first:
            timeline.append({"event": e.event, "at": _iso(e.at), "error": e.error})
            continue
        else:
            continue
        if kind == TraceType.PRESA_IN_CARICO.value and not data.get("consegna"):
            # A presa in carico speaks for every recipient of that delivery: those still waiting.
            who = [
                a
                for a in who
                if recipients.get(normalize_address(a), {}).get("status")
                in (
                    "accettazione",
                    None,
                )
            ] or who
        apply(kind, who, e)
        timeline.append({"event": kind, "at": _iso(e.at), "recipients": who, "error": e.error})
    return {
        "id": (first.data or {}).get("intake") or key,
        "status": "accepted" if accepted else "not-accepted",
        "pec_msgid": first.pec_msgid,
        "client_msgid": first.client_msgid,
        "subject": first.subject,
        "accepted_at": _iso(first.at) if accepted else None,
        "error": first.error,
        "recipients": list(recipients.values()),
        "events": timeline,
    }
