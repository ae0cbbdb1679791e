"""Webhooks (pecd.store.webhooks, pecd.web.webhooks, /api/v1/webhook, pecd mailbox webhook):
a receiver on loopback (a real HTTP server in a thread) gets the signed events of a real
installation's transmissions; one that fails first gets them after the queue's retry, and the job
shows in ``pecd queue list`` meanwhile; destinations inside the provider's network are refused
unless the operator allows them (this installation allows them: the receiver is on loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from helpers import DOMAIN, install_e2e, wait_for
from helpers import AppThread as Server
from pecd.cli import main as cli_main
from pecd.config import Config
from pecd.engine.effects import Record
from pecd.engine.vocab import TraceEventData, TraceType
from pecd.store import webhooks as store_webhooks
from pecd.store.db import Database
from pecd.store.effects import Lease, apply
from pecd.store.tokens import Tokens
from pecd.web import submit as web_submit
from pecd.web.api import api_routes
from pecd.web.webhooks import WebhookFailed, deliver, verify

ALICE, BOB, CAROL, DAN, GHOST = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "dan", "ghost"))
PROBLEM = "application/problem+json"


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body)
        return doc


@dataclass
class Receiver:
    """An HTTP server on loopback that records every POST and answers ``status()``."""

    status: Callable[[], int] = lambda: 204
    hits: list[Hit] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/pec/events"

    def ok(self) -> list[Hit]:
        return [h for h in self.hits if 200 <= h.status < 300]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = rec.status()
            rec.hits.append(Hit(self.path, dict(self.headers.items()), body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    rec.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=rec.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.server.shutdown()
        rec.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("webhooks") / "inst"
    cfg = asyncio.run(install_e2e(directory, None, extra="\n[webhooks]\nallow_private = true\n"))
    assert cfg.webhooks.allow_private
    srv = Server(cfg).start()
    assert srv.app is not None and srv.app.runner is not None
    runner = srv.app.runner
    web_submit.set_waker(lambda: srv.loop.call_soon_threadsafe(runner.wake.set))
    try:
        yield srv
    finally:
        web_submit.set_waker(None)
        srv.stop()


Scenario = Callable[[httpx.AsyncClient, Tokens, Database], Awaitable[None]]


def run_api(cfg: Config, scenario: Scenario) -> None:
    async def go() -> None:
        db = await Database.open(cfg.database_url)
        try:
            app = Starlette(routes=api_routes(cfg))
            app.state.db = db
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                await scenario(client, Tokens(db), db)
        finally:
            await db.close()

    asyncio.run(go())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    doc: dict[str, Any] = r.json()
    return doc


def signed_by(hit: Hit, secret: str) -> bool:
    """The receiver's check, done here by hand: HMAC-SHA256 of "<t>.<body>" under the secret."""
    fields = dict(p.split("=", 1) for p in hit.headers["X-Pecd-Signature"].split(","))
    t, v1 = fields["t"], fields["v1"]
    expected = hmac.new(secret.encode(), f"{t}.".encode() + hit.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1) and abs(time.time() - int(t)) < 120


def by_type(hits: list[Hit]) -> dict[tuple[str, str | None], Hit]:
    return {(h.event["type"], h.event["recipient"]): h for h in hits}


