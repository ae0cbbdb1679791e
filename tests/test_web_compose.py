"""The webmail's compose page (/compose) and verify page (/verify): the whole HTTPS application in
process (tests/web_fixtures.py), driven over ASGI as a browser would; one test runs the real
pipeline and IMAP listener (an App in a thread) behind a webmail compose."""

from __future__ import annotations

import asyncio
import email
import email.policy
import html
import imaplib
import re
import shutil
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.datastructures import UploadFile

from helpers import AppThread, client_tls, fetch_all, fetched_literal, wait_for
from pecd.cli import main as cli_main
from pecd.clock import SystemClock
from pecd.config import Config, load_config
from pecd.devpki import DevPki
from pecd.engine.vocab import JobKind
from pecd.mailbox.maildir import MaildirStore
from pecd.pec import builders as b
from pecd.pec.builders import ProviderIdentity, Transmission
from pecd.pec.classify import classify
from pecd.pec.smime import KeySigner
from pecd.pec.timefmt import pec_time
from pecd.pec.vocab import Ricevuta
from pecd.runtime.identity import provider_identity
from pecd.store.db import Database
from pecd.store.models import Job, Mailbox
from pecd.web.pages import compose as compose_page_module
from pecd.web.pages.compose import Draft, check_draft, human_size, parse_recipients
from pecd.web.sentcopy import SENT, sent_key, without_first_field
from pecd.web.submit import subject_error
from pecd.web.timeline import HEAVY_SLOTS, heavy_work
from web_fixtures import (
    ALICE,
    BOB,
    CAROL,
    PASSWORD,
    Web,
    csrf_of,
    login,
    run_web,
    web_cfg_fixture,
    web_template_fixture,
)

#: Characters no subject may hold: line breaks of every kind, other controls, lone surrogates
#: (those Python's email package refuses in a header made a 500 before the check refused them).
BAD_SUBJECT_CHARS = (
    "\r", "\n", "\0", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x7f", "\x85",
    "\u2028", "\u2029", "\ud800",
)  # fmt: skip

__all__ = ["web_cfg_fixture", "web_template_fixture"]  # fixtures used by name

GHOST = "ghost@pec.other.test"
CORPUS = Path(__file__).resolve().parent / "data" / "pec-real"
_CLIENT_KEY = re.compile(r'name="client_key" value="([^"]+)"')


@pytest.fixture
def small_cfg(web_template: Path, tmp_path: Path) -> Config:
    """The web installation with a 1 MB mail limit (its [limits] section is the file's last)."""
    directory = tmp_path / "small"
    shutil.copytree(web_template, directory)
    with (directory / "pecd.toml").open("a", encoding="utf-8") as f:
        f.write('max_message_size = "1M"\n')
    cfg = load_config(directory / "pecd.toml")
    assert cfg.limits.max_message_size == 1024 * 1024
    return cfg


async def submissions(db: Database) -> list[Job]:
    async with db.read_session() as s:
        stmt = select(Job).where(Job.kind == JobKind.SUBMISSION.value).order_by(Job.id)
        return list((await s.scalars(stmt)).all())


async def compose_page(client: httpx.AsyncClient) -> tuple[str, str]:
    """GET /compose: (csrf token, the form's client key)."""
    page = await client.get("/compose")
    assert page.status_code == 200, page.text[:300]
    found = _CLIENT_KEY.search(page.text)
    assert found is not None
    return csrf_of(page), html.unescape(found.group(1))


async def post_compose(
    client: httpx.AsyncClient,
    data: dict[str, str],
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
) -> httpx.Response:
    csrf, key = await compose_page(client)
    return await client.post(
        "/compose", data={"csrf": csrf, "client_key": key, **data}, files=files
    )


