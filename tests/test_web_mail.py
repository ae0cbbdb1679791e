"""The webmail's mail pages (pecd.web.pages.mail) through the whole HTTPS app in process: the
folder list, message lists and search, the reading page of every PEC kind, the raw message, the
attachments, the sandboxed HTML frame and its own CSP; another mailbox's messages and paths out
of the mailbox refused; a transmission sent through the real pipeline followed on its timeline,
and its evidence bundle, every receipt of which openssl verifies against the installation's CA."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import re
import threading
import time as time_module
import zipfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import ORIGINAL, WHEN_INSTANT, AppThread, every_kind, openssl_verify
from pecd.clock import SystemClock
from pecd.config import Config
from pecd.mailbox import uidlist
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.pki import DevPki
from pecd.web import mailview, timeline
from pecd.web.evidence import build_bundle
from pecd.web.mailview import summarize_head
from pecd.web.pages.mail import FRAME_CSP, PAGE_SIZE
from pecd.web.sentcopy import store_sent_copy
from pecd.web.status import transmission_status
from pecd.web.submit import Attachment, submit
from pecd.web.timeline import (
    HEAVY_SLOTS,
    HeavyWork,
    MailboxReader,
    TransmissionMessages,
    build_timeline,
    find_transmission_messages,
    folder_name,
    folder_token,
    heavy_work,
)
from web_fixtures import (
    ALICE,
    BOB,
    CAROL,
    PASSWORD,
    Web,
    login,
    run_web,
    web_cfg_fixture,  # noqa: F401 (a fixture)
    web_template_fixture,  # noqa: F401 (a fixture)
)

CORPUS = Path(__file__).parent / "data" / "pec-real"
ENVELOPE = "posta-certificata__aruba__fabioportieri-xdcr-2022-02-00583.eml"
GHOST = "ghost@pec.example.test"

HOSTILE = (
    b"From: Mallory <mallory@evil.example>\r\nTo: alice@pec.example.test\r\n"
    b"Subject: Fattura urgente\r\nDate: Tue, 24 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <hostile@evil.example>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
    b"--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<p onclick="alert(1)">Paga <a href="javascript:alert(2)">qui</a></p>'
    b'<script>alert(3)</script><img src="https://evil.example/track.gif">'
    b'<form action="https://evil.example/"><input name="pin"></form>'
    b'<iframe src="https://evil.example/"></iframe><a href="https://example.org/x">ok</a>\r\n'
    b'--B\r\nContent-Type: text/html; name="pagina.html"\r\n'
    b'Content-Disposition: attachment; filename="../../pagina.html"\r\n\r\n'
    b"<script>alert(4)</script>\r\n--B--\r\n"
)
GARBAGE = b"\x00\xff garbage \r\n\r\n\x00"


def _deliver(cfg: Config, address: str, name: str, data: bytes, folder: str = "INBOX") -> int:
    """Deliver ``data`` into ``address``'s ``folder``; its IMAP UID."""
    store = MaildirStore(cfg.maildir_root)
    delivered = store.deliver(address, name, data, folder=folder)
    listing = uidlist.sync(store.folder_path(address, folder))
    base = delivered.path.name.split(":", 1)[0]
    return listing.by_name()[base].uid


def _deliver_to(store: MaildirStore, name: str, data: bytes) -> int:
    delivered = store.deliver(ALICE, name, data)
    listing = uidlist.sync(store.folder_path(ALICE, "INBOX"))
    return listing.by_name()[delivered.path.name.split(":", 1)[0]].uid


def _kinds(page: str) -> list[str]:
    return re.findall(r'data-kind="([^"]+)"', page)


