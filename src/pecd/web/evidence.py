"""The evidence bundle of a transmission: one zip with the message as submitted, every receipt of
it in the holder's mailbox byte for byte (each verifies with ``openssl cms -verify`` as it is),
and ``summary.txt``, in Italian and English: who sent what to whom, when, each recipient's
outcome, and the SHA-256 of each file.

The message as submitted is the copy in Sent (the webmail stores one, mail clients APPEND one):
an accettazione does not carry it. When there is none, the summary says so. The bundle is made
in a worker thread into a spooled temporary file (memory, then disk past a few megabytes), a few
at once in the process (``pecd.web.timeline.heavy_work``), and is bounded: files past
:data:`MAX_BUNDLE_BYTES` are left out and listed as such.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Final

from pecd.web.timeline import (
    RECEIPT_NAMES,
    STATUS_WORDS,
    STEP_WORDS,
    Timeline,
    heavy_work,
    when_text,
)

__all__ = ["MAX_BUNDLE_BYTES", "Bundle", "build_bundle", "make_bundle", "stream"]

#: The most message bytes one bundle carries (the zip is at most about this big).
MAX_BUNDLE_BYTES: Final = 256 * 1024 * 1024
_SPOOL_BYTES: Final = 8 * 1024 * 1024
_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class _File:
    name: str
    sha256: str
    size: int
    what_it: str
    what_en: str


@dataclass
class Bundle:
    """A made bundle: ``file`` (positioned at 0) holds ``size`` bytes of zip."""

    file: IO[bytes]
    size: int

    def close(self) -> None:
        self.file.close()


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in text)[:80]


def build_bundle(
    timeline: Timeline, *, mailbox: str, now: datetime, limit: int = MAX_BUNDLE_BYTES
) -> Bundle:
    """The zip of ``timeline`` (synchronous: run it in a thread)."""
    out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
    files: list[_File] = []
    omitted: list[str] = []
    missing: list[str] = []
    used = 0
    try:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:

            def add(name: str, data: bytes, what_it: str, what_en: str) -> None:
                nonlocal used
                if used + len(data) > limit:
                    omitted.append(name)
                    return
                used += len(data)
                # The bytes as stored: a signature verifies over exactly these.
                z.writestr(name, data)
                files.append(
                    _File(name, hashlib.sha256(data).hexdigest(), len(data), what_it, what_en)
                )

            original = _read(timeline.sent_path)
            if original is not None:
                add(
                    "originale.eml",
                    original,
                    'il messaggio come inviato (la copia in "Sent")',
                    'the message as submitted (the copy in "Sent")',
                )
            for n, r in enumerate(timeline.receipts, start=1):
                words = RECEIPT_NAMES.get(r.kind.value, (r.kind.value, r.kind.value))
                who = f"-{_safe(r.consegna)}" if r.consegna else ""
                name = f"ricevute/{n:02d}-{r.kind.value}{who}.eml"
                data = _read(r.path)
                if data is None:
                    missing.append(name)
                    continue
                verdict = (
                    ("firma valida", "valid signature")
                    if r.valid
                    else (
                        "firma o struttura NON valida",
                        "signature or structure NOT valid",
                    )
                )
                add(
                    name,
                    data,
                    f"{words[0]}, {verdict[0]}",
                    f"{words[1]}, {verdict[1]}",
                )
            summary = _summary(
                timeline, mailbox, now, files, omitted, missing, original is not None
            )
            z.writestr("summary.txt", summary.encode("utf-8"))
        size = out.tell()
        out.seek(0)
        return Bundle(out, size)
    except BaseException:
        out.close()
        raise


def _summary(
    t: Timeline,
    mailbox: str,
    now: datetime,
    files: list[_File],
    omitted: list[str],
    missing: list[str],
    has_original: bool,
) -> str:
    lines = [
        "Pacchetto di prova di una trasmissione PEC / Evidence bundle of a PEC transmission",
        "=" * 78,
        "",
        f"Mittente / Sender:                  {mailbox}",
        f"Oggetto / Subject:                  {t.subject or '-'}",
        f"Identificativo PEC / PEC msgid:     {t.pec_msgid or '-'}",
        f"Message-ID del mittente / client:   {t.client_msgid or '-'}",
        f"Id della trasmissione / id:         {t.id}",
    ]
    if t.status == "accepted":
        lines.append(f"Accettata il / Accepted at:         {when_text(t.accepted_at)}")
    elif t.status == "not-accepted":
        lines.append(f"NON accettata / NOT accepted:       {t.error or '-'}")
    else:
        lines.append("In coda, non ancora accettata / Queued, not accepted yet")
    lines += ["", "Destinatari / Recipients", "-" * 24]
    for r in t.recipients:
        it, en = STATUS_WORDS.get(r.status, ("in attesa", "waiting"))
        tipo = f" [{r.tipo}]" if r.tipo else ""
        lines.append(f"* {r.address}{tipo}: {it} / {en}, {when_text(r.at)}")
        if r.error:
            lines.append(f"    errore / error: {r.error}")
        for s in r.steps:
            step_it, step_en = STEP_WORDS.get(s.kind, (s.kind, s.kind))
            lines.append(f"    - {when_text(s.at)}  {step_it} / {step_en}")
    if not t.recipients:
        lines.append("(nessuno / none)")
    lines += ["", "File / Files (SHA-256)", "-" * 22]
    for f in files:
        lines.append(f"{f.sha256}  {f.name}  ({f.size} byte)")
        lines.append(f"    {f.what_it} / {f.what_en}")
    if not has_original:
        lines += [
            "",
            'Il messaggio come inviato non è nella casella (nessuna copia in "Sent"): le ricevute',
            "ne attestano i dati (daticert.xml); la ricevuta di avvenuta consegna completa ne",
            "contiene il testo.",
            'The message as submitted is not in the mailbox (no copy in "Sent"): the receipts',
            "certify its data (daticert.xml); a full delivery receipt (completa) contains it.",
        ]
    if omitted:
        lines += ["", "Lasciati fuori per dimensione / Left out for size:"]
        lines += [f"  {name}" for name in omitted]
    if missing:
        lines += ["", "Non più nella casella / No longer in the mailbox:"]
        lines += [f"  {name}" for name in missing]
    if not t.scanned_all:
        lines += [
            "",
            "Cartella troppo grande: solo i messaggi più recenti sono stati cercati.",
            "Folder too large: only the newest messages were searched.",
        ]
    lines += [
        "",
        "Verifica di una ricevuta / Checking a receipt:",
        "  openssl cms -verify -inform SMIME -in ricevute/<file>.eml -noverify -out /dev/null",
        "  (-noverify: la firma, non la catena dei certificati / the signature, not the chain)",
        "",
        f"Prodotto il / Made at: {when_text(now)} da / by pecd",
        "",
    ]
    return "\n".join(lines)


async def make_bundle(
    timeline: Timeline, *, mailbox: str, now: datetime, limit: int = MAX_BUNDLE_BYTES
) -> Bundle:
    """:func:`build_bundle` in a worker thread, in a slot of ``heavy_work`` (it reads every
    file of the transmission)."""
    return await heavy_work.run(build_bundle, timeline, mailbox=mailbox, now=now, limit=limit)


async def stream(bundle: Bundle) -> AsyncIterator[bytes]:
    """The bundle's bytes in chunks (read in a worker thread); closes it at the end."""
    try:
        while True:
            chunk = await asyncio.to_thread(bundle.file.read, _CHUNK)
            if not chunk:
                break
            yield chunk
    finally:
        bundle.close()
