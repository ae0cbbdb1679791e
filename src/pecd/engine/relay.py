"""The relay's rules: what a send to the next hop means for each recipient (RFC 6109 2.2.2).

Accepted recipients are done. A recipient refused for good (5xx) of a transport envelope, when it
is a PEC recipient, gets the sender an errore-consegna signed by this provider (pecd's choice: the
rules expect it from the recipient's provider, which never saw the message; spec UNSURE). A
recipient refused for now (4xx, no connection) is tried again after an exponential backoff, until
``relay_expire_hours`` after the first attempt; then it is given up with no errore-consegna: the
24 h timer's final notice is what tells the sender (spec 2.3), the trace log keeps the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from pecd.engine.context import Context
from pecd.engine.effects import Build, Effect, Enqueue, Record, Send, Sent, Settle, Stage
from pecd.engine.vocab import JobKind, RelayKind, RelayPayload, TraceEventData, TraceType
from pecd.pec import builders
from pecd.pec.address import domain_of
from pecd.pec.builders import BuiltMessage, Transmission
from pecd.pec.dsn import Failure, delivery_status_notification
from pecd.pec.mime import get_first
from pecd.pec.texts import errore_esteso_from_reply, smtp_reply_parts
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import DestinatarioTipo, Errore


def errore_for(reply: str) -> Errore:
    """The daticert errore for a peer's SMTP reply (``"550 5.1.1 ..."``)."""
    code, _reason = smtp_reply_parts(reply)
    if code.startswith("5.1.1"):
        return Errore.NO_DEST
    if code.startswith("5.1.2"):
        return Errore.NO_DOMINIO
    return Errore.ALTRO


def retry_delay(rules_base: float, rules_max: float, attempt: int) -> timedelta:
    """How long after its ``attempt``-th try a relay is tried again."""
    return timedelta(seconds=min(rules_base * 2 ** (attempt - 1), rules_max))


def relay(
    ctx: Context, key: str, p: RelayPayload, data: bytes, *, created_at: datetime, now: datetime
) -> Stage:
    """Stage of a RELAY job ``key`` (created at ``created_at``), tried at ``now``."""
    rcpts = list(p.recipients)
    mail_from = p.mail_from or ctx.provider.service_address
    sent: Sent = yield Send(domain_of(rcpts[0]), mail_from, tuple(rcpts), data)
    refused, retry = dict(sent.refused), dict(sent.retry)
    since = p.since or created_at
    gave_up: dict[str, str] = {}
    expired: dict[str, str] = {}  # recipient -> the last reason it was not accepted
    if now - since > timedelta(hours=ctx.rules.relay_expire_hours):
        hours = ctx.rules.relay_expire_hours
        gave_up = {r: f"4.4.7 expired after {hours:g} h: {m}" for r, m in retry.items()}
        expired, retry = retry, {}
    accepted = [r for r in rcpts if r not in refused and r not in retry and r not in gave_up]

    tx = p.tx
    notices: list[tuple[str, str]] = []
    if tx is not None and p.kind is RelayKind.ENVELOPE:
        certified = {d.address for d in tx.destinatari if d.tipo is DestinatarioTipo.CERTIFICATO}
        # esterno recipients: the rules owe no PEC notice; the trace log keeps the failure.
        notices = [(r, reply) for r, reply in refused.items() if r in certified]
    built = []
    if notices:
        assert tx is not None
        when = pec_time(now)
        built = yield Build(
            tuple(
                functools.partial(
                    builders.errore_consegna,
                    tx=tx,
                    when=when,
                    recipient=rcpt,
                    errore=errore_for(reply),
                    errore_esteso=errore_esteso_from_reply(reply, ctx.provider.name),
                )
                for rcpt, reply in notices
            )
        )

    effects: list[Effect] = []
    if accepted:
        effects.append(Record(relay_event(TraceType.RELAYED, key, p, now, accepted, None)))
    failed = {**refused, **gave_up}
    if failed:
        effects.append(
            Record(
                relay_event(
                    TraceType.RELAY_FAILED, key, p, now, list(failed), "; ".join(failed.values())
                )
            )
        )
    for (rcpt, reply), notice in zip(notices, built, strict=True):
        assert tx is not None
        effects.append(Settle(tx.identificativo, rcpt, now, TraceType.ERRORE_CONSEGNA))
        effects += ctx.emit(
            key=f"esito:{tx.identificativo}:{rcpt}",  # one esito per recipient, ever
            mailbox=tx.mittente,
            msg=notice,
            event=ctx.event(
                TraceType.ERRORE_CONSEGNA,
                tx,
                now,
                [notice],
                error=reply,
                data={"consegna": rcpt, "relay": key},
            ),
        )
    if tx is not None and p.kind is RelayKind.ENVELOPE:
        effects += status_notification(ctx, key, tx, data, refused, expired, since, now)
    if retry:
        effects += again(ctx, key, p, data, retry, since, now)
    return effects


