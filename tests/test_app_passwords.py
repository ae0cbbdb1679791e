"""App passwords (pecd.store.security): made, listed, revoked; and a mailbox with a second factor
reached by mail clients over real sockets and TLS: pecd's own IMAPS and SMTP submission, and
Dovecot with the passdb pecd writes (pecd.dovecot), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import imaplib
import json
import os
import poplib
import pwd
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select

from helpers import DOMAIN, PASSWORD, client_tls, fetch_all, install_e2e, message, wait_for
from helpers import AppThread as Server
from pecd.cli import main as pecd_main
from pecd.clock import FixedClock, SystemClock
from pecd.devinit import InitResult
from pecd.dovecot import MailUser
from pecd.pec.classify import classify
from pecd.pec.vocab import Kind, Ricevuta
from pecd.store.accounts import AccountError, Accounts
from pecd.store.db import Database
from pecd.store.models import AppPassword
from pecd.store.security import (
    APP_ALPHABET,
    MAX_APP_PASSWORDS,
    app_password_canonical,
    app_password_digest,
)
from store_fixtures import (  # noqa: F401 (fixtures)
    PG_ENV,
    Backend,
    cheap_hasher,
    db_fixture,
    fresh_postgres_database,
    pg_url_fixture,
    sqlite_template_fixture,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MARIO = "mario.rossi@pec.example.it"
ANNA = "anna.bianchi@pec.example.it"
SHAPE = re.compile(r"^[0-9a-hjkmnp-tv-z]{5}(-[0-9a-hjkmnp-tv-z]{5}){3}$")


async def two_mailboxes(d: Database, clock: FixedClock) -> Accounts:
    acc = Accounts(d, hasher=cheap_hasher(), clock=clock)
    await acc.add_domain("pec.example.it")
    await acc.add_mailbox(MARIO, "mario's long password")
    await acc.add_mailbox(ANNA, "anna's long password")
    return acc


def test_made_shown_once_kept_as_sha256_listed_and_revoked(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        acc = await two_mailboxes(d, clock)
        sec = acc.security
        first, pw1 = await sec.app_password_create(MARIO.upper(), "  Thunderbird, portatile ")
        clock.advance(timedelta(minutes=5))
        second, pw2 = await sec.app_password_create(MARIO, "K-9 Mail")
        anna_id, anna_pw = await sec.app_password_create(ANNA, "Outlook")
        assert SHAPE.match(pw1) and SHAPE.match(pw2) and len({pw1, pw2, anna_pw}) == 3
        # 20 characters of a 32-letter alphabet: 100 bits.
        assert len(set(APP_ALPHABET)) == 32 and len(pw1.replace("-", "")) * 5 >= 100
        async with d.read_session() as s:
            rows = list(await s.scalars(select(AppPassword).order_by(AppPassword.id)))
        # Only the digest of the canonical spelling is kept, never the password.
        assert [r.password_hash for r in rows] == [
            "sha256:" + hashlib.sha256(p.encode()).hexdigest() for p in (pw1, pw2, anna_pw)
        ]
        assert [r.mailbox for r in rows] == [MARIO, MARIO, ANNA]
        listed = await sec.app_password_list(MARIO)
        assert [(i.id, i.name, i.created_at, i.last_used_at, i.revoked_at) for i in listed] == [
            (first, "Thunderbird, portatile", T0, None, None),
            (second, "K-9 Mail", T0 + timedelta(minutes=5), None, None),
        ]
        assert await acc.authenticate(MARIO, pw1) == MARIO
        assert await acc.authenticate(MARIO, pw2) == MARIO
        # Another mailbox's app password opens nothing here, and its id revokes nothing here.
        assert await acc.authenticate(MARIO, anna_pw) is None
        with pytest.raises(
            AccountError, match=rf"^{re.escape(MARIO)} has no app password {anna_id}$"
        ):
            await sec.app_password_revoke(MARIO, anna_id)
        with pytest.raises(AccountError, match="has no app password 999"):
            await sec.app_password_revoke(MARIO, 999)
        assert await acc.authenticate(ANNA, anna_pw) == ANNA
        # Revoked: refused at once, kept in the list; revoking again changes nothing.
        await sec.app_password_revoke(MARIO, first)
        clock.advance(timedelta(minutes=1))
        await sec.app_password_revoke(MARIO, first)
        assert await acc.authenticate(MARIO, pw1) is None
        assert await acc.authenticate(MARIO, pw2) == MARIO
        revoked = (await sec.app_password_list(MARIO))[0]
        assert revoked.revoked_at == T0 + timedelta(minutes=5)
        # A disabled mailbox's app passwords open nothing.
        await acc.disable(ANNA)
        assert await acc.authenticate(ANNA, anna_pw) is None
        for bad in ("", "   ", "x" * 256):
            with pytest.raises(AccountError, match="needs a name of 1 to 255 characters"):
                await sec.app_password_create(MARIO, bad)
        with pytest.raises(AccountError, match="does not exist"):
            await sec.app_password_create(f"x@{DOMAIN}", "name")
        assert await sec.app_password_list(f"x@{DOMAIN}") == []

    db.run(main)


def test_typed_spellings_and_last_use(db: Backend) -> None:
    async def main(d: Database) -> None:
        clock = FixedClock(T0)
        acc = await two_mailboxes(d, clock)
        sec = acc.security
        pid, pw = await sec.app_password_create(MARIO, "phone")
        compact = pw.replace("-", "")
        look_alike = compact.replace("0", "O").replace("1", "l")
        for typed in (
            pw,
            pw.upper(),
            compact,
            " ".join(pw.split("-")),
            f"  {compact[:10]} - {compact[10:]}\t",
            look_alike,
        ):
            assert app_password_canonical(typed) == pw, typed
            assert await acc.authenticate(MARIO, typed) == MARIO, typed
        for wrong in (compact[:-1], compact + "0", compact[:-1] + "u", pw + "-" + "x" * 80):
            assert app_password_canonical(wrong) is None
            assert await acc.authenticate(MARIO, wrong) is None
        assert app_password_digest(pw) == "sha256:" + hashlib.sha256(pw.encode()).hexdigest()

        async def last_used() -> datetime | None:
            return (await sec.app_password_list(MARIO))[0].last_used_at

        # Noted at the first use, then at most once a minute.
        assert await last_used() == T0
        clock.advance(timedelta(seconds=59))
        assert await acc.authenticate(MARIO, pw) == MARIO
        assert await last_used() == T0
        clock.advance(timedelta(seconds=1))
        assert await acc.authenticate(MARIO, pw) == MARIO
        assert await last_used() == T0 + timedelta(seconds=60)
        # A refused login notes nothing.
        await sec.app_password_revoke(MARIO, pid)
        clock.advance(timedelta(minutes=5))
        assert await acc.authenticate(MARIO, pw) is None
        assert await last_used() == T0 + timedelta(seconds=60)

    db.run(main)


def test_a_mailbox_has_a_bounded_number_of_app_passwords(tmp_path: Path) -> None:
    async def main() -> None:
        from pecd.store.db import migrate_async

        url = f"sqlite:///{tmp_path / 'pecd.db'}"
        await migrate_async(url)
        d = await Database.open(url)
        try:
            sec = (await two_mailboxes(d, FixedClock(T0))).security
            ids = [(await sec.app_password_create(MARIO, f"c{i}"))[0] for i in range(50)]
            assert len(ids) == MAX_APP_PASSWORDS
            with pytest.raises(AccountError, match="has 50 app passwords; revoke one first"):
                await sec.app_password_create(MARIO, "one more")
            await sec.app_password_create(ANNA, "another mailbox's")
            await sec.app_password_revoke(MARIO, ids[0])
            await sec.app_password_create(MARIO, "one more")
        finally:
            await d.close()

    asyncio.run(main())


# --- pecd's own IMAPS and SMTP submission, end to end ------------------------------------------


class SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    """imaplib's IMAPS client from a chosen loopback address (127.0.0.0/8 is all loopback):
    servers that slow down an address after a failed login (Dovecot's auth penalty) then
    slow down none of the other checks."""

    def __init__(self, source: str, port: int, ctx: ssl.SSLContext) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, ssl_context=ctx, timeout=15)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def imap_login(port: int, ctx: ssl.SSLContext, user: str, password: str, source: str) -> str:
    """``OK``, or the server's refusal text."""
    client = SourceIMAP4_SSL(source, port, ctx)
    try:
        client.login(user, password)
        return "OK"
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        with contextlib.suppress(Exception):
            client.logout()


def imap_messages(port: int, ctx: ssl.SSLContext, user: str, password: str) -> list[bytes]:
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx) as imap:
        imap.login(user, password)
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        return [bytes(item[1]) for item in data if isinstance(item, tuple)]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert pecd_main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_mail_clients_of_a_mailbox_with_totp_need_an_app_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """alice enrols TOTP: her password no longer logs in over IMAPS or SMTP submission (bob's
    still does, so the refusal is hers); the app password the operator makes with the CLI
    logs in over both and sends a PEC that is accepted and delivered."""
    cfg = asyncio.run(install_e2e(tmp_path / "inst", None))
    conf = str(cfg.source)
    alice, bob, carol = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))

    async def enrol() -> None:
        d = await Database.open(cfg.database_url)
        try:
            sec = Accounts(d).security
            secret = await sec.totp_begin(alice)
            assert await sec.totp_confirm(alice, pyotp.TOTP(secret).now())
        finally:
            await d.close()

    asyncio.run(enrol())
    out = cli(capsys, "mailbox", "app-password", "create", alice, "Thunderbird", "-c", conf)
    app = out.strip().splitlines()[-1]
    assert SHAPE.match(app), out
    check_2fa_cli(capsys, conf, alice, carol)
    srv = Server(cfg).start()
    try:
        ctx = client_tls(cfg)
        imaps, submission = srv.port("imaps"), srv.port("submission")
        assert imap_login(imaps, ctx, bob, PASSWORD, "127.0.0.1") == "OK"
        assert "AUTHENTICATIONFAILED" in imap_login(imaps, ctx, alice, PASSWORD, "127.0.0.1")
        with smtplib.SMTP("127.0.0.1", submission, timeout=15) as smtp:
            smtp.starttls(context=ctx)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login(alice, PASSWORD)
        assert imap_login(imaps, ctx, alice, app, "127.0.0.1") == "OK"
        with smtplib.SMTP("127.0.0.1", submission, timeout=15) as smtp:
            smtp.starttls(context=ctx)
            smtp.login(alice, app.upper().replace("-", " "))  # as a holder may type it
            refused = smtp.sendmail(alice, [bob], message(alice, [bob], [], "Con password app"))
        assert refused == {}
        inbox = wait_for(lambda: imap_messages(imaps, ctx, alice, app), 20, "the accettazione")
        accettazione = classify(inbox[0])
        assert accettazione.ricevuta is Ricevuta.ACCETTAZIONE and accettazione.is_valid_pec
        assert accettazione.daticert is not None and accettazione.daticert.mittente == alice
        delivered = wait_for(lambda: fetch_all(srv, "bob"), 20, "the busta di trasporto")
        assert classify(delivered[0]).kind is Kind.TRANSPORT_ENVELOPE
    finally:
        srv.stop()
    listed = json.loads(cli(capsys, "mailbox", "app-password", "list", alice, "--json", "-c", conf))
    assert [(p["name"], p["revoked_at"]) for p in listed] == [("Thunderbird", None)]
    assert listed[0]["last_used_at"] is not None
    out = cli(capsys, "mailbox", "app-password", "revoke", alice, str(listed[0]["id"]), "-c", conf)
    assert out == f"pecd: app password {listed[0]['id']} of {alice} revoked\n"
    listed = json.loads(cli(capsys, "mailbox", "app-password", "list", alice, "--json", "-c", conf))
    assert listed[0]["revoked_at"] is not None


