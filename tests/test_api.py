"""The REST API (pecd.web.api) against a real installation and a running pipeline.

One installation for the module, with its App in a thread (the pipeline) and its web process
(HTTPS, real TLS): most tests build the API app in-process and drive it with httpx over ASGI (its
submissions wake the App's workers through ``pecd.web.submit.set_waker``, as the web process's do
through its control channel); the done-when test talks to the real web process over TLS. Each
test sends from and to mailboxes of its own, so that they can share the installation.

The queue's poll is long (POLL seconds): a submission taken in promptly shows that what the web
side commits wakes the pipeline at once."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from helpers import DOMAIN, PASSWORD, client_tls, fetch_all, install_e2e, openssl_verify, wait_for
from helpers import AppThread as Server
from pecd.cli import main as cli_main
from pecd.config import Config, load_config
from pecd.pec.classify import classify
from pecd.pec.vocab import Ricevuta
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.tokens import Tokens
from pecd.web import submit as web_submit
from pecd.web.api import api_routes

ALICE, BOB, CAROL, GHOST = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "ghost"))
ERIN, FRANK, GINA, HANK, IVAN, JUDY = (
    f"{u}@{DOMAIN}" for u in ("erin", "frank", "gina", "hank", "ivan", "judy")
)
PROBLEM = "application/problem+json"
POLL = 5.0
TIMEOUT = 10


async def _install(directory: Path) -> Config:
    await install_e2e(directory, None, queue=f"poll_seconds = {POLL}\n")
    path = directory / "pecd.toml"
    text = path.read_text("utf-8")
    text = text.replace('imaps = "127.0.0.1:0"\n', 'imaps = "127.0.0.1:0"\nhttps = "127.0.0.1:0"\n')
    path.write_text(text, "utf-8")
    cfg = load_config(path)
    db = await Database.open(cfg.database_url)
    try:
        for user in ("erin", "frank", "gina", "hank", "ivan", "judy"):
            await Accounts(db).add_mailbox(f"{user}@{DOMAIN}", PASSWORD)
    finally:
        await db.close()
    return cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = asyncio.run(_install(tmp_path_factory.mktemp("api") / "inst"))
    srv = Server(cfg).start()
    assert srv.app is not None and srv.app.runner is not None
    runner = srv.app.runner
    # In-process API apps wake the App's workers as the web process does, across threads.
    web_submit.set_waker(lambda: srv.loop.call_soon_threadsafe(runner.wake.set))
    try:
        yield srv
    finally:
        web_submit.set_waker(None)
        srv.stop()


Scenario = Callable[[httpx.AsyncClient, Tokens], Awaitable[None]]


def run_api(cfg: Config, scenario: Scenario) -> None:
    """``scenario(client, tokens)`` against the API app over ``cfg``'s database."""

    async def go() -> None:
        db = await Database.open(cfg.database_url)
        try:
            app = Starlette(routes=api_routes(cfg))
            app.state.db = db  # what the HTTPS app's lifespan does
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                await scenario(client, Tokens(db))
        finally:
            await db.close()

    asyncio.run(go())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    doc: dict[str, Any] = r.json()
    assert doc["status"] == status and doc["title"] and doc["type"] and doc["detail"]
    return doc


