"""daticert.xml: build and parse the certification data of every envelope and receipt (spec section 3)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from pecd.pec.timefmt import PecTime, parse_daticert_time, parse_zona
from pecd.pec.vocab import DaticertTipo, DestinatarioTipo, Errore, TipoRicevuta

# Which optional elements each tipo carries (spec section 3, "Which elements appear").
_WITH_RICEVUTA = {DaticertTipo.POSTA_CERTIFICATA, DaticertTipo.AVVENUTA_CONSEGNA}
_WITH_CONSEGNA = {
    DaticertTipo.AVVENUTA_CONSEGNA,
    DaticertTipo.ERRORE_CONSEGNA,
    DaticertTipo.PREAVVISO_ERRORE_CONSEGNA,
    DaticertTipo.RILEVAZIONE_VIRUS,
}

# XML 1.0 forbids most C0 controls even as character references.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]|[\ud800-\udfff]")


class DaticertError(ValueError):
    """A daticert.xml that cannot be read: not XML, wrong root, missing or invalid required data."""


@dataclass(frozen=True, slots=True)
class Destinatario:
    address: str
    tipo: DestinatarioTipo = DestinatarioTipo.CERTIFICATO


@dataclass(frozen=True, slots=True)
class Daticert:
    """The content of one daticert.xml. Strings are kept as written so that parse(build(x)) == x."""

    tipo: DaticertTipo
    mittente: str
    destinatari: tuple[Destinatario, ...]
    risposte: str
    gestore_emittente: str
    giorno: str
    ora: str
    zona: str
    identificativo: str
    errore: Errore = Errore.NESSUNO
    oggetto: str | None = None
    msgid: str | None = None  # client Message-ID, with its angle brackets
    ricevuta: TipoRicevuta | None = None
    consegna: str | None = None
    ricezione: tuple[str, ...] = field(default=())
    errore_esteso: str | None = None

    def __post_init__(self) -> None:
        if not self.destinatari:
            raise DaticertError("daticert needs at least one <destinatari>")

    @property
    def instant(self) -> datetime:
        """The event time as an aware datetime (UTC)."""
        return parse_daticert_time(self.giorno, self.ora, self.zona)

    def at(self, when: PecTime) -> Daticert:
        """The same data with ``<data>`` set from ``when``."""
        return replace(self, giorno=when.giorno, ora=when.ora, zona=when.zona)


def xml_text(value: str) -> str:
    """Escape ``value`` as XML character data; characters XML cannot carry become U+FFFD."""
    value = _XML_INVALID.sub("\ufffd", value)
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\r", "&#13;")
    )


def build(d: Daticert) -> bytes:
    """Serialise as real providers do: UTF-8 declaration, no DOCTYPE, 4-space indentation."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<postacert tipo="{d.tipo.value}" errore="{d.errore.value}">',
        "    <intestazione>",
        f"        <mittente>{xml_text(d.mittente)}</mittente>",
    ]
    lines += [
        f'        <destinatari tipo="{r.tipo.value}">{xml_text(r.address)}</destinatari>'
        for r in d.destinatari
    ]
    lines.append(f"        <risposte>{xml_text(d.risposte)}</risposte>")
    if d.oggetto is not None:
        lines.append(f"        <oggetto>{xml_text(d.oggetto)}</oggetto>")
    lines += [
        "    </intestazione>",
        "    <dati>",
        f"        <gestore-emittente>{xml_text(d.gestore_emittente)}</gestore-emittente>",
        f'        <data zona="{xml_text(d.zona)}">',
        f"            <giorno>{xml_text(d.giorno)}</giorno>",
        f"            <ora>{xml_text(d.ora)}</ora>",
        "        </data>",
        f"        <identificativo>{xml_text(d.identificativo)}</identificativo>",
    ]
    if d.msgid is not None:
        lines.append(f"        <msgid>{xml_text(d.msgid)}</msgid>")
    if d.ricevuta is not None:
        lines.append(f'        <ricevuta tipo="{d.ricevuta.value}" />')
    if d.consegna is not None:
        lines.append(f"        <consegna>{xml_text(d.consegna)}</consegna>")
    lines += [f"        <ricezione>{xml_text(r)}</ricezione>" for r in d.ricezione]
    if d.errore_esteso is not None:
        lines.append(f"        <errore-esteso>{xml_text(d.errore_esteso)}</errore-esteso>")
    lines += ["    </dati>", "</postacert>", ""]
    return "\n".join(lines).encode("utf-8")


def _text(el: Element | None) -> str | None:
    if el is None:
        return None
    return el.text or ""


def _required(parent: Element, tag: str) -> str:
    value = _text(parent.find(tag))
    if value is None:
        raise DaticertError(f"daticert lacks <{tag}>")
    return value


E = TypeVar("E", DaticertTipo, Errore, DestinatarioTipo, TipoRicevuta)


def _enum_attr(cls: type[E], value: str | None, default: E | None, where: str) -> E:
    if value is None:
        if default is None:
            raise DaticertError(f"daticert lacks the attribute {where}")
        return default
    try:
        return cls(value.strip().lower())
    except ValueError:
        raise DaticertError(f"daticert {where}={value!r} is not a known value") from None


