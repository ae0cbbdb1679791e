"""Every wire literal of the PEC rules (spec/pec.md), defined once and imported everywhere."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

# --- header names (as providers write them; parsing is case-insensitive) ---------------------
H_TRASPORTO: Final = "X-Trasporto"
H_RICEVUTA: Final = "X-Ricevuta"
H_TIPO_RICEVUTA: Final = "X-TipoRicevuta"
H_VERIFICA_SICUREZZA: Final = "X-VerificaSicurezza"
H_RIFERIMENTO_MESSAGE_ID: Final = "X-Riferimento-Message-ID"
H_MITTENTE: Final = "X-Mittente"
# Added by pecd (not a PEC literal) to a receipt rebuilt from the trace log.
H_RIPRODUZIONE: Final = "X-Pecd-Riproduzione"

VERIFICA_SICUREZZA_ERRORE: Final = "errore"


class Trasporto(StrEnum):
    """Values of ``X-Trasporto``: which envelope this is."""

    POSTA_CERTIFICATA = "posta-certificata"  # busta di trasporto
    ERRORE = "errore"  # busta di anomalia


class Ricevuta(StrEnum):
    """Values of ``X-Ricevuta``: which receipt or notice this is."""

    ACCETTAZIONE = "accettazione"
    NON_ACCETTAZIONE = "non-accettazione"
    PRESA_IN_CARICO = "presa-in-carico"
    AVVENUTA_CONSEGNA = "avvenuta-consegna"
    ERRORE_CONSEGNA = "errore-consegna"
    PREAVVISO_ERRORE_CONSEGNA = "preavviso-errore-consegna"
    RILEVAZIONE_VIRUS = "rilevazione-virus"


class TipoRicevuta(StrEnum):
    """Values of ``X-TipoRicevuta`` and daticert ``<ricevuta tipo>``: the delivery receipt kind."""

    COMPLETA = "completa"
    BREVE = "breve"
    SINTETICA = "sintetica"


class DaticertTipo(StrEnum):
    """daticert ``<postacert tipo>``."""

    ACCETTAZIONE = "accettazione"
    NON_ACCETTAZIONE = "non-accettazione"
    PRESA_IN_CARICO = "presa-in-carico"
    AVVENUTA_CONSEGNA = "avvenuta-consegna"
    POSTA_CERTIFICATA = "posta-certificata"
    ERRORE_CONSEGNA = "errore-consegna"
    PREAVVISO_ERRORE_CONSEGNA = "preavviso-errore-consegna"
    RILEVAZIONE_VIRUS = "rilevazione-virus"


class Errore(StrEnum):
    """daticert ``<postacert errore>``."""

    NESSUNO = "nessuno"
    NO_DEST = "no-dest"
    NO_DOMINIO = "no-dominio"
    VIRUS = "virus"
    ALTRO = "altro"


class DestinatarioTipo(StrEnum):
    """daticert ``<destinatari tipo>``: is the recipient inside PEC or outside."""

    CERTIFICATO = "certificato"
    ESTERNO = "esterno"


# --- subjects (exact prefixes, followed by the original subject) ------------------------------
SUBJ_POSTA_CERTIFICATA: Final = "POSTA CERTIFICATA: "
SUBJ_ANOMALIA: Final = "ANOMALIA MESSAGGIO: "
SUBJ_ACCETTAZIONE: Final = "ACCETTAZIONE: "
SUBJ_NON_ACCETTAZIONE: Final = "AVVISO DI NON ACCETTAZIONE: "
SUBJ_NON_ACCETTAZIONE_VIRUS: Final = "AVVISO DI NON ACCETTAZIONE PER VIRUS: "
SUBJ_PRESA_IN_CARICO: Final = "PRESA IN CARICO: "
SUBJ_CONSEGNA: Final = "CONSEGNA: "
SUBJ_MANCATA_CONSEGNA: Final = "AVVISO DI MANCATA CONSEGNA: "
SUBJ_MANCATA_CONSEGNA_VIRUS: Final = "AVVISO DI MANCATA CONSEGNA PER VIRUS: "
SUBJ_PREAVVISO: Final = "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: "
SUBJ_RILEVAZIONE_VIRUS: Final = "PROBLEMA DI SICUREZZA: "

# --- From display name of envelopes ------------------------------------------------------------
PER_CONTO_DI: Final = "Per conto di: "

# --- part file names and MIME types ------------------------------------------------------------
DATICERT_FILENAME: Final = "daticert.xml"
POSTACERT_FILENAME: Final = "postacert.eml"
SMIME_FILENAME: Final = "smime.p7s"
HASH_SUFFIX: Final = ".hash"  # breve receipts: attachment -> "<name>.hash"
SMIME_PREAMBLE: Final = "This is an S/MIME signed message"
CT_SIGNATURE: Final = "application/x-pkcs7-signature"
CT_SIGNATURE_ALIASES: Final = frozenset(
    {"application/x-pkcs7-signature", "application/pkcs7-signature"}
)
CT_PKCS7_MIME: Final = frozenset({"application/x-pkcs7-mime", "application/pkcs7-mime"})
CT_POSTACERT: Final = "message/rfc822"

# --- texts that recipients see in accettazione --------------------------------------------------
LABEL_POSTA_CERTIFICATA: Final = '"posta certificata"'
# UNSURE in the spec; chosen to mirror the certified label and the RFC's "ordinary mail".
LABEL_POSTA_ORDINARIA: Final = '"posta ordinaria"'

# --- service limits the rules require a provider to guarantee (DM art. 12) --------------------
MIN_RECIPIENTS_GUARANTEED: Final = 50
MIN_RECIPIENTS_TIMES_SIZE: Final = 30 * 1000 * 1000

# --- message kinds that classification returns ---------------------------------------------------


class Kind(StrEnum):
    """What a received message is, as ``pecd verify --json`` names it."""

    TRANSPORT_ENVELOPE = "transport-envelope"
    ANOMALY_ENVELOPE = "anomaly-envelope"
    RECEIPT = "receipt"
    PLAIN = "plain"


# The subject prefix of each receipt as a function of (ricevuta, virus variant).
RECEIPT_SUBJECTS: Final[dict[tuple[Ricevuta, bool], str]] = {
    (Ricevuta.ACCETTAZIONE, False): SUBJ_ACCETTAZIONE,
    (Ricevuta.NON_ACCETTAZIONE, False): SUBJ_NON_ACCETTAZIONE,
    (Ricevuta.NON_ACCETTAZIONE, True): SUBJ_NON_ACCETTAZIONE_VIRUS,
    (Ricevuta.PRESA_IN_CARICO, False): SUBJ_PRESA_IN_CARICO,
    (Ricevuta.AVVENUTA_CONSEGNA, False): SUBJ_CONSEGNA,
    (Ricevuta.ERRORE_CONSEGNA, False): SUBJ_MANCATA_CONSEGNA,
    (Ricevuta.ERRORE_CONSEGNA, True): SUBJ_MANCATA_CONSEGNA_VIRUS,
    (Ricevuta.PREAVVISO_ERRORE_CONSEGNA, False): SUBJ_PREAVVISO,
    (Ricevuta.RILEVAZIONE_VIRUS, False): SUBJ_RILEVAZIONE_VIRUS,
}