async def poll(
    client: httpx.AsyncClient, url: str, token: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        r = await client.get(url, headers=bearer(token))
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        if done(doc):
            return doc
        assert time.monotonic() < deadline, f"status not reached: {doc}"
        await asyncio.sleep(0.05)


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {r["address"]: r["status"] for r in doc["recipients"]}


def token_for(srv: Server, mailbox: str) -> str:
    async def make() -> str:
        db = await Database.open(srv.cfg.database_url)
        try:
            return (await Tokens(db).create(mailbox, "test"))[1]
        finally:
            await db.close()

    return str(asyncio.run(make()))


def test_send_and_follow_each_recipient(server: Server) -> None:
    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        _, token = await tokens.create(ALICE, "gestionale")
        r = await client.post(
            "/api/v1/messages",
            headers=bearer(token),
            json={
                "to": [BOB, GHOST],
                "subject": "Fattura 42",
                "body": "In allegato la fattura.",
                "attachments": [
                    {
                        "filename": "fattura.pdf",
                        "content_type": "application/pdf",
                        "content_base64": base64.b64encode(b"%PDF-1.4 fattura").decode(),
                    }
                ],
                "receipt": "breve",
            },
        )
        assert r.status_code == 202, r.text
        sent = r.json()
        assert sent["id"].startswith("api-") and sent["status_url"].endswith(sent["id"])
        doc = await poll(
            client,
            sent["status_url"],
            token,
            lambda d: (
                statuses(d).get(BOB) == "avvenuta-consegna"
                and statuses(d).get(GHOST) == "errore-consegna"
            ),
        )
        assert doc["status"] == "accepted" and doc["pec_msgid"] and doc["accepted_at"]
        assert doc["subject"] == "Fattura 42" and doc["client_msgid"] == sent["message_id"]
        assert all(r["at"] for r in doc["recipients"])
        assert {e["event"] for e in doc["events"]} >= {
            "accettazione",
            "avvenuta-consegna",
            "errore-consegna",
        }

        # Bob's token cannot read alice's transmission; nor can a made-up id be read.
        _, bobs = await tokens.create(BOB, "other")
        assert_problem(await client.get(sent["status_url"], headers=bearer(bobs)), 404)
        assert_problem(await client.get("/api/v1/messages/api-nope", headers=bearer(token)), 404)

    run_api(server.cfg, scenario)
    # What bob got is the original inside an envelope, with the attachment; breve was asked.
    bob_inbox = wait_for(lambda: fetch_all(server, "bob"))
    assert len(bob_inbox) == 1
    assert b"fattura.pdf" in bob_inbox[0] and b"X-TipoRicevuta: breve" in bob_inbox[0]


def test_same_client_key_is_one_transmission(server: Server) -> None:
    ids: list[str] = []

    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        _, token = await tokens.create(ERIN, "idempotent")
        body = {"to": [CAROL], "subject": "Una volta", "body": "x", "client_key": "ordine-7"}
        first = await client.post("/api/v1/messages", headers=bearer(token), json=body)
        again = await client.post("/api/v1/messages", headers=bearer(token), json=body)
        assert first.status_code == 202 and again.status_code == 200, (first.text, again.text)
        assert first.json()["id"] == again.json()["id"]
        assert again.json()["message_id"] is None
        ids.append(first.json()["id"])
        await poll(
            client,
            first.json()["status_url"],
            token,
            lambda d: statuses(d).get(CAROL) == "avvenuta-consegna",
        )
        # Frank with the same client key has a transmission of his own.
        _, franks = await tokens.create(FRANK, "frank")
        other = await client.post("/api/v1/messages", headers=bearer(franks), json=body)
        assert other.status_code == 202 and other.json()["id"] != ids[0]

    run_api(server.cfg, scenario)
    time.sleep(0.5)  # a second transmission, were there one, would be as quick as the first
    inbox = [classify(m) for m in fetch_all(server, "erin")]
    kinds = sorted(c.ricevuta.value for c in inbox if c.ricevuta)
    assert kinds == ["accettazione", "avvenuta-consegna"]
    # Carol has erin's one envelope and frank's.
    assert len(wait_for(lambda: (m := fetch_all(server, "carol")) and len(m) >= 2 and m)) == 2


def test_tokens_and_refusals(server: Server) -> None:
    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        body = {"to": [BOB], "subject": "s", "body": "b"}
        assert_problem(await client.post("/api/v1/messages", json=body), 401)
        assert_problem(
            await client.post("/api/v1/messages", json=body, headers=bearer("pecd_nope")), 401
        )
        assert_problem(
            await client.get("/api/v1/messages/x", headers={"Authorization": "Basic x"}), 401
        )
        token_id, token = await tokens.create(GINA, "revoked")
        assert token.startswith("pecd_")
        ok = await client.post(
            "/api/v1/messages", json={**body, "to": ["not an address"]}, headers=bearer(token)
        )
        assert "address" in assert_problem(ok, 422)["detail"]
        await tokens.revoke(token_id)
        assert_problem(await client.post("/api/v1/messages", json=body, headers=bearer(token)), 401)
        # The token of a disabled mailbox (dan) is refused.
        _, dans = await tokens.create(f"dan@{DOMAIN}", "disabled")
        assert_problem(await client.post("/api/v1/messages", json=body, headers=bearer(dans)), 401)

        _, token = await tokens.create(GINA, "checks")
        h = bearer(token)
        bcc = assert_problem(
            await client.post("/api/v1/messages", json={**body, "bcc": [CAROL]}, headers=h), 422
        )
        assert "bcc" in bcc["detail"]
        assert_problem(
            await client.post("/api/v1/messages", json={**body, "receipt": "lunga"}, headers=h),
            422,
        )
        assert_problem(
            await client.post("/api/v1/messages", json={**body, "to": []}, headers=h), 422
        )
        assert_problem(
            await client.post(
                "/api/v1/messages",
                content=b"{not json",
                headers={**h, "content-type": "application/json"},
            ),
            422,
        )
        bad64 = {"filename": "a", "content_type": "text/plain", "content_base64": "!!"}
        assert_problem(
            await client.post("/api/v1/messages", json={**body, "attachments": [bad64]}, headers=h),
            422,
        )
        assert_problem(
            await client.post(
                "/api/v1/messages", content=b"to=x", headers={**h, "content-type": "text/plain"}
            ),
            415,
        )
        # A form with a bcc, or a file outside attachments, is refused like the JSON.
        assert_problem(
            await client.post(
                "/api/v1/messages",
                data={"to": BOB, "bcc": CAROL},
                files={"attachments": ("a.txt", b"x", "text/plain")},
                headers=h,
            ),
            422,
        )
        assert_problem(
            await client.post(
                "/api/v1/messages",
                data={"to": BOB},
                files={"other": ("a.txt", b"x", "text/plain")},
                headers=h,
            ),
            422,
        )
        # Unknown paths and methods under /api/v1 are problems too.
        assert_problem(await client.get("/api/v1/nothing", headers=h), 404)
        gone = assert_problem(await client.delete("/api/v1/messages", headers=h), 405)
        assert "POST" in gone["detail"]
        # A lookup names exactly one thing.
        assert_problem(await client.get("/api/v1/transmissions", headers=h), 400)
        assert_problem(await client.get("/api/v1/transmissions?id=a&pec_msgid=b", headers=h), 400)
        listed = await tokens.list(GINA)
        assert [t.name for t in listed] == ["revoked", "checks"]
        assert listed[0].revoked_at is not None and listed[1].last_used_at is not None

    run_api(server.cfg, scenario)


def test_oversize(server: Server) -> None:
    limits = server.cfg.limits.model_copy(update={"max_message_size": 100_000})
    cfg = server.cfg.model_copy(update={"limits": limits})

    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        _, token = await tokens.create(HANK, "big")
        h = bearer(token)
        # The message once built is over the limit (the request is not: base64 of 90 kB).
        att = {
            "filename": "big.bin",
            "content_type": "application/octet-stream",
            "content_base64": base64.b64encode(b"\x00" * 90_000).decode(),
        }
        body = {"to": [HANK], "subject": "s", "body": "b", "attachments": [att]}
        assert_problem(await client.post("/api/v1/messages", json=body, headers=h), 413)
        # The same as a form.
        form = {"to": HANK, "subject": "s"}
        files = {"attachments": ("big.bin", b"\x00" * 90_000, "application/octet-stream")}
        assert_problem(
            await client.post("/api/v1/messages", data=form, files=files, headers=h), 413
        )
        # The request itself is over the limit: refused before it is read whole.
        att["content_base64"] = base64.b64encode(b"\x00" * 400_000).decode()
        assert_problem(await client.post("/api/v1/messages", json=body, headers=h), 413)
        files = {"attachments": ("big.bin", b"\x00" * 400_000, "application/octet-stream")}
        assert_problem(
            await client.post("/api/v1/messages", data=form, files=files, headers=h), 413
        )
        # Under it, taken.
        att["content_base64"] = base64.b64encode(b"\x00" * 10_000).decode()
        assert (await client.post("/api/v1/messages", json=body, headers=h)).status_code == 202

    run_api(cfg, scenario)


def test_a_big_request_does_not_stall_the_others(server: Server) -> None:
    """While one request's 4 MB attachment is decoded and its message built, other requests
    are answered at once: that work is off the event loop. (On the loop, a request arriving
    meanwhile would wait for all of it: its wait would be most of the big request's time.)"""

    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        _, token = await tokens.create(HANK, "concurrent")
        att = {
            "filename": "big.bin",
            "content_type": "application/octet-stream",
            "content_base64": base64.b64encode(bytes(range(256)) * (16 * 1024)).decode(),
        }
        big = {"to": [HANK], "subject": "grande", "body": "b", "attachments": [att]}
        answered: list[float] = []

        async def small() -> None:
            while not big_task.done():
                r = await client.get("/api/v1/openapi.json")
                assert r.status_code == 200
                answered.append(time.monotonic())
                await asyncio.sleep(0.005)

        started = time.monotonic()
        big_task = asyncio.ensure_future(
            client.post("/api/v1/messages", json=big, headers=bearer(token))
        )
        await asyncio.gather(big_task, small())
        took = time.monotonic() - started
        assert big_task.result().status_code == 202, big_task.result().text
        # The longest time without an answer, while the big request was worked.
        gap = max(b - a for a, b in zip([started, *answered], answered, strict=False))
        assert len(answered) > 5 and gap < took / 3, (len(answered), gap, took)

    run_api(server.cfg, scenario)


def test_openapi_document(server: Server) -> None:
    async def scenario(client: httpx.AsyncClient, _tokens: Tokens) -> None:
        r = await client.get("/api/v1/openapi.json")
        assert r.status_code == 200
        doc = json.loads(r.content)
        assert doc["openapi"].startswith("3.1")
        paths = set(doc["paths"])
        assert paths == {
            "/api/v1/messages",
            "/api/v1/messages/{id}",
            "/api/v1/transmissions",
            "/api/v1/folders",
            "/api/v1/folders/{folder}/messages",
            "/api/v1/folders/{folder}/messages/{uid}",
            "/api/v1/webhook",
            "/api/v1/openapi.json",
        }
        assert "bcc" not in doc["components"]["schemas"]["Submission"]["properties"]
        assert (
            "multipart/form-data"
            in (doc["paths"]["/api/v1/messages"]["post"]["requestBody"]["content"])
        )
        # Every $ref resolves, and every error answer is a problem.
        text = json.dumps(doc)
        for ref in set(re.findall(r'"#/components/schemas/(\w+)"', text)):
            assert ref in doc["components"]["schemas"], ref
        for path in doc["paths"].values():
            for op in path.values():
                for status, answer in op["responses"].items():
                    if status.startswith(("4", "5")):
                        assert PROBLEM in answer["content"], (op["summary"], status)

    run_api(server.cfg, scenario)


def test_token_cli(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    conf = str(server.cfg.source)
    assert cli_main(["mailbox", "token", "create", GINA, "--name", "erp", "-c", conf]) == 0
    out = capsys.readouterr().out
    token = out.strip().splitlines()[-1]
    assert token.startswith("pecd_")
    assert cli_main(["mailbox", "token", "list", GINA, "--json", "-c", conf]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "erp" in json.dumps(listed) and token not in json.dumps(listed)
    token_id = str(next(t["id"] for t in listed if t["name"] == "erp"))
    assert cli_main(["mailbox", "token", "revoke", token_id, "-c", conf]) == 0
    assert "revoked" in capsys.readouterr().out

    async def check() -> str | None:
        db = await Database.open(server.cfg.database_url)
        try:
            return await Tokens(db).authenticate(token)
        finally:
            await db.close()

    assert asyncio.run(check()) is None


# --- the done-when test: over the real web process, real TLS ------------------------------------


def _https(srv: Server) -> httpx.Client:
    assert srv.app is not None and srv.app.web is not None
    return httpx.Client(
        base_url=f"https://127.0.0.1:{srv.app.web.port('https')}",
        verify=client_tls(srv.cfg),
        timeout=TIMEOUT,
    )


def _poll_https(
    c: httpx.Client, url: str, token: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        r = c.get(url, headers=bearer(token))
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        if done(doc):
            return doc
        assert time.monotonic() < deadline, f"status not reached: {doc}"
        time.sleep(0.05)


def _every_recipient_has_a_receipt(doc: dict[str, Any]) -> bool:
    final = ("avvenuta-consegna", "errore-consegna")
    return bool(doc["recipients"]) and all(
        r["status"] in final and r["receipt_url"] for r in doc["recipients"]
    )


def test_over_https_send_follow_and_download(server: Server, tmp_path: Path) -> None:
    judys, ivans = token_for(server, JUDY), token_for(server, IVAN)
    with _https(server) as c:
        body = {
            "to": [IVAN],
            "cc": [GHOST],
            "subject": "Contratto",
            "body": "In allegato.",
            "attachments": [
                {
                    "filename": "contratto.pdf",
                    "content_type": "application/pdf",
                    "content_base64": base64.b64encode(b"%PDF-1.4 contratto").decode(),
                }
            ],
            "client_key": "contratto-1",
        }
        started = time.monotonic()
        sent = c.post("/api/v1/messages", headers=bearer(judys), json=body)
        assert sent.status_code == 202, sent.text
        first = sent.json()
        accepted = _poll_https(c, first["status_url"], judys, lambda d: d["status"] == "accepted")
        took = time.monotonic() - started
        # Taken at once: the web process woke the pipeline (its poll is POLL seconds).
        assert took < POLL / 2, f"accepted after {took:.2f} s"
        doc = _poll_https(c, first["status_url"], judys, _every_recipient_has_a_receipt)
        assert statuses(doc) == {IVAN: "avvenuta-consegna", GHOST: "errore-consegna"}
        assert doc["receipt_url"] and doc["pec_msgid"] == accepted["pec_msgid"]

        # The same client key again: the same transmission, no second one.
        again = c.post("/api/v1/messages", headers=bearer(judys), json=body)
        assert again.status_code == 200 and again.json()["id"] == first["id"]

        # Looked up by its PEC msgid (with or without <>) and by the client's Message-ID.
        for query in (
            {"pec_msgid": doc["pec_msgid"]},
            {"pec_msgid": f"<{doc['pec_msgid']}>"},
            {"client_msgid": first["message_id"]},
            {"client_msgid": first["message_id"].strip("<>")},
            {"id": first["id"]},
        ):
            found = c.get("/api/v1/transmissions", params=query, headers=bearer(judys))
            assert found.status_code == 200, (query, found.text)
            assert found.json()["id"] == first["id"], query
        # Ivan's token sees none of it.
        for query in ({"pec_msgid": doc["pec_msgid"]}, {"client_msgid": first["message_id"]}):
            assert_problem(c.get("/api/v1/transmissions", params=query, headers=bearer(ivans)), 404)
        assert_problem(c.get(first["status_url"], headers=bearer(ivans)), 404)

        # The accettazione and the avvenuta-consegna, downloaded as .eml, verify with openssl.
        acc = c.get(doc["receipt_url"], headers=bearer(judys))
        assert acc.status_code == 200 and acc.headers["content-type"] == "message/rfc822"
        assert "attachment" in acc.headers["content-disposition"]
        assert classify(acc.content).ricevuta is Ricevuta.ACCETTAZIONE
        openssl_verify(acc.content, server.cfg.tls.ca, tmp_path)
        [ivan_status] = [r for r in doc["recipients"] if r["address"] == IVAN]
        delivered = c.get(ivan_status["receipt_url"], headers=bearer(judys))
        assert classify(delivered.content).ricevuta is Ricevuta.AVVENUTA_CONSEGNA
        openssl_verify(delivered.content, server.cfg.tls.ca, tmp_path)

        # The INBOX listed: every receipt with its kind, newest first, paginated.
        folders = c.get("/api/v1/folders", headers=bearer(judys)).json()["folders"]
        assert folders[0]["name"] == "INBOX" and "Sent" in {f["name"] for f in folders}
        page = c.get("/api/v1/folders/INBOX/messages", headers=bearer(judys)).json()
        kinds = {m["kind"] for m in page["messages"]}
        assert kinds == {"accettazione", "avvenuta-consegna", "errore-consegna"}, page
        uids = [m["uid"] for m in page["messages"]]
        assert uids == sorted(uids, reverse=True) and page["total"] == 3
        listed_acc = next(m for m in page["messages"] if m["kind"] == "accettazione")
        assert listed_acc["url"] == doc["receipt_url"]
        assert "Contratto" in listed_acc["subject"] and listed_acc["size"] == len(acc.content)
        one = c.get("/api/v1/folders/INBOX/messages?limit=1", headers=bearer(judys)).json()
        assert [m["uid"] for m in one["messages"]] == uids[:1] and one["next"]
        two = c.get(one["next"], headers=bearer(judys)).json()
        assert [m["uid"] for m in two["messages"]] == uids[1:2]

        # Ivan can neither list nor download judy's: his own mailbox only, folder names checked.
        ivan_page = c.get("/api/v1/folders/INBOX/messages", headers=bearer(ivans)).json()
        assert ivan_page["total"] == 1 and max(uids) > 1
        assert_problem(
            c.get(f"/api/v1/folders/INBOX/messages/{max(uids)}", headers=bearer(ivans)), 404
        )
        for bad in ("..%2F..%2Fjudy", "%2E%2E", "INBOX%2F..", "a%00b", ".hidden"):
            r = c.get(f"/api/v1/folders/{bad}/messages", headers=bearer(ivans))
            assert r.status_code in (404, 422), (bad, r.status_code)
            assert r.headers["content-type"].startswith(PROBLEM)
        assert_problem(c.get("/api/v1/folders/Nessuna/messages", headers=bearer(ivans)), 404)

        # Sent as a form, with a file: the same intake, the attachment reaches ivan.
        form = c.post(
            "/api/v1/messages",
            headers=bearer(judys),
            data={"to": IVAN, "subject": "Modulo", "body": "Via form.", "receipt": "sintetica"},
            files={"attachments": ("modulo.txt", b"campo=valore\n", "text/plain")},
        )
        assert form.status_code == 202, form.text
        _poll_https(
            c,
            form.json()["status_url"],
            judys,
            lambda d: statuses(d).get(IVAN) == "avvenuta-consegna",
        )
    ivan_inbox = fetch_all(server, "ivan")
    assert len(ivan_inbox) == 2
    assert any(b"modulo.txt" in m and b"X-TipoRicevuta: sintetica" in m for m in ivan_inbox)


def test_subject_with_a_line_break_or_control_character_is_refused(server: Server) -> None:
    """A subject the message could not be built with (a vertical tab, a form feed, a file or
    group separator, NEL, a Unicode line or paragraph separator, a lone surrogate) is a 422
    problem naming the subject, in JSON and in a form, never a 500 (the same check as the
    compose page's: pecd.web.submit.subject_error)."""

    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        _, token = await tokens.create(GINA, "subjects")
        h = bearer(token)
        for bad in ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\ud800"):
            body = {"to": [BOB], "subject": f"Fattura{bad}n.1", "body": "b"}
            r = await client.post(  # escaped as JSON writes it: a lone surrogate too
                "/api/v1/messages",
                content=json.dumps(body).encode(),
                headers={**h, "content-type": "application/json"},
            )
            assert "subject" in assert_problem(r, 422)["detail"], repr(bad)
        r = await client.post(
            "/api/v1/messages",
            data={"to": BOB, "subject": "Fattura\x0bn.1"},
            files={"attachments": ("a.txt", b"x", "text/plain")},
            headers=h,
        )
        assert "subject" in assert_problem(r, 422)["detail"]

    run_api(server.cfg, scenario)