def check_2fa_cli(capsys: pytest.CaptureFixture[str], conf: str, enrolled: str, other: str) -> None:
    """``pecd mailbox 2fa``: the "2FA mandatory" switch without touching the config."""

    def status(address: str) -> dict[str, str]:
        rows = json.loads(cli(capsys, "mailbox", "2fa", "status", address, "--json", "-c", conf))
        assert len(rows) == 1
        return dict(rows[0])

    assert status(enrolled) == {
        "address": enrolled,
        "totp": "yes",
        "pending": "no",
        "required": "no",
    }
    assert status(other) == {"address": other, "totp": "no", "pending": "no", "required": "no"}
    assert "must use a second factor" in cli(capsys, "mailbox", "2fa", "require", other, "-c", conf)
    assert status(other)["required"] == "yes"
    cli(capsys, "mailbox", "2fa", "disable", other, "-c", conf)
    assert status(other)["required"] == "yes"
    cli(capsys, "mailbox", "2fa", "optional", other, "-c", conf)
    assert status(other)["required"] == "no"
    assert pecd_main(["mailbox", "2fa", "require", f"x@{DOMAIN}", "-c", conf]) == 1
    assert f"mailbox x@{DOMAIN} does not exist" in capsys.readouterr().err
    assert pecd_main(["mailbox", "app-password", "revoke", other, "1", "-c", conf]) == 1
    assert f"{other} has no app password 1" in capsys.readouterr().err


