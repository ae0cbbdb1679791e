"""ImapService on loopback with real TLS, driven by the stdlib imaplib, over MaildirStore deliveries."""

from __future__ import annotations

import imaplib
import re
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from helpers import IMAP_TIMEOUT as TIMEOUT
from helpers import PLAIN_CRLF, FakeAccounts, Pki
from helpers import ImapServer as Server
from helpers import imap_server_fixture as imap_server_fixture  # the fixture `server`
from helpers import pki_fixture as pki_fixture  # the fixture `pki`
from pecd.mailbox.maildir import MaildirStore, to_crlf


@pytest.fixture
def user(server: Server) -> tuple[str, str]:
    return server.new_user()


# -- messages ---------------------------------------------------------------------------------

UTF8_LF = (
    "From: Mario Rossi <mario@example.org>\n"
    "To: holder@example.org\n"
    "Subject: =?utf-8?q?Citt=C3=A0?= in 8 bit\n"
    "Message-ID: <m1@example.org>\n"
    "Date: Thu, 15 Jan 2026 10:00:00 +0100\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Perché la città è bella.\n"
    "Più righe, àèìòù.\n"
).encode()


def attachment_message() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Ufficio <ufficio@example.org>"
    msg["To"] = "holder@example.org"
    msg["Subject"] = "Fattura con allegato"
    msg["Message-ID"] = "<m2@example.org>"
    msg.set_content("In allegato la fattura.\n")
    msg.add_attachment(
        b"%PDF-1.4\n" + bytes(range(256)) * 4,
        maintype="application",
        subtype="pdf",
        filename="fattura.pdf",
    )
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def fetch_one(client: imaplib.IMAP4, uid: bytes, what: str) -> bytes:
    typ, data = client.uid("FETCH", uid, what)
    assert typ == "OK", data
    item = data[0]
    assert isinstance(item, tuple), data
    return item[1]


def uids(client: imaplib.IMAP4, *criteria: str) -> list[bytes]:
    typ, data = client.uid("SEARCH", *criteria)
    assert typ == "OK", data
    return data[0].split()


# -- logins -----------------------------------------------------------------------------------