def test_folders_list_read_and_download(web_cfg: Config, dev_pki: DevPki) -> None:
    cfg = web_cfg
    built = every_kind(dev_pki)
    uids: dict[str, int] = {}
    uids["envelope"] = _deliver(cfg, ALICE, "env", (CORPUS / ENVELOPE).read_bytes())
    for name in ("accettazione", "avvenuta-consegna-completa", "errore-consegna", "non-accettazione-virus", "busta-di-anomalia"):  # fmt: skip
        uids[name] = _deliver(cfg, ALICE, name, built[name])
    uids["plain"] = _deliver(cfg, ALICE, "plain", ORIGINAL)
    uids["hostile"] = _deliver(cfg, ALICE, "hostile", HOSTILE)
    uids["garbage"] = _deliver(cfg, ALICE, "garbage", GARBAGE)
    sent_uid = _deliver(cfg, ALICE, "sent", ORIGINAL, folder="Sent")
    # Bob's message has a UID alice's INBOX does not: alice must never see it. Bob's INBOX
    # has more than a page of messages.
    n_bob = PAGE_SIZE + 5
    for i in range(n_bob - 1):
        _deliver(cfg, BOB, f"bob-{i}", ORIGINAL.replace(b"Ciao Bob.", f"Ciao {i}".encode()))
    bobs = _deliver(cfg, BOB, "bob", ORIGINAL.replace(b"Ciao Bob.", b"SEGRETO di Bob"))
    assert bobs > max(uids.values())

    async def scenario(web: Web) -> None:
        c = web.client
        # Not logged in: to the login page, nothing shown.
        r = await c.get("/mail/INBOX")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert (await login(c, ALICE, PASSWORD)).status_code == 303

        r = await c.get("/mail")
        assert r.status_code == 200
        assert 'data-folder="INBOX"' in r.text and 'data-folder="Sent"' in r.text
        assert re.search(r'data-folder="INBOX">.*?<td class="count">9</td>', r.text, re.S)

        # The list: newest first, one badge per PEC kind.
        r = await c.get("/mail/INBOX")
        assert r.status_code == 200
        listed = [int(u) for u in re.findall(r'data-uid="(\d+)"', r.text)]
        assert listed == sorted(uids.values(), reverse=True)
        kinds = _kinds(r.text)
        for k in ("posta-certificata", "accettazione", "avvenuta-consegna", "errore-consegna"):
            assert k in kinds
        assert {"non-accettazione", "virus", "anomalia", "plain"} <= set(kinds)
        # Search by kind, sender, subject, dates; bad values are ignored, not errors.
        r = await c.get("/mail/INBOX", params={"kind": "avvenuta-consegna"})
        assert re.findall(r'data-uid="(\d+)"', r.text) == [str(uids["avvenuta-consegna-completa"])]
        r = await c.get("/mail/INBOX", params={"kind": "virus"})
        assert re.findall(r'data-uid="(\d+)"', r.text) == [str(uids["non-accettazione-virus"])]
        r = await c.get("/mail/INBOX", params={"from": "MALLORY"})
        assert re.findall(r'data-uid="(\d+)"', r.text) == [str(uids["hostile"])]
        r = await c.get("/mail/INBOX", params={"subject": "xdcr_2022"})
        assert re.findall(r'data-uid="(\d+)"', r.text) == [str(uids["envelope"])]
        r = await c.get("/mail/INBOX", params={"since": "2023-08-18", "until": "2023-08-18"})
        assert re.findall(r'data-uid="(\d+)"', r.text) == [str(uids["envelope"])]
        r = await c.get("/mail/INBOX", params={"kind": "<script>", "since": "x", "page": "-4"})
        assert r.status_code == 200 and "<script>" not in r.text

        # Reading a real envelope: the original unwrapped, the verdict, the daticert.
        env = f"/mail/INBOX/{uids['envelope']}"
        r = await c.get(env)
        assert r.status_code == 200
        page = r.text
        assert "[XDCR] xdcr_2022_02_00583.txt" in page
        # Aruba is not in this installation's provider index: the signature holds, the message
        # is not valid PEC here (as the reception point would judge it).
        assert "verdict-bad" in page and "not-indexed" in page and "Firma valida" in page
        assert "opec21010.20230818173714.75133.134.1.56@pec.aruba.it" in page
        assert "Posta Certificata ARUBA PEC" in page
        frame = re.search(r"<iframe [^>]*>", page)
        assert frame is not None
        assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in frame.group(0)
        assert "allow-scripts" not in page and "allow-same-origin" not in page
        assert f'src="{env}/html"' in frame.group(0)
        part_link = re.search(rf'href="({env}/part/\d+)" download>xdcr_2022_02_00583.txt<', page)
        assert part_link is not None
        # Read: \Seen as an IMAP server sets it, the UID unchanged.
        reader = MailboxReader(MaildirStore(cfg.maildir_root), ALICE)
        entry = reader.entry("INBOX", uids["envelope"])
        assert entry is not None and entry.path.name.endswith(":2,S")

        r = await c.get(f"{env}/raw")
        assert r.status_code == 200 and r.content == entry.path.read_bytes()
        assert r.headers["content-disposition"].startswith("attachment;")
        r = await c.get(part_link.group(1))
        assert r.status_code == 200 and len(r.content) == 14448
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("attachment;")
        r = await c.get(f"{env}/html")
        assert r.status_code == 200 and r.headers["content-security-policy"] == FRAME_CSP
        assert "<script" not in r.text.lower()
        assert (await c.get(f"{env}/part/999")).status_code == 404

        # Every kind reads: verdict, badge, the original where there is one.
        for name in ("accettazione", "avvenuta-consegna-completa", "errore-consegna", "busta-di-anomalia"):  # fmt: skip
            r = await c.get(f"/mail/INBOX/{uids[name]}")
            assert r.status_code == 200, name
            assert "Firma valida" in r.text, name
        r = await c.get(f"/mail/INBOX/{uids['avvenuta-consegna-completa']}")
        assert "Fattura n. 12" in r.text and "f.pdf" in r.text
        r = await c.get(f"/mail/INBOX/{uids['errore-consegna']}")
        assert "no-dest" in r.text and "5.1.1" in r.text

        # Hostile HTML: nothing executable or remote reaches the frame; the page says so.
        hostile = f"/mail/INBOX/{uids['hostile']}"
        r = await c.get(hostile)
        assert r.status_code == 200 and "remote-blocked" in r.text and "alert(" not in r.text
        r = await c.get(f"{hostile}/html")
        assert r.headers["content-security-policy"] == FRAME_CSP
        low = r.text.lower()
        for bad in ("<script", "alert(", "onclick", "javascript:", "<img", "evil.example", "<form", "<iframe"):  # fmt: skip
            assert bad not in low, bad
        assert 'href="https://example.org/x" target="_blank" rel="noopener noreferrer"' in r.text
        # The HTML attachment is a download, never a page; its name has no path in it.
        names = re.findall(
            rf'href="{hostile}/part/(\d+)" download>([^<]+)<', r.text + (await c.get(hostile)).text
        )
        [(n, fname)] = names
        assert fname == "pagina.html"
        r = await c.get(f"{hostile}/part/{n}")
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith('attachment; filename="pagina.html"')

        # Garbage: a page with the problem, never an error.
        r = await c.get(f"/mail/INBOX/{uids['garbage']}")
        assert r.status_code == 200 and "problems" in r.text
        assert (await c.get(f"/mail/INBOX/{uids['garbage']}/html")).status_code == 404

        # Sent.
        r = await c.get(f"/mail/Sent/{sent_uid}")
        assert r.status_code == 200 and "Fattura n. 12" in r.text

        # Bob's message is not alice's: 404, and its content never shows.
        for path in (f"/mail/INBOX/{bobs}", f"/mail/INBOX/{bobs}/raw", f"/mail/INBOX/{bobs}/part/0"):  # fmt: skip
            r = await c.get(path)
            assert r.status_code == 404 and "SEGRETO" not in r.text, path
        # Paths out of the mailbox, or naming no folder of it.
        for path in (
            "/mail/...", "/mail/.Sent", "/mail/Sent.", "/mail/..%2F..%2Fbob",
            "/mail/%2e%2e/1", "/mail/INBOX%00/1", "/mail/Nope/1", "/mail/a..b/1",
            "/mail/INBOX/abc", "/mail/INBOX/-1", "/mail/INBOX/99999999999999999999",
            "/mail/..%2F..%2F..%2Fetc/1/raw",
        ):  # fmt: skip
            r = await c.get(path)
            assert r.status_code == 404, path
            assert "SEGRETO" not in r.text

        # Bob, logged in, sees his own message at that UID and not alice's.
        b = web.browser("203.0.113.8")
        assert (await login(b, BOB, PASSWORD)).status_code == 303
        r = await b.get(f"/mail/INBOX/{bobs}")
        assert r.status_code == 200 and "SEGRETO di Bob" in r.text
        r = await b.get(f"/mail/INBOX/{uids['hostile']}")
        assert "Mallory" not in r.text

        # A mailbox that never got a message: an empty INBOX, not an error.
        carol = web.browser("203.0.113.10")
        assert (await login(carol, CAROL, PASSWORD)).status_code == 303
        r = await carol.get("/mail/INBOX")
        assert r.status_code == 200 and "data-uid" not in r.text
        assert (await carol.get("/mail")).status_code == 200
        assert (await carol.get("/mail/INBOX/1")).status_code == 404

        # Pages of PAGE_SIZE, newest first, the search kept across pages.
        r = await b.get("/mail/INBOX", params={"page": "2"})
        assert r.status_code == 200 and "SEGRETO" not in r.text
        page1 = [int(u) for u in re.findall(r'data-uid="(\d+)"', (await b.get("/mail/INBOX")).text)]
        assert len(page1) == PAGE_SIZE and page1 == sorted(page1, reverse=True)
        page2 = [int(u) for u in re.findall(r'data-uid="(\d+)"', r.text)]
        assert page2 and max(page2) < min(page1) and len(page1) + len(page2) == n_bob
        r = await b.get("/mail/INBOX", params={"subject": "fattura", "page": "2"})
        assert 'href="/mail/INBOX?subject=fattura"' in r.text  # the previous page keeps it

    run_web(cfg, scenario)


