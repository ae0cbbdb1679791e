"""The status of a transmission, per recipient, from the trace log: shared by the REST API and
the webmail's timeline.

A recipient's status is its latest receipt by weight: a later receipt of a lower weight (a presa
in carico that arrives after the delivery receipt) does not undo a higher one.

Given the Maildir store, each receipt the sender's mailbox holds is also located: the
transmission's accettazione (or non-accettazione), each timeline event's receipt and the receipt
behind each recipient's status get ``receipt``: ``{"folder": "INBOX", "uid": n}`` (None when the
mailbox does not hold it: presa in carico goes to the provider, the holder deleted or moved it).
A receipt is found by its file name: pecd names every Maildir file after the key it was delivered
under, which the trace event says (the intake key, the transmission and the recipient).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from pecd.engine.vocab import JobKind, TraceType
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import INBOX, MaildirStore
from pecd.pec.address import normalize_address
from pecd.store.db import Database
from pecd.store.models import Job, TraceEvent

__all__ = ["receipt_keys", "transmission_status"]

log = logging.getLogger(__name__)

_WEIGHT = {
    TraceType.PRESA_IN_CARICO.value: 1,
    TraceType.PREAVVISO_ERRORE_CONSEGNA.value: 2,
    TraceType.AVVENUTA_CONSEGNA.value: 3,
    TraceType.ERRORE_CONSEGNA.value: 3,
}


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def receipt_keys(e: TraceEvent, mailbox: str) -> list[str]:
    """The keys the receipt event ``e`` may have been delivered under in ``mailbox`` (the sender's),
    as the engine keys them (``engine/submission``, ``delivery``, ``relay``, ``timers``,
    ``reception``); empty for an event that puts nothing in the sender's mailbox."""
    data = e.data or {}
    if e.event in (TraceType.ACCETTAZIONE.value, TraceType.NON_ACCETTAZIONE.value):
        intake = data.get("intake")
        return [f"{intake}:{e.event}"] if intake else []
    if e.event in (
        TraceType.AVVENUTA_CONSEGNA.value,
        TraceType.ERRORE_CONSEGNA.value,
        TraceType.PREAVVISO_ERRORE_CONSEGNA.value,
    ):
        consegna = data.get("consegna")
        if not consegna:
            return []
        if data.get("timer") is not None:
            return [f"timer:{e.pec_msgid}:{consegna}:{data['timer']}"]
        return list(
            dict.fromkeys(
                f"esito:{e.pec_msgid}:{c}" for c in (consegna, normalize_address(str(consegna)))
            )
        )
    if e.event == TraceType.RICEVUTA_RICEVUTA.value and data.get("receipt"):
        return [f"ricevuta:{data['receipt']}:{mailbox}"]
    return []


def _locate(store: MaildirStore, mailbox: str, keys: Iterable[str]) -> dict[str, int]:
    """The INBOX UID of the file delivered under each of ``keys`` that is there (by key)."""
    stems = {store.name_for(k): k for k in keys}
    if not stems:
        return {}
    try:
        path = store.folder_path(mailbox, INBOX)
        if not (path / "cur").is_dir():
            return {}
        listing = uidlist.sync(path)
    except (OSError, ValueError) as exc:
        log.warning("cannot list the INBOX of %s: %s", mailbox, exc)
        return {}
    found = {}
    for entry in listing.entries:
        key = stems.get(entry.name.split(",", 1)[0])
        if key is not None:
            found[key] = entry.uid
    return found


async def transmission_status(
    db: Database,
    mailbox: str,
    key: str | None = None,
    *,
    pec_msgid: str | None = None,
    client_msgid: str | None = None,
    maildir: MaildirStore | None = None,
) -> dict[str, Any] | None:
    """What the trace log says of one submission of ``mailbox``, named by exactly one of: its
    intake ``key`` (the id the API hands back), its ``pec_msgid`` (the Message-ID of the
    accettazione and of the envelope) or its ``client_msgid`` (the Message-ID the client gave
    the message; the first submission with it, if the client reused it). None if that mailbox
    has no such submission. With ``maildir``, each receipt is located in the mailbox (see the
    module's documentation)."""
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
    # Each entry (the transmission, a recipient, a timeline event) and its receipt's keys.
    receipts: list[tuple[dict[str, Any], list[str]]] = []
    first_keys = receipt_keys(first, mailbox)
    recipients: dict[str, dict[str, Any]] = {}
    recipient_keys: dict[str, list[str]] = {}
    for r in first.recipients or []:
        address = normalize_address(str(r.get("address", "")))
        recipients[address] = {
            "address": address,
            "tipo": r.get("tipo"),
            "status": "accettazione" if accepted else "non-accettazione",
            "at": _iso(first.at),
            "error": None,
        }
        recipient_keys[address] = first_keys
    timeline: list[dict[str, Any]] = []

    def apply(kind: str, who: list[str], e: TraceEvent, keys: list[str]) -> None:
        for address in who:
            r = recipients.get(normalize_address(address))
            if r is None:
                continue
            if _WEIGHT.get(kind, 0) >= _WEIGHT.get(r["status"], 0):
                r.update(status=kind, at=_iso(e.at), error=e.error)
                recipient_keys[r["address"]] = keys

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
            entry: dict[str, Any] = {"event": e.event, "at": _iso(e.at), "error": e.error}
            timeline.append(entry)
            receipts.append((entry, first_keys))
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
        keys = receipt_keys(e, mailbox)
        apply(kind, who, e, keys)
        entry = {"event": kind, "at": _iso(e.at), "recipients": who, "error": e.error}
        timeline.append(entry)
        receipts.append((entry, keys))
    doc: dict[str, Any] = {
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
    if maildir is not None:
        receipts.append((doc, first_keys))
        receipts += [(recipients[a], k) for a, k in recipient_keys.items()]
        every = {k for _, keys in receipts for k in keys}
        uids = await asyncio.to_thread(_locate, maildir, mailbox, every) if every else {}
        for entry, keys in receipts:
            uid = next((uids[k] for k in keys if k in uids), None)
            entry["receipt"] = None if uid is None else {"folder": INBOX, "uid": uid}
    return doc