def text_of(page: httpx.Response) -> str:
    """The page's text, tags and entities undone (for looking up sentences)."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.text)))


# --- pure parts ---------------------------------------------------------------------------------


def test_recipients_are_split_normalised_and_checked(web_cfg: Config) -> None:
    good, bad = parse_recipients(
        " Bob Rossi <BOB@pec.example.test>, carol@pec.example.test;\n\r\nbob@pec.example.test,"
        "not an address\nx@y"
    )
    assert good == [BOB, CAROL] and bad == ["not an address", "x@y"]
    # Bounded: thousands of bad entries name the first ten; a huge field is one error.
    assert len(parse_recipients("x," * 5000)[1]) == 10
    limits = web_cfg.limits
    to, cc, problems = check_draft(Draft(to="y" * 10**6), limits)
    assert [p.text for p in problems["to"]] == ["Troppo lungo."]
    to, cc, problems = check_draft(Draft(to=BOB, cc=f"{BOB}, {CAROL}", subject="a\nb"), limits)
    assert to == [BOB] and cc == [CAROL] and list(problems) == ["subject"]
    # Every line break and control character the message could not be built with (tab apart).
    for bad in BAD_SUBJECT_CHARS:
        problems = check_draft(Draft(to=BOB, subject=f"Fattura{bad}n.1"), limits)[2]
        assert list(problems) == ["subject"], repr(bad)
        assert subject_error(f"Fattura{bad}n.1") is not None, repr(bad)
    assert check_draft(Draft(to=BOB, subject="Fattura\tn. 1 è pronta"), limits)[2] == {}
    assert subject_error("x" * 998) is None and subject_error("x" * 999) is not None
    many = ",".join(f"u{i}@pec.example.test" for i in range(limits.max_recipients + 1))
    assert "Troppi" in check_draft(Draft(to=many), limits)[2]["to"][0].text
    assert check_draft(Draft(to=BOB, receipt="bogus"), limits)[2].keys() == {"receipt"}
    sizes = (12, 2048, 1024**2, 1536 * 1024, 100 * 1024**2, 2 * 1024**3, 1536 * 1024**2)
    assert [human_size(n) for n in sizes] == [
        "12 B",
        "2 KB",
        "1 MB",
        "1.5 MB",
        "100 MB",
        "2 GB",
        "1.5 GB",
    ]


# --- /compose -------------------------------------------------------------------------------------


def test_compose_submits_through_the_intake_keeps_a_sent_copy_and_is_idempotent(
    web_cfg: Config,
) -> None:
    pdf = b"%PDF-1.4 fattura " + bytes(range(256)) * 40

    async def scenario(web: Web) -> None:
        client = web.client
        # Not logged in: to the login page.
        r = await client.get("/compose")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await login(client, ALICE, PASSWORD)).status_code == 303

        page = await client.get("/compose")
        assert page.status_code == 200
        assert 'name="bcc"' not in page.text.lower()  # no Bcc field: PEC forbids it
        assert "Ccn" in text_of(page) and ALICE in page.text
        assert page.headers["cache-control"] == "no-store"  # back button: a fresh client key
        assert "/static/compose.css" in page.text
        assert (await client.get("/static/compose.css")).status_code == 200
        reply = await client.get(
            "/compose", params={"to": "x@pec.other.test", "subject": "Re: <Fattura>"}
        )
        assert "x@pec.other.test</textarea>" in reply.text
        assert 'value="Re: &lt;Fattura&gt;"' in reply.text

        csrf, key = await compose_page(client)
        form = {
            "csrf": csrf,
            "client_key": key,
            "to": f"Bob <{BOB}>\n{CAROL}",
            "cc": f"{GHOST}, {BOB}",
            "subject": "Fattura 7 è pronta",
            "body": "Buongiorno,\r\nin allegato la fattura.\r\n",
            "receipt": "breve",
        }
        files = [
            ("attachments", ("fattura.pdf", pdf, "application/pdf")),
            ("attachments", ("../../note.txt", b"nota\n", "text/plain")),
        ]
        # Send pressed twice: two POSTs of the same form at once, then a reload of the POST.
        first, second = await asyncio.gather(
            client.post("/compose", data=form, files=files),
            client.post("/compose", data=form, files=files),
        )
        again = await client.post("/compose", data=form, files=files)
        for r in (first, second, again):
            assert r.status_code == 303, r.text[:500]
        location = first.headers["location"]
        assert location.startswith("/transmissions/api-")
        assert second.headers["location"] == again.headers["location"] == location
        intake = location.rsplit("/", 1)[1]
        assert (await client.get(location)).status_code == 200  # the timeline: "in coda"

        jobs = await submissions(web.db)
        assert len(jobs) == 1 and jobs[0].key == intake
        job = jobs[0]
        assert job.payload["user"] == ALICE and job.payload["mail_from"] == ALICE
        assert job.payload["rcpt_to"] == [BOB, CAROL, GHOST]
        assert job.data is not None and job.data.startswith(b"Received: from webmail ")
        msg = email.message_from_bytes(job.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        assert msg["From"] == ALICE
        assert msg["To"] == f"{BOB}, {CAROL}" and msg["Cc"] == GHOST  # bob once, in To
        assert msg["Subject"] == "Fattura 7 è pronta" and msg["X-TipoRicevuta"] == "breve"
        assert "Bcc" not in msg
        body = msg.get_body(("plain",))
        assert body is not None and "in allegato la fattura." in body.get_content()
        parts = {a.get_filename(): a for a in msg.iter_attachments()}
        assert set(parts) == {"fattura.pdf", "note.txt"}
        assert parts["fattura.pdf"].get_content_type() == "application/pdf"
        assert parts["fattura.pdf"].get_content() == pdf
        assert parts["note.txt"].get_content() == "nota\n"

        # One copy in Sent, marked seen, byte for byte the message (no Received: field).
        store = MaildirStore(web.cfg.maildir_root)
        sent = store.list_folder(ALICE, SENT)
        assert len(sent) == 1 and sent[0].parent.name == "cur", sent
        assert sent[0].name.startswith(MaildirStore.name_for(sent_key(intake)))
        assert sent[0].name.endswith(":2,S")
        assert sent[0].read_bytes() == job.data.split(b"\r\n", 3)[3]
        assert store.list_folder(ALICE) == []  # nothing in the INBOX yet: the pipeline's work

        # A new form (new client key) is a new transmission.
        r = await post_compose(client, {"to": CAROL, "subject": "Seconda", "body": "x"})
        assert r.status_code == 303 and r.headers["location"] != location
        assert len(await submissions(web.db)) == 2
        assert len(store.list_folder(ALICE, SENT)) == 2
        completa = (await submissions(web.db))[1].data or b""
        assert b"X-TipoRicevuta: completa" in completa  # the default

    run_web(web_cfg, scenario)


def test_compose_refusals_keep_the_form_and_make_no_job(web_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        client = web.client
        assert (await login(client, ALICE, PASSWORD)).status_code == 303
        typed = {
            "to": f"{BOB}\nnon è un indirizzo",
            "cc": "carol@",
            "subject": "Oggetto <b>scritto</b>",
            "body": "Testo scritto & conservato",
        }
        r = await post_compose(
            client, typed, files=[("attachments", ("a.txt", b"allegato", "text/plain"))]
        )
        assert r.status_code == 422
        text = text_of(r)
        assert "Indirizzo non valido: non è un indirizzo" in text
        assert "Indirizzo non valido: carol@" in text
        assert "Gli allegati vanno scelti di nuovo." in text
        # What was typed is back in the form, escaped.
        assert "Oggetto &lt;b&gt;scritto&lt;/b&gt;" in r.text and "<b>scritto" not in r.text
        assert (
            "Testo scritto &amp; conservato" in r.text and "non è un indirizzo</textarea>" in r.text
        )

        # Bcc: PEC has none, whatever a crafted form says.
        r = await post_compose(client, {"to": BOB, "bcc": CAROL, "subject": "s", "body": "b"})
        assert r.status_code == 422 and "La PEC non ammette la copia nascosta" in text_of(r)
        # No recipient; a subject on two lines; a receipt kind that does not exist.
        r = await post_compose(client, {"to": " , ", "subject": "a\r\nBcc: x@y.it"})
        assert r.status_code == 422 and "Scrivi almeno un destinatario." in text_of(r)
        assert "una riga" in text_of(r)
        # A control character the message cannot be built with: said in the form, not a 500.
        for bad in ("\x0b", "\x1c", "\u2028"):
            r = await post_compose(client, {"to": BOB, "subject": f"Fattura{bad}n.1", "body": "b"})
            assert r.status_code == 422 and "senza a capo" in text_of(r), repr(bad)
        r = await post_compose(client, {"to": BOB, "receipt": "nessuna"})
        assert r.status_code == 422 and "Scegli il tipo di ricevuta." in text_of(r)

        # Too many files: said in the form at 101, a plain 400 past that (never a 500).
        files = [("attachments", (f"{i}.txt", b"x", "text/plain")) for i in range(101)]
        r = await post_compose(client, {"to": BOB}, files)
        assert r.status_code == 422 and "Troppi allegati: al massimo 100." in text_of(r)
        r = await post_compose(client, {"to": BOB}, [*files, files[0]])
        assert r.status_code == 400

        # In English when the browser asks for it.
        r = await client.post(
            "/compose",
            data={"csrf": (await compose_page(client))[0], "to": "nope"},
            headers={"Accept-Language": "en"},
        )
        assert r.status_code == 422 and "Not a valid address: nope" in text_of(r)

        # No CSRF token, or a wrong one: 403, nothing taken in.
        _, key = await compose_page(client)
        good = {"client_key": key, "to": BOB, "subject": "s", "body": "b"}
        assert (await client.post("/compose", data=good)).status_code == 403
        r = await client.post("/compose", data={**good, "csrf": "x" * 43})
        assert r.status_code == 403
        # Logged out: no form is taken either.
        other = web.browser()
        r = await other.post("/compose", data={**good, "csrf": "x" * 43})
        assert r.status_code in (303, 403)
        assert await submissions(web.db) == []
        assert MaildirStore(web.cfg.maildir_root).list_folder(ALICE, SENT) == []

    run_web(web_cfg, scenario)


def test_compose_over_the_mail_limit_is_refused_clearly(small_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        client = web.client
        assert (await login(client, ALICE, PASSWORD)).status_code == 303
        form = {"to": BOB, "subject": "Grande", "body": "b"}
        # The files alone are over the limit.
        big = [("attachments", ("grande.bin", b"\0" * (1024 * 1024 + 1), "application/zip"))]
        r = await post_compose(client, form, big)
        assert r.status_code == 422
        assert "Gli allegati superano il limite: 1.0 MB in tutto, al massimo 1 MB." in text_of(r)
        # The files fit, the message they make (base64) does not.
        fits = [
            ("attachments", ("a.bin", b"\1" * 500_000, "application/octet-stream")),
            ("attachments", ("b.bin", b"\2" * 300_000, "application/octet-stream")),
        ]
        r = await post_compose(client, form, fits)
        assert r.status_code == 413
        assert "Il messaggio supera il limite di 1 MB" in text_of(r)
        assert "Grande" in r.text  # the form is kept
        # Each fits, not times its 50 recipients (limits.max_recipients_times_size = 30M).
        many = ", ".join(f"u{i}@pec.example.test" for i in range(50))
        r = await post_compose(client, {**form, "to": many}, fits[:1])
        assert r.status_code == 413
        assert "troppo grande per il numero dei suoi destinatari" in text_of(r)
        assert await submissions(web.db) == []
        # Within the limit it goes.
        small = [("attachments", ("c.bin", b"\3" * 500_000, "application/octet-stream"))]
        r = await post_compose(client, form, small)
        assert r.status_code == 303
        assert len(await submissions(web.db)) == 1

    run_web(small_cfg, scenario)


def test_over_quota_the_pec_goes_without_a_sent_copy(web_cfg: Config) -> None:
    """As an APPEND over quota is refused, so is the copy; the transmission stands (its
    receipts are the proof, and receipts are delivered whatever the quota)."""

    async def scenario(web: Web) -> None:
        async with web.db.session() as s, s.begin():
            mailbox = await s.get(Mailbox, ALICE)
            assert mailbox is not None
            mailbox.quota_bytes = 4096
        assert (await login(web.client, ALICE, PASSWORD)).status_code == 303
        files = [("attachments", ("a.bin", b"\1" * 8192, "application/octet-stream"))]
        r = await post_compose(web.client, {"to": BOB, "subject": "Piena"}, files)
        assert r.status_code == 303
        assert len(await submissions(web.db)) == 1
        assert MaildirStore(web.cfg.maildir_root).list_folder(ALICE, SENT) == []

    run_web(web_cfg, scenario)


def test_the_received_field_is_taken_off_whole() -> None:
    data = (
        b"Received: from webmail ([1.2.3.4])\r\n\tby h (pecd)\r\n for <b@c.it>; now\r\nFrom: a\r\n"
    )
    assert without_first_field(data) == b"From: a\r\n"
    assert without_first_field(b"Received: x") == b"Received: x"


# --- /verify --------------------------------------------------------------------------------------


def accettazione(identity: ProviderIdentity) -> bytes:
    """An accettazione from alice to bob and a stranger, signed as ``identity``."""
    original = (
        b"From: alice@pec.example.test\r\nTo: bob@pec.example.test, ghost@pec.other.test\r\n"
        b"Subject: Verifica\r\nMessage-ID: <v-1@alice>\r\nDate: Mon, 02 Mar 2026 10:15:00 +0100"
        b"\r\n\r\nCiao.\r\n"
    )
    tx = Transmission.from_submission(
        original,
        mail_from=ALICE,
        rcpt_to=[BOB, GHOST],
        identificativo="pecd.20260302101530.00112233@pec.example.test",
        is_certified=lambda a: a.endswith("@pec.example.test"),
    )
    return b.accettazione(tx, identity, pec_time(SystemClock().now())).raw


async def verify(client: httpx.AsyncClient, name: str, data: bytes) -> httpx.Response:
    page = await client.get("/verify")
    assert page.status_code == 200
    return await client.post(
        "/verify", data={"csrf": csrf_of(page)}, files={"eml": (name, data, "message/rfc822")}
    )


def test_verify_gives_a_verdict_for_anything(
    web_cfg: Config, dev_pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    examined: list[int] = []
    real_examine = compose_page_module.examine

    def counting(raw: bytes, **kwargs: Any) -> Any:
        examined.append(len(raw))
        return real_examine(raw, **kwargs)

    monkeypatch.setattr(compose_page_module, "examine", counting)
    ours = accettazione(provider_identity(web_cfg))
    assert classify(ours).is_valid_pec
    # Signed by a key of its own, not this installation's (nor anyone's in the index).
    stranger = ProviderIdentity(
        name="Example PEC S.p.A.",
        domain="pec.example.test",
        service_address="posta-certificata@pec.example.test",
        signer=KeySigner.from_pem(dev_pki.signing.key_pem, dev_pki.signing.cert_pem),
    )
    forged = accettazione(stranger)
    tampered = ours.replace(b"bob@pec.example.test", b"eve@pec.example.test")
    assert tampered != ours
    real = (CORPUS / "posta-certificata__aruba__oca-pecmsg-message2.eml").read_bytes()
    edited = CORPUS / "posta-certificata__sogei__oca-fpa-invio-file-7339338-base64-edited.eml"
    nested = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"".join(
        f"--{'a' * i}\r\nContent-Type: multipart/mixed; boundary={'a' * (i + 1)}\r\n\r\n".encode()
        for i in range(1, 400)
    )

    async def scenario(web: Web) -> None:
        client = web.client
        r = await client.get("/verify")
        assert r.status_code == 303  # logged in only
        assert (await login(client, ALICE, PASSWORD)).status_code == 303

        r = await verify(client, "ours.eml", ours)
        assert r.status_code == 200, r.text[:500]
        text = text_of(r)
        assert "Messaggio PEC valido, firmato da un gestore dell'indice" in text
        assert "Ricevuta: accettazione" in text and "Presente: Example PEC S.p.A." in text
        assert "pecd.20260302101530.00112233@pec.example.test" in text  # daticert identificativo
        assert f"{GHOST} (esterno)" in text and "Valida (sha" in text
        assert "non sono garantiti" not in text

        r = await verify(client, "forged.eml", forged)
        text = text_of(r)
        assert "chi ha firmato non è un gestore dell'indice" in text and "Non presente" in text

        r = await verify(client, "tampered.eml", tampered)
        text = text_of(r)
        assert "Non è un messaggio PEC valido." in text and "Non valida:" in text
        assert "[digest-mismatch]" in text, text

        r = await verify(client, "real.eml", real)  # Aruba 2014: intact, not in this index
        text = text_of(r)
        assert "Busta di trasporto" in text and "Valida (sha1)" in text
        assert "Posta Certificata ARUBA PEC" in text and "Non presente" in text

        r = await verify(client, "edited.eml", edited.read_bytes())  # real, edited after signing
        text = text_of(r)
        assert "Non valida:" in text and "Non è un messaggio PEC valido." in text
        assert "Sogei SpA" in text and "questi dati non sono garantiti" in text

        plain = b"From: a@b.it\r\nTo: c@d.it\r\nSubject: ciao\r\n\r\nciao\r\n"
        r = await verify(client, "plain.eml", plain)
        assert "Messaggio ordinario (non PEC)" in text_of(r)
        assert "Assente: il messaggio non è firmato." in text_of(r)

        hostile = {
            "garbage.eml": bytes(range(256)) * 64,
            "empty-ish.eml": b"\r\n\r\n\r\n",
            "huge-header.eml": b"Subject: " + b"x" * 1_000_000 + b"\r\n\r\nbody",
            "many-headers.eml": b"X-A: b\r\n" * 50_000 + b"\r\n",
            "nested.eml": nested,
            "fake-signed.eml": (
                b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
                b"boundary=z\r\nX-Ricevuta: accettazione\r\n\r\n--z\r\nContent-Type: text/plain"
                b"\r\n\r\nx\r\n--z\r\nContent-Type: application/pkcs7-signature\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\r\n--z--\r\n"
            ),
        }
        for name, data in hostile.items():
            r = await verify(client, name, data)
            assert r.status_code == 200, (name, r.status_code)
            text = text_of(r)
            assert "Esito" in text and name in text, name
            assert (
                "Non è un messaggio PEC valido." in text
                or "non è un messaggio di posta" in text
                or "non può essere analizzato" in text
            ), (name, text[-800:])
        assert "non è un messaggio di posta" in text_of(await verify(client, "g", b"\0\1\2"))

        # No file; in English.
        page = await client.get("/verify")
        r = await client.post("/verify", data={"csrf": csrf_of(page)})
        assert r.status_code == 422 and "Scegli un file .eml." in text_of(r)
        r = await client.post(
            "/verify",
            data={"csrf": csrf_of(page)},
            files={"eml": ("ours.eml", ours, "message/rfc822")},
            headers={"Accept-Language": "en"},
        )
        assert "A valid PEC message, signed by a provider in the index" in text_of(r)
        # Without the CSRF token: 403.
        r = await client.post("/verify", files={"eml": ("ours.eml", ours, "message/rfc822")})
        assert r.status_code == 403

        # The check is heavy work, in a slot shared with the mail pages; the upload is read
        # only in it. With every slot taken, a posted file waits unread and unchecked.
        gate = threading.Event()
        reads: list[int] = []
        real_read = UploadFile.read

        async def read(self: UploadFile, size: int = -1) -> bytes:
            reads.append(size)
            return await real_read(self, size)

        monkeypatch.setattr(UploadFile, "read", read)
        checks = len(examined)
        holders = [asyncio.create_task(heavy_work.run(gate.wait)) for _ in range(HEAVY_SLOTS)]
        try:
            waiting = asyncio.create_task(verify(client, "ours.eml", ours))
            for _ in range(500):
                if heavy_work.waiting:
                    break
                await asyncio.sleep(0.01)
            assert heavy_work.waiting == 1 and not waiting.done()
            assert reads == [] and len(examined) == checks
        finally:
            gate.set()
        await asyncio.gather(*holders)
        r = await waiting
        assert r.status_code == 200 and "Messaggio PEC valido" in text_of(r)
        assert len(examined) == checks + 1

    run_web(web_cfg, scenario)


def test_verify_refuses_a_file_over_the_mail_limit(small_cfg: Config) -> None:
    async def scenario(web: Web) -> None:
        assert (await login(web.client, ALICE, PASSWORD)).status_code == 303
        r = await verify(web.client, "big.eml", b"Subject: x\r\n\r\n" + b"y" * (1024 * 1024))
        assert r.status_code == 413 and "Il file supera il limite di 1 MB." in text_of(r)

    run_web(small_cfg, scenario)


def test_pecd_verify_prints_what_examine_finds(capsys: pytest.CaptureFixture[str]) -> None:
    """The command the verify page shares its check with (pecd.cli.verify.examine) prints as it
    did before the check was split out of it."""
    path = CORPUS / "accettazione__aruba__oca-fpa-it03339130126-00009.eml"
    assert cli_main(["verify", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: receipt (accettazione)"
    assert out[1].startswith("  signature: valid, sha1, signed by CN=Posta Certificata ARUBA PEC")
    assert out[3] == ("  daticert: tipo=accettazione errore=nessuno gestore='ARUBA PEC S.p.A.'")
    assert out[-1] == "  => valid PEC message"
    edited = CORPUS / "posta-certificata__sogei__oca-fpa-invio-file-7339338-base64-edited.eml"
    assert cli_main(["verify", str(edited)]) == 1
    assert "  => NOT a valid PEC message" in capsys.readouterr().out


# --- end to end -----------------------------------------------------------------------------------


def test_webmail_compose_end_to_end(web_cfg: Config) -> None:
    """A PEC written in the webmail goes through the real pipeline: the accettazione lands in
    alice's INBOX and the envelope in bob's; her Sent copy is listed over IMAP as \\Sent."""
    server = AppThread(web_cfg).start()
    try:

        async def scenario(web: Web) -> str:
            assert (await login(web.client, ALICE, PASSWORD)).status_code == 303
            r = await post_compose(
                web.client,
                {"to": BOB, "subject": "Dal webmail", "body": "Ciao Bob.", "receipt": "completa"},
                [("attachments", ("nota.txt", b"una nota\n", "text/plain"))],
            )
            assert r.status_code == 303
            return r.headers["location"].rsplit("/", 1)[1]

        intake: str = run_web(web_cfg, scenario)

        def receipts() -> list[Any]:
            found = [classify(m) for m in fetch_all(server, "alice")]
            return [c for c in found if c.ricevuta is Ricevuta.ACCETTAZIONE] and found

        inbox = wait_for(receipts, what="the accettazione in alice's INBOX")
        acc = next(c for c in inbox if c.ricevuta is Ricevuta.ACCETTAZIONE)
        assert acc.is_valid_pec and acc.daticert is not None
        assert acc.daticert.oggetto == "Dal webmail"
        envelope = wait_for(lambda: fetch_all(server, "bob"), what="the envelope in bob's INBOX")
        assert b"nota.txt" in envelope[0] and classify(envelope[0]).is_valid_pec
        assert intake.startswith("api-")

        with imaplib.IMAP4_SSL(
            "127.0.0.1", server.port("imaps"), ssl_context=client_tls(server.cfg)
        ) as imap:
            imap.login(ALICE, PASSWORD)
            typ, listed = imap.list()
            assert typ == "OK"
            sent_line = [x for x in listed if isinstance(x, bytes) and x.endswith(b" Sent")]
            assert sent_line and b"\\Sent" in sent_line[0], listed
            typ, _ = imap.select("Sent", readonly=True)
            assert typ == "OK"
            typ, data = imap.fetch("1", "(FLAGS BODY.PEEK[])")
            assert typ == "OK" and b"\\Seen" in data[0][0]
            copy = fetched_literal(data)
            assert b"Subject: Dal webmail" in copy and b"nota.txt" in copy
    finally:
        server.stop()