# --- Dovecot with the passdb pecd writes -------------------------------------------------------

DOVECOT_DOMAIN = "pec.dovecot.test"
_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set"),
    ),
]


@dataclass
class DovecotRun:
    imaps: int
    pop3s: int
    ctx: ssl.SSLContext
    passwords: dict[str, str]
    log: Path
    db_url: str
    handover: Callable[[], None]  # give what pecd wrote to the mail user Dovecot reads it as


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _second_factors(url: str, passwords: dict[str, str], new_db: bool) -> dict[str, str]:
    """Mailboxes alice: TOTP enabled, an app password and a revoked one; bob: no second factor,
    an app password; carol: 2FA required (no TOTP yet), an app password. Their mailbox
    passwords go into ``passwords``; the app passwords are returned by name."""
    d = await Database.open(url)
    try:
        acc = Accounts(d, hasher=cheap_hasher())
        if new_db:
            await acc.add_domain(DOVECOT_DOMAIN)
        for user in ("alice", "bob", "carol"):
            address = f"{user}@{DOVECOT_DOMAIN}"
            passwords[address] = f"{user}'s long password"
            await acc.add_mailbox(address, passwords[address])
        sec = acc.security
        alice, bob, carol = (f"{u}@{DOVECOT_DOMAIN}" for u in ("alice", "bob", "carol"))
        secret = await sec.totp_begin(alice)
        assert await sec.totp_confirm(alice, pyotp.TOTP(secret).now())
        _, app_alice = await sec.app_password_create(alice, "Thunderbird")
        gone, revoked = await sec.app_password_create(alice, "old phone")
        await sec.app_password_revoke(alice, gone)
        _, app_bob = await sec.app_password_create(bob, "K-9")
        _, app_carol = await sec.app_password_create(carol, "Outlook")
        await sec.set_totp_required(carol, True)
        return {"alice": app_alice, "revoked": revoked, "bob": app_bob, "carol": app_carol}
    finally:
        await d.close()


