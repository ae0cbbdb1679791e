"""The Italian texts people read in envelopes and receipts, rendered as plain text and equivalent HTML.

Receivers must parse only daticert.xml; these texts are for humans. The wording is pecd's own, modelled
on the RFC 6109 descriptions and the real messages in the corpus. Plain and HTML come from one structure,
so they always carry the same information; the HTML has no links, images, styles or scripts.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pecd.pec.mime import clean_header_text
from pecd.pec.timefmt import PecTime
from pecd.pec.vocab import LABEL_POSTA_CERTIFICATA, LABEL_POSTA_ORDINARIA

DATICERT_NOTE = "L'allegato daticert.xml contiene informazioni di servizio sulla trasmissione."
POSTACERT_NOTE = 'Il messaggio originale è incluso in allegato (file "postacert.eml").'


@dataclass(frozen=True, slots=True)
class Notice:
    """A titled text of paragraphs; each paragraph is a list of lines."""

    title: str
    paragraphs: tuple[tuple[str, ...], ...]

    def plain(self) -> str:
        return f"{self.title}\n\n{self._body()}\n"

    def _body(self) -> str:
        return "\n\n".join(["\n".join(p) for p in self.paragraphs])

    def html(self) -> str:
        title = html.escape(self.title)
        return (
            f"<html>\n<head><title>{title}</title></head>\n<body>\n<h3>{title}</h3>\n<hr>\n"
            f"{self._html_paragraphs()}\n</body>\n</html>\n"
        )

    def _html_paragraphs(self) -> str:
        paragraphs = self.paragraphs
        body = self._body()
        # The plain body escaped at once, its line ends made <br> and its blank lines paragraph
        # breaks: the same as line by line wherever a LF in the body is a line end and a blank
        # line is a break, i.e. no line is empty or holds a LF and no paragraph is empty (either
        # of the last two adds to the count of LF). Escaping leaves LF alone and writes no "<",
        # so the "<br>" found again are the ones put in.
        lines = 0
        for p in paragraphs:
            if "" in p:
                return self._html_paragraphs_by_line()
            lines += len(p)
        if not paragraphs or body.count("\n") != lines + len(paragraphs) - 2:
            return self._html_paragraphs_by_line()
        return "<p>" + _html_breaks(html.escape(body)) + "</p>"

    def _html_paragraphs_by_line(self) -> str:
        return "\n".join(
            "<p>" + "<br>\n".join(html.escape(line) for line in p) + "</p>" for p in self.paragraphs
        )


def _html_breaks(escaped: str) -> str:
    return escaped.replace("\n", "<br>\n").replace("<br>\n<br>\n", "</p>\n<p>")


# --- errore-esteso: one format whatever the path --------------------------------------------------

# The reason's bound: enough for a reply line, short as the DTD's "short error text" asks.
ERRORE_ESTESO_REASON_MAX = 200
_ENHANCED_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPLY_LINE = re.compile(r"^(\d{3})[ -]?(.*)$")
_ADDRESS_PREFIX = re.compile(r"^<[^<>]*>:?\s*")

# Avviso di mancata consegna per superamento tempi massimi (RFC 3463 class 4 = transient,
# 5 = permanent). The final (24 h) notice carries 5.4.1, as opec does at Aruba, Sogei and
# Namirial: PagoPA's adapters (pagopa/pn-ec ArubaPostacert) read a preavviso whose errore-esteso
# starts with 5.4.1 as the final failure. The 12 h notice is not a failure yet: 4.4.1.
PREAVVISO_CODE_FIRST = "4.4.1"
PREAVVISO_CODE_FINAL = "5.4.1"


def errore_esteso(code: str, provider: str, reason: str) -> str:
    """The one ``<errore-esteso>`` format: ``"<code> - <provider> - <reason>"``, as in the real
    ``5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido`` (spec 2.3).

    ``code`` must be an RFC 3463 enhanced status code (``5.1.1``); the provider and the reason are
    cleaned like header text (one line, no controls) and the reason is cut to
    ``ERRORE_ESTESO_REASON_MAX`` characters."""
    if not _ENHANCED_CODE.match(code):
        raise ValueError(f"not an enhanced status code: {code!r}")
    provider = " ".join(clean_header_text(provider).split())
    reason = " ".join(clean_header_text(reason).split())
    if len(reason) > ERRORE_ESTESO_REASON_MAX:
        reason = reason[: ERRORE_ESTESO_REASON_MAX - 1].rstrip() + "…"
    return f"{code} - {provider} - {reason or 'errore'}"


def smtp_reply_parts(reply: str) -> tuple[str, str]:
    """An SMTP reply (``550 5.1.1 <bob@x>: user unknown``, multi-line too) as (enhanced code,
    reason) for :func:`errore_esteso`.

    The code is the reply's enhanced status code, or ``X.0.0`` from its basic code's class when it
    has none (``5.0.0`` when even that is missing). The reason is the text of every line without
    the codes and without a leading ``<address>:`` (the recipient is in ``<consegna>`` already);
    it is not cleaned or cut here, :func:`errore_esteso` does that."""
    code: str | None = None
    basic: str | None = None
    texts: list[str] = []
    for line in re.split(r"[\r\n]+", reply):
        line = line.strip()
        m = _REPLY_LINE.match(line)
        if m:
            basic = basic or m.group(1)
            line = m.group(2).strip()
        first, _, rest = line.partition(" ")
        if _ENHANCED_CODE.match(first):
            code = code or first
            line = rest.strip()
        line = _ADDRESS_PREFIX.sub("", line)
        if line:
            texts.append(line)
    if code is None:
        cls = basic[0] if basic and basic[0] in "45" else "5"
        code = f"{cls}.0.0"
    return code, " ".join(texts)


def errore_esteso_from_reply(reply: str, provider: str) -> str:
    """The errore-esteso for a peer's SMTP refusal: :func:`smtp_reply_parts` then
    :func:`errore_esteso`, ``provider`` being the provider that reports it (pecd itself)."""
    code, reason = smtp_reply_parts(reply)
    return errore_esteso(code, provider, reason)


def _when(t: PecTime) -> str:
    return f"Il giorno {t.giorno} alle ore {t.ora} {t.text_zone}"


def _id(identificativo: str) -> tuple[str, ...]:
    return (f"Identificativo messaggio: {identificativo}",)


def transport(
    t: PecTime, oggetto: str, mittente: str, destinatari: Sequence[str], identificativo: str
) -> Notice:
    return Notice(
        "Messaggio di posta certificata",
        (
            (
                f'{_when(t)} il messaggio "{oggetto}" è stato inviato da "{mittente}"',
                "indirizzato a:",
                *destinatari,
            ),
            (POSTACERT_NOTE, DATICERT_NOTE),
            _id(identificativo),
        ),
    )


def anomaly(
    t: PecTime, oggetto: str, mittente: str, destinatari: Sequence[str], errore: str
) -> Notice:
    return Notice(
        "Anomalia nel messaggio",
        (
            (
                f'{_when(t)} è stato ricevuto il messaggio "{oggetto}" proveniente da "{mittente}"',
                "ed indirizzato a:",
                *destinatari,
            ),
            (
                "Tali dati non sono stati certificati per il seguente errore:",
                errore,
            ),
            ('Il messaggio originale è incluso in allegato (file "postacert.eml").',),
        ),
    )


def accettazione(
    t: PecTime,
    oggetto: str,
    mittente: str,
    destinatari: Sequence[tuple[str, bool]],
    identificativo: str,
) -> Notice:
    lines = [
        f"{addr} ({LABEL_POSTA_CERTIFICATA if certified else LABEL_POSTA_ORDINARIA})"
        for addr, certified in destinatari
    ]
    return Notice(
        "Ricevuta di accettazione",
        (
            (
                f'{_when(t)} il messaggio "{oggetto}" proveniente da "{mittente}"',
                "ed indirizzato a:",
                *lines,
                "è stato accettato dal sistema ed inoltrato.",
            ),
            _id(identificativo),
            (DATICERT_NOTE,),
        ),
    )


def non_accettazione(
    t: PecTime,
    oggetto: str,
    mittente: str,
    reasons: Sequence[str],
    identificativo: str,
    virus: bool,
) -> Notice:
    why = (
        "non è stato accettato perché contiene un virus o un contenuto pericoloso:"
        if virus
        else "non è stato accettato per i seguenti motivi:"
    )
    return Notice(
        "Avviso di non accettazione" + (" per virus" if virus else ""),
        (
            (f'{_when(t)} il messaggio "{oggetto}" proveniente da "{mittente}"', why),
            tuple(f"- {r}" for r in reasons),
            ("Il messaggio non è stato inoltrato.",),
            _id(identificativo),
            (DATICERT_NOTE,),
        ),
    )


def presa_in_carico(
    t: PecTime, oggetto: str, mittente: str, ricezione: Sequence[str], identificativo: str
) -> Notice:
    return Notice(
        "Ricevuta di presa in carico",
        (
            (
                f'{_when(t)} il messaggio "{oggetto}" proveniente da "{mittente}"',
                "ed indirizzato a:",
                *ricezione,
                "è stato accettato dal sistema.",
            ),
            _id(identificativo),
            (DATICERT_NOTE,),
        ),
    )


def avvenuta_consegna(
    t: PecTime,
    oggetto: str,
    mittente: str,
    consegna: str,
    identificativo: str,
    original_attached: bool,
) -> Notice:
    paras: list[tuple[str, ...]] = [
        (
            f'{_when(t)} il messaggio "{oggetto}" proveniente da "{mittente}"',
            f'ed indirizzato a "{consegna}"',
            "è stato correttamente consegnato al destinatario.",
        ),
        _id(identificativo),
    ]
    paras.append((POSTACERT_NOTE, DATICERT_NOTE) if original_attached else (DATICERT_NOTE,))
    return Notice("Ricevuta di avvenuta consegna", tuple(paras))


def errore_consegna(
    t: PecTime,
    oggetto: str,
    mittente: str,
    consegna: str,
    errore_esteso: str,
    identificativo: str,
    virus: bool,
) -> Notice:
    what = "un problema di sicurezza (virus)" if virus else "un errore"
    return Notice(
        "Avviso di mancata consegna" + (" per virus" if virus else ""),
        (
            (
                f'{_when(t)} nel messaggio "{oggetto}" proveniente da "{mittente}"',
                f'ed indirizzato a "{consegna}"',
                f"è stato rilevato {what}: {errore_esteso}",
                "Il messaggio non è stato consegnato.",
            ),
            _id(identificativo),
            (DATICERT_NOTE,),
        ),
    )


def preavviso(
    t: PecTime,
    sent: PecTime,
    oggetto: str,
    mittente: str,
    consegna: str,
    identificativo: str,
    final: bool,
) -> Notice:
    if final:
        outcome = (
            "non è stato consegnato entro 24 ore dal suo invio.",
            "La transazione è da considerarsi conclusa con esito negativo.",
        )
    else:
        outcome = (
            "non è stato consegnato nelle prime 12 ore dal suo invio.",
            "Il sistema continua a seguirne la consegna fino alle 24 ore dall'invio.",
        )
    return Notice(
        "Avviso di mancata consegna per superamento dei tempi massimi",
        (
            (
                f'{_when(t)} si comunica che il messaggio "{oggetto}" proveniente da "{mittente}"',
                f"inviato il giorno {sent.giorno} alle ore {sent.ora} {sent.text_zone}",
                f'ed indirizzato a "{consegna}"',
                *outcome,
            ),
            _id(identificativo),
            (DATICERT_NOTE,),
        ),
    )


def rilevazione_virus(
    t: PecTime,
    oggetto: str,
    mittente: str,
    consegna: str,
    errore_esteso: str,
    identificativo: str,
) -> Notice:
    return Notice(
        "Avviso di rilevazione virus",
        (
            (
                f'{_when(t)} nel messaggio "{oggetto}" proveniente da "{mittente}"',
                f'ed indirizzato a "{consegna}"',
                f"è stato rilevato un problema di sicurezza: {errore_esteso}",
                "Il messaggio non sarà consegnato.",
            ),
            _id(identificativo),
            (DATICERT_NOTE,),
        ),
    )


def riproduzione(
    now: PecTime, gestore: str, tipo: str, giorno: str, ora: str, zona: str, identificativo: str
) -> Notice:
    """The text of a receipt rebuilt from the trace log."""
    return Notice(
        "Riproduzione di ricevuta dal registro dei messaggi",
        (
            (
                f"{_when(now)} il gestore {gestore} ha riprodotto dal proprio registro dei",
                f'messaggi la ricevuta "{tipo}" emessa il giorno {giorno} alle ore {ora} ({zona}).',
            ),
            _id(identificativo),
            (
                "I dati di certificazione allegati (daticert.xml) sono quelli della ricevuta",
                "originale; il messaggio originale non è conservato nel registro e non è allegato.",
            ),
        ),
    )