def queued_webhooks(cfg: Config, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert cli_main(["queue", "list", "--kind", "webhook", "--json", "-c", str(cfg.source)]) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def test_signed_events_reach_the_receiver(server: Server, receiver: Receiver) -> None:
    sent: dict[str, Any] = {}

    async def scenario(client: httpx.AsyncClient, tokens: Tokens, _db: Database) -> None:
        _, token = await tokens.create(ALICE, "hooks")
        h = bearer(token)
        assert_problem(await client.get("/api/v1/webhook", headers=h), 404)
        put = await client.put("/api/v1/webhook", headers=h, json={"url": receiver.url})
        assert put.status_code == 201, put.text
        sent["secret"] = put.json()["secret"]
        assert sent["secret"].startswith("whsec_") and len(sent["secret"]) > 40
        shown = (await client.get("/api/v1/webhook", headers=h)).json()
        assert shown["url"] == receiver.url and "secret" not in shown
        assert set(shown["events"]) == {"accepted", "not-accepted", "delivered", "failed"}
        r = await client.post(
            "/api/v1/messages",
            headers=h,
            json={"to": [BOB, GHOST], "subject": "Con webhook", "body": "x"},
        )
        assert r.status_code == 202, r.text
        sent.update(r.json())
        want = {("accepted", None), ("delivered", BOB), ("failed", GHOST)}
        await asyncio.to_thread(
            wait_for, lambda: want <= set(by_type(receiver.ok())), 20, "every event"
        )
        status = (await client.get(sent["status_url"], headers=h)).json()
        sent["pec_msgid"] = status["pec_msgid"]

    run_api(server.cfg, scenario)
    events = by_type(receiver.ok())
    assert len(receiver.hits) == 3  # each event once: none failed, none repeated
    for (kind, recipient), hit in events.items():
        assert hit.path == "/pec/events"
        assert hit.headers["Content-Type"] == "application/json"
        assert signed_by(hit, sent["secret"]), hit.headers
        assert not signed_by(hit, sent["secret"] + "x")
        assert verify(sent["secret"], hit.headers["X-Pecd-Signature"], hit.body, int(time.time()))
        e = hit.event
        assert hit.headers["X-Pecd-Event-Id"] == e["id"] and hit.headers["X-Pecd-Event"] == kind
        assert e["transmission"] == sent["id"] and e["pec_msgid"] == sent["pec_msgid"]
        assert e["client_msgid"] == sent["message_id"] and e["mailbox"] == ALICE
        assert datetime.fromisoformat(e["at"]).tzinfo is not None
        assert e["recipient"] == recipient
    assert sorted(events["accepted", None].event["recipients"]) == sorted([BOB, GHOST])
    assert events["failed", GHOST].event["error"]
    assert len({h.event["id"] for h in receiver.hits}) == 3


def test_a_failing_receiver_gets_the_event_after_a_retry(
    server: Server, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = threading.Event()
    failing.set()
    receiver.status = lambda: 503 if failing.is_set() else 200
    secret = "s3cret-of-carol-0123456789"

    async def scenario(client: httpx.AsyncClient, tokens: Tokens, _db: Database) -> None:
        _, token = await tokens.create(CAROL, "hooks")
        h = bearer(token)
        put = await client.put(
            "/api/v1/webhook", headers=h, json={"url": receiver.url, "secret": secret}
        )
        assert put.status_code == 201 and put.json()["secret"] == secret, put.text
        r = await client.post("/api/v1/messages", headers=h, json={"to": [BOB], "body": "y"})
        assert r.status_code == 202, r.text

    run_api(server.cfg, scenario)
    wait_for(lambda: receiver.hits, 20, "a first attempt")
    # While the receiver fails, the event waits in the queue: attempts and the last error show.
    rows = wait_for(
        lambda: [
            r
            for r in queued_webhooks(server.cfg, capsys)
            if r["attempts"] >= 1 and "HTTP 503" in (r["last_error"] or "")
        ],
        20,
        "a failed webhook job in pecd queue list",
    )
    assert rows[0]["kind"] == "webhook" and rows[0]["state"] in ("ready", "running")
    failing.clear()
    wait_for(
        lambda: {("accepted", None), ("delivered", BOB)} <= set(by_type(receiver.ok())),
        20,
        "the events, once the receiver answers",
    )
    retried = [h for h in receiver.hits if h.event["type"] == "accepted"]
    assert len(retried) >= 2 and retried[0].status == 503 and retried[-1].status == 200
    # The same event each time: the same id (the receiver deduplicates), signed afresh.
    assert len({h.event["id"] for h in retried}) == 1
    assert all(signed_by(h, secret) for h in receiver.hits)
    wait_for(lambda: not queued_webhooks(server.cfg, capsys), 10, "the queue empty of webhooks")


def test_private_destinations_are_refused(server: Server, receiver: Receiver) -> None:
    strict = server.cfg.model_copy(
        update={"webhooks": server.cfg.webhooks.model_copy(update={"allow_private": False})}
    )
    port = receiver.url.split(":")[2].split("/")[0]

    async def scenario(client: httpx.AsyncClient, tokens: Tokens, db: Database) -> None:
        _, token = await tokens.create(BOB, "hooks")
        h = bearer(token)
        for url in (
            receiver.url,
            f"http://localhost:{port}/",
            "http://10.1.2.3/hook",
            "http://192.168.0.1/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "ftp://example.com/hook",
            "https://user:pw@example.com/hook",
            "https://example.com/hook#x",
            "example.com/hook",
            "https:///hook",
        ):
            r = await client.put("/api/v1/webhook", headers=h, json={"url": url})
            assert_problem(r, 422)
        assert_problem(
            await client.put(
                "/api/v1/webhook", headers=h, json={"url": "https://a.example/", "secret": "short"}
            ),
            422,
        )
        # A public name is taken (where it leads is checked when something is sent).
        ok = await client.put("/api/v1/webhook", headers=h, json={"url": "https://example.com/h"})
        assert ok.status_code == 201, ok.text
        assert (await client.delete("/api/v1/webhook", headers=h)).status_code == 204
        assert_problem(await client.delete("/api/v1/webhook", headers=h), 404)

        # A name that leads inside, found when the event is sent: refused, nothing sent.
        event = {"id": "evt_test", "type": "accepted", "mailbox": BOB}
        payload = {"mailbox": BOB, "event": event}
        now = datetime.now(UTC)
        for url in (f"http://localhost:{port}/", receiver.url):
            await store_webhooks.set_webhook(db, BOB, url, "x" * 32, now)
            with pytest.raises(WebhookFailed, match="not a public address"):
                await deliver(strict, db, payload, now)
        assert receiver.hits == []
        # The same, allowed by the operator: sent.
        await deliver(server.cfg, db, payload, now)
        assert [h.event["id"] for h in receiver.hits] == ["evt_test"]
        assert await store_webhooks.delete_webhook(db, BOB)
        # Without a webhook, an event queued before has nowhere to go: dropped quietly.
        await deliver(server.cfg, db, payload, now)
        assert len(receiver.hits) == 1

    run_api(strict, scenario)


def test_only_the_senders_own_receipts_make_events(server: Server) -> None:
    """A receipt from another provider makes a delivered event only for the mailbox whose
    transmission it is (its accettazione in the trace log), whatever sender it names. (The
    webhook is a closed port on loopback: nothing leaves the machine.)"""
    now = datetime.now(UTC)

    def event(kind: str, pec_msgid: str, sender: str, **data: Any) -> TraceEventData:
        return TraceEventData(
            at=now, event=kind, pec_msgid=pec_msgid, sender=sender, client_msgid="<c@x>", data=data
        )

    async def go() -> list[dict[str, Any]]:
        db = await Database.open(server.cfg.database_url)
        try:
            await store_webhooks.set_webhook(db, DAN, "http://127.0.0.1:9/dan", "y" * 32, now)
            ours = event(TraceType.ACCETTAZIONE.value, "tx-dan@x", DAN, intake="api-dan")
            receipt = event(
                TraceType.RICEVUTA_RICEVUTA.value,
                "tx-dan@x",
                DAN.upper(),
                ricevuta="avvenuta-consegna",
                consegna="someone@other.example",
                pertinent=True,
                dropped=False,
            )
            # Naming dan as its sender, about a transmission that is not dan's.
            forged = event(
                TraceType.RICEVUTA_RICEVUTA.value,
                "tx-not-dan@x",
                DAN,
                ricevuta="avvenuta-consegna",
                consegna="someone@other.example",
                pertinent=True,
                dropped=False,
            )
            presa = event(TraceType.PRESA_IN_CARICO.value, "tx-dan@x", DAN)
            # The 24 h timer's errore-consegna; a refused submission.
            timer = event(
                TraceType.ERRORE_CONSEGNA.value,
                "tx-dan@x",
                DAN,
                consegna="late@x.example",
                timer=24.0,
            )
            refused = event(TraceType.NON_ACCETTAZIONE.value, "tx-dan-2@x", DAN, intake="api-no")
            lease = Lease("test", now)
            made = []
            for effects in (
                [Record(ours)],
                [Record(receipt), Record(forged), Record(presa)],
                [Record(timer), Record(refused)],
            ):
                made.append(await db.write(lambda s, e=effects: apply(s, e, lease).webhooks))
            assert made == [1, 1, 2]
            async with db.read_session() as s:
                from pecd.store import jobs

                found = await jobs.list_jobs(s, kinds=["webhook"], limit=1000)
                return [j.payload["event"] for j in found if j.payload["mailbox"] == DAN]
        finally:
            await store_webhooks.delete_webhook(db, DAN)
            await db.close()

    events = asyncio.run(go())
    assert [(e["type"], e["recipient"], e["transmission"]) for e in events] == [
        ("accepted", None, "api-dan"),
        ("delivered", "someone@other.example", "api-dan"),
        ("failed", "late@x.example", "api-dan"),
        ("not-accepted", None, "api-no"),
    ]


def test_webhook_cli(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    conf = str(server.cfg.source)
    base = ["mailbox", "webhook"]
    assert cli_main([*base, "set", DAN, "http://127.0.0.1:9/pec", "-c", conf]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:9/pec" in out and out.strip().splitlines()[-1].startswith("whsec_")
    assert cli_main([*base, "show", DAN, "--json", "-c", conf]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["url"] == "http://127.0.0.1:9/pec" and "secret" not in shown[0]
    assert cli_main([*base, "set", DAN, "ftp://hooks.example/pec", "-c", conf]) == 1
    assert "https://" in capsys.readouterr().err
    assert cli_main([*base, "delete", DAN, "-c", conf]) == 0
    assert cli_main([*base, "delete", DAN, "-c", conf]) == 1
    assert cli_main([*base, "show", DAN, "-c", conf]) == 1