def test_login_good_bad_and_unknown(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    client = server.imaps()
    try:
        caps = client.capabilities
        assert "AUTH=PLAIN" in caps
        assert "STARTTLS" not in caps
        assert "LOGINDISABLED" not in caps
        with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED|nvalid"):
            client.login(address, "wrong password")
        with pytest.raises(imaplib.IMAP4.error):
            client.login("nobody@example.org", password)
        typ, _ = client.login(address.upper(), password)
        assert typ == "OK"
    finally:
        client.logout()


def test_account_store_failure_is_a_temporary_no(server: Server, user: tuple[str, str]) -> None:
    address, _ = user
    client = server.imaps()
    try:
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            client.login(address, "db-down")
        typ, _ = client.noop()  # the connection survives
        assert typ == "OK"
    finally:
        client.logout()


def test_authenticate_plain(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    client = server.imaps()
    try:
        typ, _ = client.authenticate("PLAIN", lambda _: f"\0{address}\0{password}".encode())
        assert typ == "OK"
        typ, _ = client.select("INBOX")
        assert typ == "OK"
    finally:
        client.logout()


def test_starttls_listener_refuses_login_before_tls(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    client = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=TIMEOUT)
    try:
        assert "STARTTLS" in client.capabilities
        assert "LOGINDISABLED" in client.capabilities
        assert not any(cap.startswith("AUTH=") for cap in client.capabilities)
        # imaplib itself refuses LOGIN when LOGINDISABLED is advertised; send it raw to be sure
        # the server says no as well.
        typ, data = client._simple_command("LOGIN", address, password)  # type: ignore[attr-defined]
        assert typ != "OK", data
        client.starttls(ssl_context=server.pki.client_context())
        assert "LOGINDISABLED" not in client.capabilities
        assert "STARTTLS" not in client.capabilities
        typ, _ = client.login(address, password)
        assert typ == "OK"
    finally:
        client.logout()


# -- reading delivered mail -------------------------------------------------------------------


def test_delivered_messages_are_served_exactly(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    messages = [UTF8_LF, attachment_message(), PLAIN_CRLF]
    for i, data in enumerate(messages):
        assert server.store.deliver(address, f"key-{i}", data).created
    expected = [to_crlf(m) for m in messages]
    assert expected[1] == messages[1] and expected[2] == messages[2]  # CRLF input kept as is

    with server.logged_in(address, password) as c:
        typ, data = c.select("INBOX")
        assert (typ, data) == ("OK", [b"3"])
        all_uids = uids(c, "ALL")
        assert len(all_uids) == 3

        # BODY.PEEK[] is byte for byte what was delivered (LF input stored as CRLF).
        for uid, body in zip(all_uids, expected, strict=True):
            assert fetch_one(c, uid, "(BODY.PEEK[])") == body
            typ, data = c.uid("FETCH", uid, "(RFC822.SIZE)")
            assert f"RFC822.SIZE {len(body)}".encode() in data[0]

        # BODYSTRUCTURE of the multipart message names the attachment.
        typ, data = c.uid("FETCH", all_uids[1], "(BODYSTRUCTURE)")
        structure = data[0].lower() if isinstance(data[0], bytes) else b"".join(data[0]).lower()
        assert b'"mixed"' in structure
        assert b'"application" "pdf"' in structure
        assert b"fattura.pdf" in structure

        # FLAGS: nothing set yet; SEARCH by subject and by \Seen.
        typ, data = c.uid("FETCH", all_uids[0], "(FLAGS)")
        assert b"\\Seen" not in data[0]
        assert uids(c, "SUBJECT", '"Riunione"') == [all_uids[2]]
        assert uids(c, "UNSEEN") == all_uids
        typ, data = c.search(None, "SUBJECT", '"Fattura"')
        assert data == [b"2"]

        # STORE +FLAGS \Seen is kept in the file name, Dovecot style.
        typ, data = c.uid("STORE", all_uids[0], "+FLAGS", "(\\Seen)")
        assert typ == "OK" and b"\\Seen" in data[0]
        assert uids(c, "UNSEEN") == all_uids[1:]
        assert uids(c, "SEEN") == all_uids[:1]
        assert any(p.name.endswith(":2,S") for p in server.store.list_folder(address))

        # FETCH BODY[] (no PEEK) sets \Seen.
        assert fetch_one(c, all_uids[1], "(BODY[])") == expected[1]
        assert uids(c, "UNSEEN") == [all_uids[2]]

        # MOVE to Trash: gone from INBOX, same bytes in Trash.
        typ, data = c.uid("MOVE", all_uids[2], "Trash")
        assert typ == "OK", data
        assert uids(c, "ALL") == all_uids[:2]
        assert len(server.store.list_folder(address, "Trash")) == 1

        # \Deleted + EXPUNGE removes the file.
        c.uid("STORE", all_uids[0], "+FLAGS", "(\\Deleted)")
        typ, data = c.expunge()
        assert typ == "OK" and data[-1] == b"1"  # earlier items: the MOVE's EXPUNGE
        assert uids(c, "ALL") == [all_uids[1]]
        assert len(server.store.list_folder(address)) == 1

        typ, data = c.select("Trash")
        assert (typ, data) == ("OK", [b"1"])
        (trash_uid,) = uids(c, "ALL")
        assert fetch_one(c, trash_uid, "(BODY.PEEK[])") == expected[2]
        assert fetch_one(c, trash_uid, "(BODY.PEEK[HEADER.FIELDS (X-FOLDED)])") == (
            b"X-Folded: a header value that is\r\n\tfolded on purpose\r\n\r\n"
        )


def test_append_to_sent_and_copy_keep_bytes(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    sent = attachment_message()
    with server.logged_in(address, password) as c:
        typ, data = c.list()
        assert typ == "OK"
        names = {line.decode().rsplit(" ", 1)[-1].strip('"') for line in data if line}
        assert {"INBOX", "Sent", "Drafts", "Trash"} <= names

        typ, data = c.append("Sent", "(\\Seen)", imaplib.Time2Internaldate(time.time()), sent)
        assert typ == "OK", data
        assert b"APPENDUID" in data[0]
        typ, data = c.select("Sent")
        assert (typ, data) == ("OK", [b"1"])
        (uid,) = uids(c, "ALL")
        assert fetch_one(c, uid, "(BODY.PEEK[])") == sent
        typ, data = c.uid("FETCH", uid, "(FLAGS)")
        assert b"\\Seen" in data[0]

        # COPY keeps the bytes too (pymap's own maildir COPY would write an empty message).
        typ, data = c.uid("COPY", uid, "Drafts")
        assert typ == "OK", data
        typ, data = c.select("Drafts")
        assert (typ, data) == ("OK", [b"1"])
        (copy_uid,) = uids(c, "ALL")
        assert fetch_one(c, copy_uid, "(BODY.PEEK[])") == sent
    (stored,) = server.store.list_folder(address, "Sent")
    assert stored.read_bytes() == sent


def test_new_delivery_appears_on_noop(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.store.deliver(address, "first", PLAIN_CRLF)
    with server.logged_in(address, password) as c:
        assert c.select("INBOX") == ("OK", [b"1"])
        server.store.deliver(address, "second", UTF8_LF)
        typ, _ = c.noop()
        assert typ == "OK"
        assert c.response("EXISTS")[1][-1] == b"2"
        assert len(uids(c, "ALL")) == 2


def test_idle_reports_new_delivery(server: Server, user: tuple[str, str]) -> None:
    address, password = user
    server.store.deliver(address, "before-idle", PLAIN_CRLF)
    with server.logged_in(address, password) as c:
        assert c.select("INBOX") == ("OK", [b"1"])
        c.send(b"I1 IDLE\r\n")
        assert c.readline().startswith(b"+")
        started = time.monotonic()
        server.store.deliver(address, "during-idle", UTF8_LF)
        line = c.readline()
        while not re.match(rb"\* \d+ EXISTS", line):
            assert line, "connection closed while idling"
            line = c.readline()
        assert line.strip() == b"* 2 EXISTS"
        assert time.monotonic() - started < 5
        c.send(b"DONE\r\n")
        line = c.readline()
        while not line.startswith(b"I1 "):
            line = c.readline()
        assert line.startswith(b"I1 OK")
        assert len(uids(c, "ALL")) == 2


# -- isolation --------------------------------------------------------------------------------


def test_users_never_see_each_other(server: Server) -> None:
    alice, alice_pw = server.new_user()
    bob, bob_pw = server.new_user()
    server.store.deliver(alice, "private", b"Subject: for alice only\r\n\r\nsecret\r\n")
    with server.logged_in(bob, bob_pw) as c:
        assert c.select("INBOX") == ("OK", [b"0"])
        typ, data = c.list()
        assert not any(alice.split("@")[0].encode() in line for line in data if line)
        # Folder names that would map outside bob's directory are refused.
        for name in (".", "..", "../" + alice.split("@")[0], "a.b"):
            typ, _ = c.create(f'"{name}"')
            assert typ == "NO", name
            typ, _ = c.select(f'"{name}"')
            assert typ == "NO", name
        # Logging in as bob but asking for alice's mailbox (SASL authzid) is refused.
        d = server.imaps()
        try:
            with pytest.raises(imaplib.IMAP4.error):
                d.authenticate("PLAIN", lambda _: f"{alice}\0{bob}\0{bob_pw}".encode())
        finally:
            d.logout()
    with server.logged_in(alice, alice_pw) as c:
        assert c.select("INBOX") == ("OK", [b"1"])
    assert not (server.store.path_for(bob).parent / "cur").exists()


# -- lifecycle --------------------------------------------------------------------------------


def test_stop_closes_idling_clients(tmp_path: Path, pki: Pki) -> None:
    srv = Server(MaildirStore(tmp_path / "mail"), FakeAccounts(), pki).__enter__()
    stopped = False
    try:
        address, password = srv.new_user()
        client = srv.imaps()
        client.login(address, password)
        client.select("INBOX")
        client.send(b"I1 IDLE\r\n")
        assert client.readline().startswith(b"+")
        started = time.monotonic()
        srv.__exit__(None, None, None)
        stopped = True
        assert time.monotonic() - started < 5
        rest = b"".join(iter(client.readline, b""))
        assert rest == b"" or rest.startswith(b"* BYE")
        with pytest.raises(OSError):
            srv.imaps()
    finally:
        if not stopped:
            srv.__exit__(None, None, None)


def test_a_message_moved_by_another_session_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file another session moves from new/ to cur/ between the lookup and the read is looked
    up again, not served as expunged."""
    import mailbox as stdlib_mailbox
    import os

    from pecd.imap.backend import ExactMaildir

    md = ExactMaildir(str(tmp_path / "md"), create=True)
    key = md.add(b"Subject: moved\r\n\r\nbody\r\n")
    md._refresh()
    new_path = tmp_path / "md" / md._toc[key]
    os.rename(new_path, tmp_path / "md" / "cur" / (new_path.name + ":2,S"))
    # The lookup still trusts its table of contents (as when the move lands just after it).
    real_exists = os.path.exists
    monkeypatch.setattr(
        stdlib_mailbox.os.path,
        "exists",
        lambda p: True if str(p) == str(new_path) else real_exists(p),
    )
    assert bytes(md.get_message(key)) == b"Subject: moved\r\n\r\nbody\r\n"
