"""The webmail in a real browser, end to end: Debian's headless Chromium driven by Selenium
through chromedriver, against a whole provider (``pecd``'s App with its web process over real
TLS, the pipeline, the mailboxes) on loopback.

alice logs in, sends a PEC with an attachment to bob and to a mailbox that does not exist,
watches the timeline reach "consegnata" for bob and "errore" for the missing one, opens bob's
avvenuta-consegna and sees its daticert and a valid signature, downloads the evidence bundle
(every ``.eml`` in it verifies with ``openssl cms -verify``); bob logs in and reads the original
message unwrapped from the envelope; bob tries alice's pages by URL and is refused; a message
with hostile HTML (scripts, remote images and styles, forms, frames, refresh) is shown to bob
without anything in it running or reaching a listener on loopback.

Chromium trusts exactly the provider's certificate: ``--ignore-certificate-errors-spki-list``
names the SHA-256 of its public key (no blanket "ignore certificate errors").

Screenshots of every step go to ``$PECD_SCREENSHOTS`` (default ``build/screenshots/browser``
under the repository), a PNG per step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import DOMAIN, PASSWORD, install_e2e, openssl_verify
from helpers import AppThread as Server
from pecd.config import Config, load_config
from pecd.mailbox.maildir import MaildirStore

pytestmark = pytest.mark.slow

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
GHOST = f"ghost@{DOMAIN}"
SUBJECT = "Contratto di fornitura n. 42"
BODY = "Buongiorno Bob,\nin allegato il contratto firmato.\nAlice"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = Path(
    os.environ.get(
        "PECD_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build/screenshots/browser"
    )
)


async def _install(directory: Path) -> Config:
    await install_e2e(directory, None)
    path = directory / "pecd.toml"
    text = path.read_text("utf-8")
    text = text.replace('imaps = "127.0.0.1:0"\n', 'imaps = "127.0.0.1:0"\nhttps = "127.0.0.1:0"\n')
    path.write_text(text, "utf-8")
    return load_config(path)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    cfg = asyncio.run(_install(tmp_path / "inst"))
    server = Server(cfg).start()
    try:
        yield server
    finally:
        server.stop()


def _spki_pin(cert_file: Path) -> str:
    """What ``--ignore-certificate-errors-spki-list`` takes: base64 of the SHA-256 of the
    certificate's SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


@pytest.fixture
def browser(srv: Server, tmp_path: Path) -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail("chromium and chromium-driver are missing: run ./scripts/setup")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,1000",
        f"--ignore-certificate-errors-spki-list={_spki_pin(srv.cfg.tls.cert)}",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs",
        {
            "intl.accept_languages": "it-IT,it",
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
        },
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


class Steps:
    """Saves a screenshot per named step, numbered in order."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.n = 0
        shutil.rmtree(SHOTS, ignore_errors=True)
        SHOTS.mkdir(parents=True)

    def shot(self, name: str) -> None:
        self.n += 1
        path = SHOTS / f"{self.n:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path)), path


def _press(driver: Any, selector: str) -> None:
    """Click a submit button and wait for the page it leads to."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, selector).click()
    # While the old page goes, chromedriver may answer a look at its element with
    # "Node with given id does not belong to the document" rather than "stale":
    # the wait polls again.
    WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(page)
    )


