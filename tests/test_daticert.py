"""daticert.xml: DTD validity, round trips, and what real providers send."""

from __future__ import annotations

import contextlib
import io
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from pecd.pec import daticert as dc
from pecd.pec.daticert import Daticert, DaticertError, Destinatario
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import DaticertTipo, DestinatarioTipo, Errore, TipoRicevuta

DTD = etree.DTD(io.StringIO(dc.dtd_text()))


def assert_valid(xml: bytes) -> None:
    doc = etree.fromstring(xml)
    assert DTD.validate(doc), DTD.error_log.filter_from_errors()


def sample(tipo: DaticertTipo = DaticertTipo.AVVENUTA_CONSEGNA, **kw: object) -> Daticert:
    t = pec_time(datetime(2026, 7, 1, 10, 0, 5, tzinfo=UTC))
    base: dict[str, object] = dict(
        tipo=tipo,
        mittente="alice@pec.example.test",
        destinatari=(
            Destinatario("bob@pec.example.test"),
            Destinatario("carol@gmail.example", DestinatarioTipo.ESTERNO),
        ),
        risposte="alice@pec.example.test",
        oggetto="Fattura n. 12 & <allegati>",
        gestore_emittente="Example PEC S.p.A.",
        giorno=t.giorno,
        ora=t.ora,
        zona=t.zona,
        identificativo="pecd.20260701120005.abc@pec.example.test",
        msgid="<client.1@host>",
    )
    base.update(kw)
    return Daticert(**base)  # type: ignore[arg-type]


def test_build_matches_real_layout() -> None:
    xml = dc.build(sample(ricevuta=TipoRicevuta.COMPLETA, consegna="bob@pec.example.test"))
    text = xml.decode()
    assert text.startswith(
        '<?xml version="1.0" encoding="UTF-8"?>\n<postacert tipo="avvenuta-consegna"'
    )
    assert "<!DOCTYPE" not in text
    assert "        <msgid>&lt;client.1@host&gt;</msgid>" in text
    assert '        <ricevuta tipo="completa" />' in text
    assert '<data zona="+0200">' in text  # July: summer time in Rome
    assert "<giorno>01/07/2026</giorno>" in text and "<ora>12:00:05</ora>" in text
    assert_valid(xml)


@pytest.mark.parametrize("tipo", list(DaticertTipo))
def test_every_tipo_validates_against_dtd(tipo: DaticertTipo) -> None:
    has_ricevuta, has_consegna = dc.expected_elements(tipo)
    d = sample(
        tipo,
        ricevuta=TipoRicevuta.BREVE if has_ricevuta else None,
        consegna="bob@pec.example.test" if has_consegna else None,
        ricezione=("bob@pec.example.test",) if tipo is DaticertTipo.PRESA_IN_CARICO else (),
        errore_esteso="5.1.1 - Example - indirizzo non valido"
        if tipo is DaticertTipo.ERRORE_CONSEGNA
        else None,
        errore=Errore.NO_DEST if tipo is DaticertTipo.ERRORE_CONSEGNA else Errore.NESSUNO,
    )
    xml = dc.build(d)
    assert_valid(xml)
    assert dc.parse(xml) == d


def test_winter_zone_and_instant() -> None:
    t = pec_time(datetime(2026, 1, 15, 23, 30, tzinfo=UTC))
    d = sample(giorno=t.giorno, ora=t.ora, zona=t.zona)
    assert (d.giorno, d.ora, d.zona) == ("16/01/2026", "00:30:00", "+0100")
    assert d.instant == datetime(2026, 1, 15, 23, 30, tzinfo=UTC)