def parse(data: bytes) -> Daticert:
    """Parse a daticert.xml as real providers write it; raise DaticertError on anything unusable.

    Accepts any indentation, a DOCTYPE (entity declarations are refused, so no entity expansion),
    escaped ``&lt;msgid&gt;``, missing optional elements, and ``zona`` with or without a colon.
    Surrounding whitespace is dropped from addresses and identifiers, never from ``oggetto``.
    """
    try:
        root = SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True)
    except (SafeET.ParseError, DefusedXmlException, ValueError, UnicodeError) as exc:
        raise DaticertError(f"daticert is not well-formed XML: {exc}") from None
    if root.tag != "postacert":
        raise DaticertError(f"daticert root element is <{root.tag}>, not <postacert>")
    tipo = _enum_attr(DaticertTipo, root.get("tipo"), None, "postacert/@tipo")
    errore = _enum_attr(Errore, root.get("errore"), Errore.NESSUNO, "postacert/@errore")
    head = root.find("intestazione")
    dati = root.find("dati")
    if head is None or dati is None:
        raise DaticertError("daticert lacks <intestazione> or <dati>")
    destinatari = tuple(
        Destinatario(
            (el.text or "").strip(),
            _enum_attr(
                DestinatarioTipo,
                el.get("tipo"),
                DestinatarioTipo.CERTIFICATO,
                "destinatari/@tipo",
            ),
        )
        for el in head.findall("destinatari")
    )
    if not destinatari:
        raise DaticertError("daticert lacks <destinatari>")
    data_el = dati.find("data")
    if data_el is None:
        raise DaticertError("daticert lacks <data>")
    zona = data_el.get("zona")
    if zona is None:
        raise DaticertError("daticert lacks <data zona>")
    try:
        parse_zona(zona)
    except ValueError as exc:
        raise DaticertError(f"daticert {exc}") from None
    ricevuta_el = dati.find("ricevuta")
    ricevuta = (
        None
        if ricevuta_el is None
        else _enum_attr(TipoRicevuta, ricevuta_el.get("tipo"), None, "ricevuta/@tipo")
    )
    msgid = _text(dati.find("msgid"))
    consegna = _text(dati.find("consegna"))
    d = Daticert(
        tipo=tipo,
        errore=errore,
        mittente=_required(head, "mittente").strip(),
        destinatari=destinatari,
        risposte=(_text(head.find("risposte")) or "").strip(),
        oggetto=_text(head.find("oggetto")),
        gestore_emittente=_required(dati, "gestore-emittente").strip(),
        giorno=_required(data_el, "giorno").strip(),
        ora=_required(data_el, "ora").strip(),
        zona=zona.strip(),
        identificativo=_required(dati, "identificativo").strip(),
        msgid=None if msgid is None else msgid.strip(),
        ricevuta=ricevuta,
        consegna=None if consegna is None else consegna.strip(),
        ricezione=tuple((el.text or "").strip() for el in dati.findall("ricezione")),
        errore_esteso=_text(dati.find("errore-esteso")),
    )
    try:
        d.instant  # noqa: B018 - validates giorno/ora/zona together
    except ValueError as exc:
        raise DaticertError(f"daticert <data> is not a valid time: {exc}") from None
    return d


def dtd_text() -> str:
    """The daticert DTD shipped with pecd (RFC 6109 section 4.4)."""
    return resources.files("pecd.pec").joinpath("data/daticert.dtd").read_text("utf-8")


def expected_elements(tipo: DaticertTipo) -> tuple[bool, bool]:
    """Whether daticert of ``tipo`` carries ``<ricevuta>`` and ``<consegna>``."""
    return tipo in _WITH_RICEVUTA, tipo in _WITH_CONSEGNA


# --- JSON form (the trace log keeps every daticert field this way) ---------------------------------


def to_json(d: Daticert) -> dict[str, Any]:
    """Every field as JSON values; :func:`from_json` gives back an equal Daticert."""
    return {
        "tipo": d.tipo.value,
        "mittente": d.mittente,
        "destinatari": [{"address": r.address, "tipo": r.tipo.value} for r in d.destinatari],
        "risposte": d.risposte,
        "gestore_emittente": d.gestore_emittente,
        "giorno": d.giorno,
        "ora": d.ora,
        "zona": d.zona,
        "identificativo": d.identificativo,
        "errore": d.errore.value,
        "oggetto": d.oggetto,
        "msgid": d.msgid,
        "ricevuta": d.ricevuta.value if d.ricevuta else None,
        "consegna": d.consegna,
        "ricezione": list(d.ricezione),
        "errore_esteso": d.errore_esteso,
    }


def from_json(data: dict[str, Any]) -> Daticert:
    """The Daticert of :func:`to_json`'s output; DaticertError if it is not one."""
    try:
        return Daticert(
            tipo=DaticertTipo(data["tipo"]),
            mittente=data["mittente"],
            destinatari=tuple(
                Destinatario(r["address"], DestinatarioTipo(r["tipo"])) for r in data["destinatari"]
            ),
            risposte=data["risposte"],
            gestore_emittente=data["gestore_emittente"],
            giorno=data["giorno"],
            ora=data["ora"],
            zona=data["zona"],
            identificativo=data["identificativo"],
            errore=Errore(data.get("errore") or Errore.NESSUNO.value),
            oggetto=data.get("oggetto"),
            msgid=data.get("msgid"),
            ricevuta=TipoRicevuta(data["ricevuta"]) if data.get("ricevuta") else None,
            consegna=data.get("consegna"),
            ricezione=tuple(data.get("ricezione") or ()),
            errore_esteso=data.get("errore_esteso"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DaticertError(f"not a logged daticert: {exc}") from None
