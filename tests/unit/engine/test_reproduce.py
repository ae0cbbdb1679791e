"""Receipt reproduction's decisions (pecd.engine.reproduce), without a database: which logged
events are receipts this provider issued, which one a request picks, and what the builder gets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pecd.engine.reproduce import (
    LoggedEvent,
    NoReceipt,
    Reproduction,
    SeveralReceipts,
    Wanted,
    choose,
    describe,
    is_issued_receipt,
    matching,
    plan,
    reproduce,
)
from pecd.pec.builders import ProviderIdentity
from pecd.pec.classify import classify
from pecd.pec.daticert import Daticert, DaticertError, Destinatario, to_json
from pecd.pec.mime import get_first
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import H_RIPRODUZIONE, DaticertTipo, Errore, Ricevuta

ID = "opec-1.20260302091530.1234@pec.example.test"
ALICE, BOB, CAROL = "alice@pec.example.test", "bob@pec.example.test", "carol@pec.example.test"
RECEIPTS_BOX = "ricevute@pec.example.test"


def daticert(tipo: DaticertTipo, *, consegna: str | None = None, **kw: Any) -> dict[str, Any]:
    d = Daticert(
        tipo=tipo,
        mittente=ALICE,
        destinatari=(Destinatario(BOB), Destinatario(CAROL)),
        risposte=ALICE,
        gestore_emittente="Example PEC S.p.A.",
        giorno="02/03/2026",
        ora="10:15:30",
        zona="+0100",
        identificativo=ID,
        oggetto="Fattura",
        msgid="<client-42@alice.laptop>",
        consegna=consegna,
        **kw,
    )
    return to_json(d)


def event(
    id: int,
    tipo: DaticertTipo,
    *,
    consegna: str | None = None,
    event_type: str | None = None,
    data: dict[str, Any] | None = None,
    **kw: Any,
) -> LoggedEvent:
    return LoggedEvent(
        id=id,
        event=event_type or tipo.value,
        daticert=daticert(tipo, consegna=consegna, **kw),
        data=data,
    )


# One transmission's log: the envelope, its acceptance, two deliveries, and events without
# a daticert of their own (a relay, a job note).
LOG = [
    LoggedEvent(id=1, event="received", daticert=None),
    event(2, DaticertTipo.POSTA_CERTIFICATA),
    event(3, DaticertTipo.ACCETTAZIONE, data={"to": ALICE}),
    event(4, DaticertTipo.AVVENUTA_CONSEGNA, consegna=BOB),
    event(5, DaticertTipo.ERRORE_CONSEGNA, consegna=CAROL, errore=Errore.NO_DEST),
    # A daticert logged under another event's name (e.g. a receipt received from a peer).
    event(6, DaticertTipo.AVVENUTA_CONSEGNA, consegna=BOB, event_type="receipt-received"),
    LoggedEvent(id=7, event="relay", daticert={}),
]


def test_only_receipts_this_provider_issued_count() -> None:
    assert [e.id for e in LOG if is_issued_receipt(e)] == [3, 4, 5]


@pytest.mark.parametrize(
    ("wanted", "ids"),
    [
        (Wanted(ID), [3, 4, 5]),
        (Wanted(ID, tipo="accettazione"), [3]),
        (Wanted(ID, tipo="avvenuta-consegna"), [4]),
        (Wanted(ID, recipient=f"  {CAROL.upper()} "), [5]),
        (Wanted(ID, recipient=BOB, tipo="errore-consegna"), []),
        (Wanted(ID, event_id=4), [4]),
        (Wanted(ID, event_id=2), []),
        (Wanted(ID, tipo="posta-certificata"), []),
    ],
)
def test_matching_filters(wanted: Wanted, ids: list[int]) -> None:
    assert [e.id for e in matching(LOG, wanted)] == ids


def test_choose_one_or_say_why_not() -> None:
    assert choose(LOG, Wanted(ID, tipo="accettazione")).id == 3
    with pytest.raises(NoReceipt) as none:
        choose(LOG, Wanted(ID, tipo="non-accettazione"))
    assert str(none.value) == f"{ID}: no matching receipt in the trace log"
    with pytest.raises(NoReceipt):
        choose([], Wanted(ID))
    with pytest.raises(SeveralReceipts) as several:
        choose(LOG, Wanted(ID))
    assert [e.id for e in several.value.events] == [3, 4, 5]
    assert str(several.value) == (
        "several receipts match (event 3: accettazione, "
        f"event 4: avvenuta-consegna for {BOB}, event 5: errore-consegna for {CAROL})"
    )
    assert describe(LOG[3]) == f"event 4: avvenuta-consegna for {BOB}"


def test_plan_sends_where_the_log_says_else_to_the_sender() -> None:
    logged = plan(LOG[2], mail_receipt=RECEIPTS_BOX)
    assert logged == Reproduction(daticert=logged.daticert, to=ALICE, virus=False)
    assert logged.daticert.tipo is DaticertTipo.ACCETTAZIONE
    assert to_json(logged.daticert) == LOG[2].daticert
    delivered = plan(event(8, DaticertTipo.AVVENUTA_CONSEGNA, consegna=BOB), mail_receipt="x@y")
    assert (delivered.to, delivered.virus) == (ALICE, False)
    other = plan(
        event(9, DaticertTipo.ACCETTAZIONE, data={"to": "elsewhere@pec.example.test"}),
        mail_receipt=RECEIPTS_BOX,
    )
    assert other.to == "elsewhere@pec.example.test"


def test_plan_a_presa_in_carico_goes_to_the_receipts_mailbox() -> None:
    r = plan(event(10, DaticertTipo.PRESA_IN_CARICO), mail_receipt=RECEIPTS_BOX)
    assert r.to == RECEIPTS_BOX
    logged = plan(
        event(11, DaticertTipo.PRESA_IN_CARICO, data={"to": "ricevute@pec.other.test"}),
        mail_receipt=RECEIPTS_BOX,
    )
    assert logged.to == "ricevute@pec.other.test"


def test_plan_marks_a_virus_error() -> None:
    r = plan(
        event(12, DaticertTipo.ERRORE_CONSEGNA, consegna=BOB, errore=Errore.VIRUS),
        mail_receipt=RECEIPTS_BOX,
    )
    assert r.virus
    assert not plan(LOG[4], mail_receipt=RECEIPTS_BOX).virus  # no-dest


def test_plan_refuses_a_daticert_that_is_not_one() -> None:
    broken = LoggedEvent(id=13, event="accettazione", daticert={"tipo": "accettazione"})
    assert is_issued_receipt(broken)
    with pytest.raises(DaticertError):
        plan(broken, mail_receipt=RECEIPTS_BOX)


def test_reproduce_builds_the_same_daticert_signed_now(signer: KeySigner) -> None:
    provider = ProviderIdentity(
        name="Example PEC S.p.A.",
        domain="pec.example.test",
        service_address="posta-certificata@pec.example.test",
        signer=signer,
    )
    r = plan(LOG[3], mail_receipt=RECEIPTS_BOX)
    msg = reproduce(r, provider, pec_time(datetime(2026, 9, 1, 8, 0, tzinfo=UTC)))
    c = classify(msg.raw)
    assert c.ricevuta is Ricevuta.AVVENUTA_CONSEGNA and c.signature.valid
    assert c.daticert == r.daticert  # the logged one, original time included
    assert get_first(msg.raw, H_RIPRODUZIONE) is not None
