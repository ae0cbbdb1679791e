"""The REST API (pecd.web.api) against a real installation and a running pipeline: the API app is
built in-process and driven by httpx over ASGI; the App in a thread processes what it commits."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from helpers import DOMAIN, fetch_all, install_e2e, wait_for
from helpers import AppThread as Server
from pecd.cli import main as cli_main
from pecd.config import Config
from pecd.pec.classify import classify
from pecd.store.db import Database
from pecd.store.tokens import Tokens
from pecd.web.api import api_routes

ALICE, BOB, CAROL, GHOST = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "ghost"))
PROBLEM = "application/problem+json"


@pytest.fixture
def server(tmp_path: Path, db_url_for_e2e: str | None) -> Iterator[Server]:
    cfg = asyncio.run(install_e2e(tmp_path / "inst", db_url_for_e2e))
    srv = Server(cfg).start()
    try:
        yield srv
    finally:
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
        await asyncio.sleep(0.1)


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {r["address"]: r["status"] for r in doc["recipients"]}


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
        assert doc["subject"] == "Fattura 42"
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
        _, token = await tokens.create(ALICE, "idempotent")
        body = {"to": [CAROL], "subject": "Una volta", "body": "x", "client_key": "ordine-7"}
        first = await client.post("/api/v1/messages", headers=bearer(token), json=body)
        again = await client.post("/api/v1/messages", headers=bearer(token), json=body)
        assert first.status_code == 202 and again.status_code == 200, (first.text, again.text)
        assert first.json()["id"] == again.json()["id"]
        ids.append(first.json()["id"])
        await poll(
            client,
            first.json()["status_url"],
            token,
            lambda d: statuses(d).get(CAROL) == "avvenuta-consegna",
        )
        # Bob with the same client key has a transmission of his own.
        _, bobs = await tokens.create(BOB, "bob")
        other = await client.post("/api/v1/messages", headers=bearer(bobs), json=body)
        assert other.status_code == 202 and other.json()["id"] != ids[0]

    run_api(server.cfg, scenario)
    time.sleep(0.5)  # a second transmission, were there one, would be as quick as the first
    inbox = [classify(m) for m in fetch_all(server, "alice")]
    kinds = sorted(c.ricevuta.value for c in inbox if c.ricevuta)
    assert kinds == ["accettazione", "avvenuta-consegna"]
    # Carol has alice's one envelope and bob's.
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
        token_id, token = await tokens.create(ALICE, "revoked")
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

        _, token = await tokens.create(ALICE, "checks")
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
        listed = await tokens.list(ALICE)
        assert [t.name for t in listed] == ["revoked", "checks"]
        assert listed[0].revoked_at is not None and listed[1].last_used_at is not None

    run_api(server.cfg, scenario)


def test_oversize(server: Server) -> None:
    limits = server.cfg.limits.model_copy(update={"max_message_size": 100_000})
    cfg = server.cfg.model_copy(update={"limits": limits})

    async def scenario(client: httpx.AsyncClient, tokens: Tokens) -> None:
        _, token = await tokens.create(ALICE, "big")
        h = bearer(token)
        # The message once built is over the limit (the request is not: base64 of 90 kB).
        att = {
            "filename": "big.bin",
            "content_type": "application/octet-stream",
            "content_base64": base64.b64encode(b"\x00" * 90_000).decode(),
        }
        body = {"to": [BOB], "subject": "s", "body": "b", "attachments": [att]}
        assert_problem(await client.post("/api/v1/messages", json=body, headers=h), 413)
        # The request itself is over the limit: refused before it is read whole.
        att["content_base64"] = base64.b64encode(b"\x00" * 400_000).decode()
        assert_problem(await client.post("/api/v1/messages", json=body, headers=h), 413)
        # Under it, taken.
        att["content_base64"] = base64.b64encode(b"\x00" * 10_000).decode()
        assert (await client.post("/api/v1/messages", json=body, headers=h)).status_code == 202

    run_api(cfg, scenario)


def test_openapi_document(server: Server) -> None:
    async def scenario(client: httpx.AsyncClient, _tokens: Tokens) -> None:
        r = await client.get("/api/v1/openapi.json")
        assert r.status_code == 200
        doc = json.loads(r.content)
        assert doc["openapi"].startswith("3.1")
        assert {"/api/v1/messages", "/api/v1/messages/{id}", "/api/v1/openapi.json"} <= set(
            doc["paths"]
        )
        assert "bcc" not in doc["components"]["schemas"]["Submission"]["properties"]

    run_api(server.cfg, scenario)


def test_token_cli(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    conf = str(server.cfg.source)
    assert cli_main(["mailbox", "token", "create", ALICE, "--name", "erp", "-c", conf]) == 0
    out = capsys.readouterr().out
    token = out.strip().splitlines()[-1]
    assert token.startswith("pecd_")
    assert cli_main(["mailbox", "token", "list", ALICE, "--json", "-c", conf]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "erp" in json.dumps(listed) and token not in json.dumps(listed)
    token_id = str(listed[0]["id"]) if isinstance(listed, list) else "1"
    assert cli_main(["mailbox", "token", "revoke", token_id, "-c", conf]) == 0
    assert "revoked" in capsys.readouterr().out

    async def check() -> str | None:
        db = await Database.open(server.cfg.database_url)
        try:
            return await Tokens(db).authenticate(token)
        finally:
            await db.close()

    assert asyncio.run(check()) is None