@dataclass
class DovecotBase:
    """One installation for the Dovecot runs of both backends (its PKI and config)."""

    base: Path
    result: InitResult
    user: MailUser


@pytest.fixture(scope="module")
def dovecot_base() -> Iterator[DovecotBase]:
    from pecd.devinit import init_installation

    if shutil.which("dovecot") is None:
        pytest.skip("Dovecot is not installed")
    if os.geteuid() != 0:
        pytest.skip("starting Dovecot needs root")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    # Under /tmp, readable by nobody (pytest's tmp_path is not), as in test_dovecot.py.
    base = Path(tempfile.mkdtemp(prefix="pecd-apppw-", dir="/tmp"))
    try:
        base.chmod(0o755)
        result = asyncio.run(
            init_installation(
                base / "inst", domain=DOVECOT_DOMAIN, name="T", clock=SystemClock(), demo=False
            )
        )
        yield DovecotBase(base, result, MailUser(pw.pw_name, pw.pw_uid, pw.pw_gid))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=_BACKENDS)
def dovecot(
    request: pytest.FixtureRequest, dovecot_base: DovecotBase
) -> Iterator[tuple[DovecotRun, dict[str, str]]]:
    """A real Dovecot 2.3 over pecd's database, whose mailboxes have second factors."""
    from pecd.config import Endpoint, ListenersConfig, load_config
    from pecd.dovecot import write_config
    from pecd.store.db import migrate

    backend: str = request.param
    cfg = load_config(dovecot_base.result.config)
    passwords = dict(dovecot_base.result.mailboxes)
    drop: Callable[[], None] | None = None
    if backend == "postgresql":
        url, drop = fresh_postgres_database()
        migrate(url)
        cfg = cfg.model_copy(
            update={"storage": cfg.storage.model_copy(update={"database_url": url})}
        )
        passwords = {}
    try:
        apps = asyncio.run(_second_factors(cfg.database_url, passwords, backend == "postgresql"))
        imaps, pop3s = _free_port(), _free_port()
        cfg = cfg.model_copy(
            update={
                "listeners": ListenersConfig(
                    imaps=Endpoint(host="127.0.0.1", port=imaps),
                    pop3s=Endpoint(host="127.0.0.1", port=pop3s),
                )
            }
        )
        user = dovecot_base.user
        files = write_config(cfg, dovecot_base.base / f"dovecot-{backend}", mail_user=user)
        cfg.maildir_root.mkdir(parents=True, exist_ok=True)
        data_dir = cfg.storage.data_dir

        def handover() -> None:
            """Everything pecd wrote (the SQLite database too) to the mail user, as if pecd
            ran as that user (the production setup)."""
            for path in [data_dir, *data_dir.rglob("*")]:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(path, user.uid, user.gid)

        handover()
        proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(files.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 10
            for port in (imaps, pop3s):
                while True:
                    assert proc.poll() is None, files.log.read_text()
                    try:
                        socket.create_connection(("127.0.0.1", port), 0.2).close()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, "Dovecot is not listening"
                        time.sleep(0.02)
            ctx = ssl.create_default_context(cafile=str(cfg.tls.ca or cfg.tls.cert))
            ctx.check_hostname = False
            run = DovecotRun(imaps, pop3s, ctx, passwords, files.log, cfg.database_url, handover)
            yield run, apps
        finally:
            # SIGTERM to the master in the foreground: what `doveadm stop` sends, without its
            # seconds of polling.
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        if drop is not None:
            drop()


@pytest.mark.slow
def test_dovecot_takes_app_passwords_and_refuses_the_password_of_a_2fa_mailbox(
    dovecot: tuple[DovecotRun, dict[str, str]],
) -> None:
    run, apps = dovecot
    alice, bob, carol = (f"{u}@{DOVECOT_DOMAIN}" for u in ("alice", "bob", "carol"))
    # Each check from a loopback address of its own: Dovecot slows an address down after a
    # failed login (its auth penalty); the refusals run at once (auth_failure_delay, 2 s).
    checks = {
        (alice, apps["alice"]): "OK",
        (bob, run.passwords[bob]): "OK",
        (bob, apps["bob"]): "OK",
        (carol, apps["carol"]): "OK",
        (alice, run.passwords[alice]): "refused",  # TOTP enabled
        (carol, run.passwords[carol]): "refused",  # 2FA required
        (alice, apps["revoked"]): "refused",
        (alice, apps["bob"]): "refused",  # another mailbox's
        (bob, apps["alice"]): "refused",
    }
    with ThreadPoolExecutor(len(checks)) as pool:
        futures = {
            key: pool.submit(imap_login, run.imaps, run.ctx, *key, f"127.0.0.{10 + i}")
            for i, key in enumerate(checks)
        }
        seen = {key: f.result() for key, f in futures.items()}
    for key, expected in checks.items():
        if expected == "OK":
            assert seen[key] == "OK", (key, seen[key])
        else:
            # A refusal, not Dovecot failing to ask the database ([UNAVAILABLE]).
            assert "AUTHENTICATIONFAILED" in seen[key], (key, seen[key], run.log.read_text())

    # A change in pecd's database counts at the next login (Dovecot keeps no auth cache): bob,
    # who has just logged in with his password, must now use a second factor, and alice's app
    # password, just used, is revoked.
    async def change() -> None:
        d = await Database.open(run.db_url)
        try:
            sec = Accounts(d, hasher=cheap_hasher()).security
            await sec.set_totp_required(bob, True)
            listed = await sec.app_password_list(alice)
            await sec.app_password_revoke(
                alice, next(p.id for p in listed if p.name == "Thunderbird")
            )
        finally:
            await d.close()

    asyncio.run(change())
    run.handover()
    after = {
        (bob, run.passwords[bob]): "refused",
        (alice, apps["alice"]): "refused",
        (bob, apps["bob"]): "OK",
    }
    with ThreadPoolExecutor(len(after)) as pool:
        futures = {
            key: pool.submit(imap_login, run.imaps, run.ctx, *key, f"127.0.0.{40 + i}")
            for i, key in enumerate(after)
        }
        seen = {key: f.result() for key, f in futures.items()}
    for key, expected in after.items():
        assert (seen[key] == "OK") if expected == "OK" else ("AUTHENTICATIONFAILED" in seen[key]), (
            key,
            seen[key],
        )
    # POP3S goes through the same passdb.
    pop = poplib.POP3_SSL("127.0.0.1", run.pop3s, context=run.ctx, timeout=15)
    try:
        pop.user(carol)
        assert pop.pass_(apps["carol"]).startswith(b"+OK")
    finally:
        pop.quit()