def test_folder_names_from_urls() -> None:
    """A URL's folder token names a folder of the mailbox or nothing (httpx normalises "..",
    so the tokens a raw client could send are checked here)."""
    assert folder_name("INBOX") == "INBOX" and folder_name("inbox") == "INBOX"
    assert folder_name("Sent") == "Sent" and folder_name("Clienti.2024") == "Clienti/2024"
    for bad in (
        "",
        ".",
        "..",
        "...",
        ".Sent",
        "Sent.",
        "a..b",
        "../bob",
        "a/b",
        "a\\b",
        "x\x00",
        "x\n",
    ):
        assert folder_name(bad) is None, bad
    assert folder_token("Clienti/2024") == "Clienti.2024" and folder_token("INBOX") == "INBOX"


def test_transmission_timeline_and_evidence(
    web_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PEC sent from the web's intake, through the real pipeline, to bob (delivered) and to a
    mailbox that does not exist (errore-consegna): its timeline, each step linked to its
    receipt; the reading pages link to it; the evidence zip holds exactly the stored bytes.
    Messages whose unsigned headers claim to be its receipts are not parsed on every view (at
    most as many as the trace log's receipts not found by file name, once), and the timelines
    and bundles made at once never run more than HEAVY_SLOTS at a time."""
    cfg = web_cfg
    parses: list[int] = []
    real_classify = timeline.classify

    def counting(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        parses.append(len(raw))
        return real_classify(raw, *args, **kwargs)

    monkeypatch.setattr(timeline, "classify", counting)
    srv = AppThread(cfg).start()
    try:

        async def scenario(web: Web) -> None:
            c = web.client
            assert (await login(c, ALICE, PASSWORD)).status_code == 303
            sent = await submit(
                web.db,
                cfg,
                SystemClock(),
                mailbox=ALICE,
                to=[BOB, GHOST],
                subject="Contratto 7",
                body="In allegato il contratto.",
                attachments=[Attachment("contratto.pdf", "application", "pdf", b"%PDF-1.4 c")],
                receipt="completa",
                peer="203.0.113.7",
                via="web",
            )
            await asyncio.to_thread(
                store_sent_copy, MaildirStore(cfg.maildir_root), ALICE, sent.key, sent.message
            )
            url = f"/transmissions/{sent.key}"

            async def settled() -> str | None:
                r = await c.get(url)
                assert r.status_code == 200, r.text[:300]
                done = "status-avvenuta-consegna" in r.text and "status-errore-consegna" in r.text
                return r.text if done and r.text.count("receipt-link") >= 3 else None

            page = None
            for _ in range(300):
                page = await settled()
                if page:
                    break
                await asyncio.sleep(0.1)
            assert page, "the transmission did not settle"

            # 30 messages claiming to be receipts of it: a view parses at most as many as the
            # receipts not found by name (the presa in carico, which went to the provider),
            # once; the next view parses none.
            store = MaildirStore(cfg.maildir_root)
            for i in range(30):
                await asyncio.to_thread(
                    store.deliver, ALICE, f"fake-{i}", _fake_receipt(i, sent.message_id)
                )
            status = await transmission_status(web.db, ALICE, sent.key, maildir=store)
            assert status is not None
            missing = sum(e["receipt"] is None for e in status["events"])
            del parses[:]
            assert (await c.get(url)).status_code == 200
            assert len(parses) <= missing < 30
            del parses[:]
            assert (await c.get(url)).status_code == 200
            assert parses == []
            assert "Contratto 7" in page and 'http-equiv="refresh"' not in page
            bob = re.search(rf'data-recipient="{re.escape(BOB)}".*?</section>', page, re.S)
            assert bob and "consegnata" in bob.group(0) and "receipt-link" in bob.group(0)
            ghost = re.search(rf'data-recipient="{GHOST}".*?</section>', page, re.S)
            assert ghost and "errore" in ghost.group(0) and "receipt-link" in ghost.group(0)
            links = re.findall(r'class="receipt-link" href="(/mail/INBOX/\d+)"', page)
            assert len(set(links)) == 3  # accettazione, consegna, mancata consegna
            sent_link = re.search(r'href="(/mail/Sent/\d+)"', page)
            assert sent_link is not None

            # The receipts and the Sent copy link back to the timeline.
            for link in [*links, sent_link.group(1)]:
                r = await c.get(link)
                assert r.status_code == 200 and f'href="{url}"' in r.text, link
            r = await c.get(f"{url}", headers={"Accept-Language": "en"})
            assert "delivered" in r.text

            # Bob cannot see alice's transmission; a made-up id is not found either.
            b = web.browser("203.0.113.9")
            assert (await login(b, BOB, PASSWORD)).status_code == 303
            assert (await b.get(url)).status_code == 404
            assert (await b.get(f"{url}/evidence.zip")).status_code == 404
            assert (await c.get("/transmissions/api-nope")).status_code == 404
            assert (await c.get("/transmissions/..%2F..")).status_code == 404

            # Timelines and bundles at once: never more than HEAVY_SLOTS running.
            heavy_work.reset_peak()
            runs = heavy_work.runs
            many = await asyncio.gather(
                *[c.get(f"{url}/evidence.zip") for _ in range(4)], *[c.get(url) for _ in range(4)]
            )
            assert [x.status_code for x in many] == [200] * 8
            assert heavy_work.runs - runs == 12  # 4 timelines for the bundles, 4 bundles, 4 views
            assert 1 <= heavy_work.peak <= HEAVY_SLOTS

            r = await c.get(f"{url}/evidence.zip")
            assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
            assert r.headers["content-disposition"].startswith("attachment;")
            reader = MailboxReader(MaildirStore(cfg.maildir_root), ALICE)
            stored = {}
            for link in links:
                entry = reader.entry("INBOX", int(link.rsplit("/", 1)[1]))
                assert entry is not None
                stored[entry.uid] = entry.path.read_bytes()
            return r.content, stored, sent.message

        bundle, stored, message = run_web(cfg, scenario)
    finally:
        srv.stop()
    z = zipfile.ZipFile(io.BytesIO(bundle))
    names = z.namelist()
    receipts = [n for n in names if n.startswith("ricevute/")]
    assert len(receipts) == 3 and "summary.txt" in names and "originale.eml" in names
    assert z.read("originale.eml").startswith(message[:200]) or message in z.read("originale.eml")
    assert sorted(z.read(n) for n in receipts) == sorted(stored.values())
    summary = z.read("summary.txt").decode("utf-8")
    assert BOB in summary and GHOST in summary and "consegnata / delivered" in summary
    assert "errore / error" in summary
    for n in [*receipts, "originale.eml"]:
        assert f"{hashlib.sha256(z.read(n)).hexdigest()}  {n}" in summary
    assert cfg.tls.ca is not None
    for n in receipts:
        openssl_verify(z.read(n), cfg.tls.ca, tmp_path)


def _fake_receipt(i: int, client_msgid: str) -> bytes:
    """A message whose unsigned headers claim it is a delivery receipt of ``client_msgid``'s
    transmission (anyone may APPEND one): it is not."""
    return (
        f"From: posta-certificata@pec.example.test\r\nTo: {ALICE}\r\nSubject: CONSEGNA {i}\r\n"
        f"Message-ID: <fake-{i}@x>\r\nX-Ricevuta: avvenuta-consegna\r\n"
        f"X-Riferimento-Message-ID: {client_msgid}\r\n\r\nnon firmata {i}\r\n"
    ).encode()


def test_receipts_found_matched_and_bundled_offline(dev_pki: DevPki, tmp_path: Path) -> None:
    """Without the pipeline: the receipts of a transmission are found in a mailbox by the UIDs
    of the files delivered under their keys, and, as many as are missing, by their headers; a
    file is parsed once (never again for the next view), and messages whose unsigned headers
    claim to be receipts are parsed only within that count. Each step of the trace log gets its
    own receipt (two preavvisi for one recipient get one each), and a bundle over its size bound
    leaves files out and says so, as it says when there is no copy in Sent."""
    built = every_kind(dev_pki)
    store = MaildirStore(tmp_path / "mail")
    client = "<client-42@alice.laptop>"
    names = ("accettazione", "preavviso-12h", "preavviso-24h", "avvenuta-consegna-sintetica")
    uids = {name: _deliver_to(store, name, built[name]) for name in names}
    store.deliver(ALICE, "other", (CORPUS / ENVELOPE).read_bytes())  # not a receipt of it
    # Newer than the real ones: 20 messages claiming to be receipts of the transmission.
    for i in range(20):
        store.deliver(ALICE, f"fake-{i}", _fake_receipt(i, client))
    pec_msgid = "pecd.20260302101530.0123456789abcdef@pec.example.test"
    reader = MailboxReader(store, ALICE)
    # Two were located by their delivery keys; the trace log knows the Message-IDs of the
    # other two (found by headers: filed away, or copied, they have other names).
    located = [uids["accettazione"], uids["avvenuta-consegna-sintetica"]]
    ids = [summarize_head(built[n]).message_id for n in ("preavviso-12h", "preavviso-24h")]

    def find(**kw: object) -> TransmissionMessages:
        args: dict[str, object] = {
            "intake_key": None,
            "pec_msgid": pec_msgid,
            "client_msgid": client,
            "receipt_ids": ids,
            "receipt_uids": located,
            "unlocated": 2,
            "max_bytes": 10**7,
        }
        return find_transmission_messages(reader, **{**args, **kw})  # type: ignore[arg-type]

    found = find()
    assert found.sent is None and found.scanned_all
    assert sorted(r.kind.value for r in found.receipts) == sorted(
        [
            "accettazione",
            "preavviso-errore-consegna",
            "preavviso-errore-consegna",
            "avvenuta-consegna",
        ]
    )
    assert all(r.valid for r in found.receipts)
    assert found.parsed == 4  # the fakes were not parsed: no receipt was missing any more
    # The next view parses nothing: each file's reading is remembered.
    again = find()
    assert again.parsed == 0 and again.receipts == found.receipts
    # With more receipts missing than there are, the fakes are parsed, up to that count, once.
    more = find(unlocated=25)
    assert more.parsed == 20 and more.receipts == found.receipts
    assert find(unlocated=25).parsed == 0
    # No receipt is found for another transmission.
    none = find(pec_msgid="x@y")
    assert none.receipts == () and none.parsed == 0

    when = WHEN_INSTANT.isoformat()
    later = (WHEN_INSTANT + timedelta(hours=12)).isoformat()
    status = {
        "id": "api-0123",
        "status": "accepted",
        "pec_msgid": pec_msgid,
        "client_msgid": "<client-42@alice.laptop>",
        "subject": "Fattura n. 12",
        "accepted_at": when,
        "error": None,
        "recipients": [
            {"address": BOB, "tipo": "certificato", "status": "avvenuta-consegna", "at": later},
            {
                "address": "carol@pec.example.test",
                "tipo": "certificato",
                "status": "accettazione",
                "at": when,
            },
        ],
        "events": [
            {"event": "accettazione", "at": when, "error": None},
            {"event": "preavviso-errore-consegna", "at": when, "recipients": [BOB], "error": None},
            {"event": "preavviso-errore-consegna", "at": later, "recipients": [BOB], "error": None},
            {"event": "avvenuta-consegna", "at": later, "recipients": [BOB], "error": None},
        ],
    }
    tl = build_timeline(status, found)
    assert [s.kind for s in tl.steps] == ["accettazione"] and tl.steps[0].receipt is not None
    bob, carol = tl.recipients
    refs = [s.receipt for s in bob.steps]
    assert all(refs) and len(set(refs)) == 3
    assert bob.final and bob.words == ("consegnata", "delivered")
    assert not carol.final and carol.words == ("in attesa", "waiting") and not carol.steps
    assert not tl.complete

    sizes = sorted(len(built[n]) for n in names)
    bundle = build_bundle(tl, mailbox=ALICE, now=WHEN_INSTANT, limit=sizes[0] + sizes[1])
    try:
        z = zipfile.ZipFile(bundle.file)
        kept = [n for n in z.namelist() if n.startswith("ricevute/")]
        summary = z.read("summary.txt").decode()
    finally:
        bundle.close()
    assert len(kept) == 2 and "originale.eml" not in z.namelist()
    assert "Left out for size" in summary and 'no copy in "Sent"' in summary
    assert "carol@pec.example.test [certificato]: in attesa / waiting" in summary


def _big_plain(n_bytes: int) -> bytes:
    """A plain message with a text body, an HTML body and an attachment of ``n_bytes``."""
    blob = base64.encodebytes(bytes(range(256)) * (n_bytes // 256)).replace(b"\n", b"\r\n")
    return (
        b"From: Mallory <m@evil.example>\r\nTo: alice@pec.example.test\r\nSubject: grande\r\n"
        b"Message-ID: <big@evil.example>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nciao\r\n"
        b"--B\r\nContent-Type: text/html\r\n\r\n<p>ciao <b>grande</b></p>\r\n"
        b"--B\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n' + blob + b"--B--\r\n"
    )


def test_reading_is_capped_and_frames_and_parts_are_not_verified_again(
    web_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reading page verifies the message; its frame and its attachments find the original
    where the page found it, without verifying it again (a cold one is verified once, then
    remembered). Many reading pages, frames and downloads at once run at most HEAVY_SLOTS at a
    time, whoever asks, and each message file is read inside its slot."""
    cfg = web_cfg
    env_uid = _deliver(cfg, ALICE, "env", (CORPUS / ENVELOPE).read_bytes())
    big = _big_plain(512 * 1024)
    big_uid = _deliver(cfg, ALICE, "big", big)
    calls = {"examine": 0, "classify": 0, "load": 0}
    running = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                calls[name] += 1
                running["now"] += 1
                running["peak"] = max(running["peak"], running["now"])
            try:
                # Long enough for every request in flight to overlap, were nothing to stop it.
                time_module.sleep(0.02)
                return fn(*args, **kwargs)
            finally:
                with lock:
                    running["now"] -= 1

        return wrapper

    monkeypatch.setattr(mailview, "examine", counted("examine", mailview.examine))
    monkeypatch.setattr(mailview, "classify", counted("classify", mailview.classify))
    monkeypatch.setattr(MailboxReader, "load", counted("load", MailboxReader.load))

    async def scenario(web: Web) -> None:
        c = web.client
        assert (await login(c, ALICE, PASSWORD)).status_code == 303
        env = f"/mail/INBOX/{env_uid}"
        page = (await c.get(env)).text
        [n] = re.findall(rf'href="{env}/part/(\d+)" download>xdcr_2022_02_00583.txt<', page)
        assert calls == {"examine": 1, "classify": 0, "load": 1}
        # The frame and the attachment: the original found again, nothing verified.
        assert (await c.get(f"{env}/html")).status_code == 200
        for _ in range(3):
            r = await c.get(f"{env}/part/{n}")
            assert r.status_code == 200 and len(r.content) == 14448
        assert (calls["examine"], calls["classify"]) == (1, 0)

        # A message nobody viewed lately: verified once the long way, then remembered.
        pdf = f"/mail/INBOX/{big_uid}/part/2"
        r = await c.get(pdf)
        assert r.status_code == 200 and r.content == bytes(range(256)) * 2048
        assert (calls["examine"], calls["classify"]) == (1, 1)
        assert (await c.get(pdf)).content == r.content
        assert "grande" in (await c.get(f"/mail/INBOX/{big_uid}/html")).text
        assert (calls["examine"], calls["classify"]) == (1, 1)

        # Two holders, 24 heavy requests at once: never more than HEAVY_SLOTS at a time.
        bob = web.browser("203.0.113.8")
        assert (await login(bob, BOB, PASSWORD)).status_code == 303
        bob_uid = _deliver(cfg, BOB, "bob-big", big)
        running["peak"] = 0
        heavy_work.reset_peak()
        before = dict(calls)
        got = await asyncio.gather(
            *[c.get(env) for _ in range(6)],
            *[c.get(f"{env}/part/{n}") for _ in range(6)],
            *[c.get(f"{env}/html") for _ in range(6)],
            *[bob.get(f"/mail/INBOX/{bob_uid}/part/2") for _ in range(6)],
        )
        assert [r.status_code for r in got] == [200] * 24
        assert calls["load"] - before["load"] == 24  # every one read its file, in a slot
        assert calls["examine"] - before["examine"] == 6  # the reading pages only
        assert calls["classify"] - before["classify"] <= HEAVY_SLOTS  # bob's cold message
        assert running["peak"] <= HEAVY_SLOTS and heavy_work.peak <= HEAVY_SLOTS

    run_web(cfg, scenario)


def test_a_heavy_slot_is_held_until_its_job_ends() -> None:
    """A request that is gone (its client hung up) does not give back the slot its job still
    uses: the next job waits for the job, not for the request."""

    async def go() -> None:
        work = HeavyWork(1)
        gate = threading.Event()
        first = asyncio.create_task(work.run(gate.wait))
        for _ in range(500):
            if work.running:
                break
            await asyncio.sleep(0.01)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        second = asyncio.create_task(work.run(lambda: 42))
        for _ in range(500):
            if work.waiting:
                break
            await asyncio.sleep(0.01)
        assert (work.waiting, work.running, work.runs) == (1, 1, 1) and not second.done()
        gate.set()
        assert await second == 42
        assert (work.peak, work.runs, work.running) == (1, 2, 0)

    asyncio.run(go())