def status_notification(
    ctx: Context,
    key: str,
    tx: Transmission,
    envelope: bytes,
    refused: Mapping[str, str],
    expired: Mapping[str, str],
    since: datetime,
    now: datetime,
) -> list[Effect]:
    """Ordinary-mail (esterno) recipients refused for good or given up: the rules owe no PEC
    notice, so the sender hears it as mail does, in an RFC 3464 delivery status notification
    from our service address (not signed, not a receipt)."""
    esterni = {d.address for d in tx.destinatari if d.tipo is DestinatarioTipo.ESTERNO}
    failures = [Failure.refused(r, reply, at=now) for r, reply in refused.items() if r in esterni]
    failures += [
        Failure.expired_after(r, why, at=now) for r, why in expired.items() if r in esterni
    ]
    if not failures or not tx.mittente:
        return []
    raw = delivery_status_notification(
        reporting_mta=ctx.provider.domain,
        sender=tx.mittente,
        from_address=ctx.provider.service_address,
        from_name=ctx.provider.name,
        original=envelope,
        failures=failures,
        when=now,
        message_id_domain=ctx.provider.domain,
        arrival=since,
        # The same notification if this stage runs again.
        msgid_token=hashlib.sha256(key.encode()).hexdigest()[:32],
    )
    msg = BuiltMessage(raw, (get_first(raw, "Message-ID") or "").strip("<> "), None, (tx.mittente,))
    event = ctx.event(
        TraceType.DSN,
        tx,
        now,
        error="; ".join(f"{f.recipient}: {f.status}" for f in failures),
        data={"relay": key, "esterni": [f.recipient for f in failures]},
    )
    # Not signed: no signer in the event, only the notification's id.
    event = dataclasses.replace(event, generated_ids=[msg.message_id])
    return ctx.emit(key=f"dsn:{key}", mailbox=tx.mittente, msg=msg, event=event)


def again(
    ctx: Context,
    key: str,
    p: RelayPayload,
    data: bytes,
    retry: Mapping[str, str],
    since: datetime,
    now: datetime,
) -> list[Effect]:
    """The next attempt for the recipients not accepted yet: a job of its own, due after an
    exponential backoff, that keeps the first attempt's time for the expiry. Every attempt is in
    the trace log."""
    reasons = "; ".join(sorted(set(retry.values())))
    delay = retry_delay(ctx.rules.base_delay_seconds, ctx.rules.max_delay_seconds, p.attempt)
    nxt = dataclasses.replace(
        p, recipients=tuple(sorted(retry)), since=since, attempt=p.attempt + 1
    )
    return [
        Record(relay_event(TraceType.RELAY_RETRY, key, p, now, sorted(retry), reasons)),
        Enqueue(
            JobKind.RELAY,
            f"{key.split(':retry:')[0]}:retry:{p.attempt}",
            nxt,
            data,
            now,
            run_at=now + delay,
        ),
    ]


def relay_event(
    event: TraceType,
    key: str,
    p: RelayPayload,
    at: datetime,
    recipients: Sequence[str],
    error: str | None,
) -> TraceEventData:
    tx: Transmission | None = p.tx
    return TraceEventData(
        at=at,
        event=event,
        pec_msgid=tx.identificativo if tx else p.pec_msgid,
        client_msgid=tx.msgid if tx else None,
        sender=p.mail_from,
        recipients=[{"address": r} for r in recipients],
        subject=tx.oggetto if tx else None,
        generated_ids=[p.message_id] if p.message_id else [],
        error=error,
        data={"job": key, "kind": p.kind.value, "attempt": p.attempt},
    )