def _login(driver: Any, base: str, address: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/login")
    driver.find_element(By.ID, "address").send_keys(address)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    _press(driver, "form[action='/login'] button")
    assert "/login" not in driver.current_url, driver.page_source[:2000]


def _logout(driver: Any) -> None:
    _press(driver, "form.logout button")


def _recipient_status(driver: Any, address: str) -> str:
    from selenium.webdriver.common.by import By

    section = driver.find_element(By.CSS_SELECTOR, f"section[data-recipient='{address}']")
    classes = section.get_attribute("class").split()
    return next((c[len("status-") :] for c in classes if c.startswith("status-")), "")


def test_the_done_when_journey_in_a_real_chromium(
    srv: Server, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    assert srv.app is not None and srv.app.web is not None
    driver = browser
    steps = Steps(driver)
    base = f"https://localhost:{srv.app.web.port('https')}"
    ca = srv.cfg.tls.ca
    assert ca is not None

    # alice logs in and writes a PEC with an attachment to bob and to a missing mailbox.
    _login(driver, base, ALICE)
    steps.shot("alice-logged-in")
    driver.get(f"{base}/compose")
    driver.find_element(By.ID, "to").send_keys(f"{BOB}, {GHOST}")
    driver.find_element(By.ID, "subject").send_keys(SUBJECT)
    driver.find_element(By.ID, "body").send_keys(BODY)
    attachment = tmp_path / "contratto.pdf"
    attachment.write_bytes(b"%PDF-1.4\n% contratto di prova\n" + os.urandom(2048))
    driver.find_element(By.ID, "attachments").send_keys(str(attachment))
    steps.shot("alice-compose")
    _press(driver, "form.compose-form button.primary")
    assert "/transmissions/" in driver.current_url, driver.current_url
    transmission = driver.current_url

    # The timeline reaches "consegnata" for bob and "errore" for the missing mailbox.
    deadline = time.monotonic() + 60
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        driver.get(transmission)
        try:
            statuses = {a: _recipient_status(driver, a) for a in (BOB, GHOST)}
        except Exception:  # the recipients appear once the accettazione is in
            statuses = {}
        if statuses == {BOB: "avvenuta-consegna", GHOST: "errore-consegna"}:
            break
        time.sleep(0.3)
    assert statuses == {BOB: "avvenuta-consegna", GHOST: "errore-consegna"}, statuses
    words = {
        a: driver.find_element(
            By.CSS_SELECTOR, f"section[data-recipient='{a}'] .status .badge"
        ).text
        for a in (BOB, GHOST)
    }
    assert words[BOB].lower() == "consegnata" and words[GHOST].lower() == "errore", words
    steps.shot("alice-timeline-delivered")

    # bob's avvenuta-consegna: its daticert and a valid signature.
    link = driver.find_element(
        By.CSS_SELECTOR,
        f"section[data-recipient='{BOB}'] li[data-step='avvenuta-consegna'] a.receipt-link",
    )
    receipt_url = link.get_attribute("href")
    driver.get(receipt_url)
    verdict = driver.find_element(By.ID, "firma")
    assert verdict.find_elements(By.CSS_SELECTOR, ".verdict-ok"), verdict.text
    daticert = driver.find_element(By.ID, "daticert").text
    assert "avvenuta-consegna" in daticert and BOB in daticert and ALICE in daticert, daticert
    assert SUBJECT in daticert, daticert
    steps.shot("alice-avvenuta-consegna")

    # The evidence bundle, downloaded by the browser: every .eml in it verifies.
    driver.get(transmission)
    sent_url = driver.find_element(By.CSS_SELECTOR, "a[href^='/mail/Sent/']").get_attribute("href")
    driver.find_element(By.CSS_SELECTOR, "a[href$='/evidence.zip']").click()
    deadline = time.monotonic() + 20
    bundle: list[Path] = []
    while time.monotonic() < deadline:
        bundle = [p for p in driver.downloads.glob("*.zip")]
        if bundle and not list(driver.downloads.glob("*.crdownload")):
            break
        time.sleep(0.1)
    assert len(bundle) == 1, list(driver.downloads.iterdir())
    steps.shot("alice-evidence-downloaded")
    with zipfile.ZipFile(bundle[0]) as z:
        names = z.namelist()
        emls = [n for n in names if n.endswith(".eml")]
        kinds = " ".join(emls)
        assert "accettazione" in kinds and "avvenuta-consegna" in kinds, names
        assert "errore-consegna" in kinds, names
        assert any(n.lower().startswith("summary") for n in names), names
        for name in emls:
            raw = z.read(name)
            if b"application/pkcs7-signature" in raw or b"application/x-pkcs7-signature" in raw:
                openssl_verify(raw, ca, tmp_path)
        signed = [n for n in emls if "originale" not in n and "original" not in n]
        assert len(signed) >= 3, emls
    _logout(driver)

    # bob reads the original message, unwrapped from the envelope.
    _login(driver, base, BOB)
    driver.get(f"{base}/mail/INBOX")
    steps.shot("bob-inbox")
    rows = driver.find_elements(By.CSS_SELECTOR, "a.message, li.message a, .messages a")
    target = next((r for r in rows if SUBJECT in r.text), None)
    assert target is not None, driver.page_source[:3000]
    driver.get(target.get_attribute("href"))
    original = driver.find_element(By.ID, "messaggio")
    text = original.text
    assert "Buongiorno Bob," in text and "contratto firmato" in text, text
    assert "contratto.pdf" in text, text
    assert driver.find_elements(By.CSS_SELECTOR, "#firma .verdict-ok")
    steps.shot("bob-reads-the-original")

    # bob tries alice's pages by URL: refused, nothing of hers shown. (A message's URL names a
    # folder and a UID of the logged-in holder's own mailbox: alice's copy in Sent is no message
    # of bob's, who sent nothing.)
    for url in (sent_url, transmission, transmission + "/evidence.zip"):
        driver.get(url)
        page = driver.page_source
        assert SUBJECT not in page, url
        assert "(404)" in driver.find_element(By.TAG_NAME, "h1").text, (url, page[:1500])
    steps.shot("bob-refused-alice-message")

    problems = [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]
    assert problems == []

    # A message with hostile HTML, shown to bob: nothing in it runs and nothing is fetched. Every
    # trick below points at a listener on loopback that counts the connections it gets.
    with Tripwire() as trap:
        # The tripwire itself works: a page the browser is sent to reaches it.
        driver.set_page_load_timeout(3)
        with contextlib.suppress(Exception):  # a 204: the browser stays where it was
            driver.get(f"{trap.url}/control")
        driver.set_page_load_timeout(30)
        deadline = time.monotonic() + 5
        while not trap.hits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trap.hits and trap.hits[0].startswith(b"GET /control"), trap.hits
        trap.hits.clear()
        MaildirStore(srv.cfg.maildir_root).deliver(BOB, "hostile-html", _hostile(trap.url))
        driver.get(f"{base}/mail/INBOX")
        rows = driver.find_elements(By.CSS_SELECTOR, "a.message, li.message a, .messages a")
        target = next((r for r in rows if "Offerta imperdibile" in r.text), None)
        assert target is not None, driver.page_source[:3000]
        driver.get(target.get_attribute("href"))
        frame = driver.find_element(By.CSS_SELECTOR, "iframe.mail-html")
        assert "allow-scripts" not in (frame.get_attribute("sandbox") or "")
        driver.switch_to.frame(frame)
        shown = driver.find_element(By.TAG_NAME, "body").text
        assert "Testo visibile" in shown, shown
        assert not driver.find_elements(By.CSS_SELECTOR, "script, form, iframe, img, object")
        driver.switch_to.default_content()
        time.sleep(1.5)  # give anything that slipped through the time to call out
        steps.shot("bob-hostile-html-inert")
        assert driver.title != "pwned"
        assert trap.hits == [], trap.hits


class Tripwire:
    """A TCP listener on loopback that records the first line of every request made to it:
    anything a hostile message manages to fetch or post lands here."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hits: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Wait, as long as the tripwire is armed, for the connection's first bytes. A request
        is a hit. A connection that says nothing is the browser's own preconnect (Chromium opens
        spare sockets to a host it just visited: the control below); were a page to use it
        later, its request would still be read here."""
        with conn:
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    first = conn.recv(200)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if first:
                    self.hits.append(first.split(b"\r\n", 1)[0])
                    with contextlib.suppress(OSError):
                        conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                return

    def __enter__(self) -> Tripwire:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _hostile(url: str) -> bytes:
    html = f"""<html><head>
<meta http-equiv="refresh" content="0;url={url}/meta">
<base href="{url}/base/">
<link rel="stylesheet" href="{url}/css">
<style>body {{ background: url({url}/style-bg) }}</style>
<script>fetch("{url}/script"); document.title = "pwned"; parent.document.title = "pwned";</script>
</head><body onload="fetch('{url}/onload')">
<p>Testo visibile</p>
<img src="{url}/img" alt="remote">
<img src="x" onerror="fetch('{url}/onerror')">
<img src="//127.0.0.1:{url.rsplit(":", 1)[1]}/protocol-relative">
<div style="background-image: url({url}/inline-style)">sfondo</div>
<svg><image href="{url}/svg-image"/><script>fetch("{url}/svg-script")</script></svg>
<iframe src="{url}/iframe"></iframe>
<object data="{url}/object"></object>
<video poster="{url}/poster" src="{url}/video"></video>
<form id="f" action="{url}/form" method="post"><input name="x" value="1"></form>
<script>document.getElementById("f").submit()</script>
<a href="javascript:fetch('{url}/js-link')">clicca</a>
</body></html>"""
    return (
        "From: Mallory <mallory@evil.example>\r\n"
        f"To: {BOB}\r\n"
        "Subject: Offerta imperdibile\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
        "Message-ID: <hostile@evil.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b"\r\n'
        "\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nTesto visibile\r\n"
        "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        + html.replace("\n", "\r\n")
        + "\r\n--b--\r\n"
    ).encode("utf-8")