def test_parse_accepts_provider_variations() -> None:
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE postacert SYSTEM "Postacert.dtd">
<postacert tipo="errore-consegna" errore="no-dest"><intestazione>
  <mittente> a@x.it </mittente><destinatari>b@y.it</destinatari>
  <risposte>a@x.it</risposte></intestazione>
  <dati><gestore-emittente>G</gestore-emittente>
  <data zona="+01:00"><giorno>15/11/2024</giorno><ora>18:21:03</ora></data>
  <identificativo>id@x.it</identificativo><consegna>b@y.it</consegna>
  <errore-esteso>5.1.1 - G - indirizzo non valido</errore-esteso></dati></postacert>"""
    d = dc.parse(xml)
    assert d.mittente == "a@x.it"
    assert d.destinatari == (Destinatario("b@y.it", DestinatarioTipo.CERTIFICATO),)
    assert d.oggetto is None and d.msgid is None and d.ricevuta is None
    assert d.instant == datetime(2024, 11, 15, 17, 21, 3, tzinfo=UTC)
    assert d.errore is Errore.NO_DEST


@pytest.mark.parametrize(
    ("xml", "what"),
    [
        (b"not xml", "well-formed"),
        (b"<other/>", "root"),
        (b'<postacert tipo="boh"><intestazione/><dati/></postacert>', "not a known value"),
        (b'<postacert tipo="accettazione"><intestazione/><dati/></postacert>', "destinatari"),
        (
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><postacert tipo="accettazione"/>',
            "well-formed",
        ),
    ],
)
def test_parse_rejects_with_clear_error(xml: bytes, what: str) -> None:
    with pytest.raises(DaticertError, match=what):
        dc.parse(xml)


def test_parse_rejects_bad_time() -> None:
    xml = dc.build(sample()).replace(b"01/07/2026", b"31/02/2026")
    with pytest.raises(DaticertError, match="valid time"):
        dc.parse(xml)


def test_control_characters_are_replaced_not_emitted() -> None:
    xml = dc.build(sample(oggetto="bell\x07 and \x00 nul"))
    assert_valid(xml)
    assert dc.parse(xml).oggetto == "bell\ufffd and \ufffd nul"


# --- properties ----------------------------------------------------------------------------------

# Text XML 1.0 can carry (CR survives as &#13;), including astral characters and RTL.
xml_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters="\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f"
        "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\ufffe\uffff",
    ),
    max_size=300,
)
local = st.from_regex(re.compile(r"[a-z0-9][a-z0-9._+-]{0,30}"), fullmatch=True)
domain = st.from_regex(re.compile(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){1,3}"), fullmatch=True)
address = st.builds(lambda lp, d: f"{lp}@{d}", local, domain)
instant = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
)


@st.composite
def daticerts(draw: st.DrawFn) -> Daticert:
    tipo = draw(st.sampled_from(list(DaticertTipo)))
    t = pec_time(draw(instant))
    has_ricevuta, has_consegna = dc.expected_elements(tipo)
    return Daticert(
        tipo=tipo,
        errore=draw(st.sampled_from(list(Errore))),
        mittente=draw(address),
        destinatari=tuple(
            Destinatario(a, draw(st.sampled_from(list(DestinatarioTipo))))
            for a in draw(st.lists(address, min_size=1, max_size=60))
        ),
        risposte=draw(address),
        oggetto=draw(st.none() | xml_text),
        gestore_emittente=draw(xml_text.map(str.strip).filter(bool)),
        giorno=t.giorno,
        ora=t.ora,
        zona=t.zona,
        identificativo=draw(address),
        msgid=draw(st.none() | address.map(lambda a: f"<{a}>")),
        ricevuta=draw(st.sampled_from(list(TipoRicevuta))) if has_ricevuta else None,
        consegna=draw(address) if has_consegna else None,
        ricezione=tuple(draw(st.lists(address, max_size=5)))
        if tipo is DaticertTipo.PRESA_IN_CARICO
        else (),
        errore_esteso=draw(st.none() | xml_text),
    )


@settings(max_examples=300, deadline=None)
@given(daticerts())
def test_parse_build_roundtrip(d: Daticert) -> None:
    xml = dc.build(d)
    assert dc.parse(xml) == d
    assert_valid(xml)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(DaticertError):
        dc.parse(data)
