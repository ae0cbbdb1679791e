"""The web process under a bounded local load: pages and API calls per second, and the memory a
logged-in session costs the web process.

``pecd serve`` runs in its own process (the web child serves HTTPS); N concurrent clients in this
process (httpx over TLS, keep-alive) each make requests back to back for a fixed time. Measured:

* baseline: the same client against a bare Starlette app on uvicorn over TLS in its own process
  (one route answering a few bytes): the ceiling of the server stack on this machine;
* ``/healthz`` on pecd (the middlewares, no database);
* the login page (no session; a CSRF cookie and a template);
* logged in: the INBOX list, reading a PEC message (the envelope unwrapped, the daticert, the
  signature verified), the settings page;
* the REST API: a transmission's status (GET) and sending a PEC (POST, a job committed).

Then memory: the web child's RSS after ``--sessions`` logins (each its own cookie jar, each then
loading the INBOX), against its RSS before.

    .venv/bin/python bench/bench_web.py --clients 8 --seconds 5 --sessions 200
"""

from __future__ import annotations

import argparse
import asyncio
import html
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pecd.clock import SystemClock
from pecd.config import load_config
from pecd.devinit import config_text, init_installation
from pecd.store.accounts import Accounts
from pecd.store.db import Database
from pecd.store.tokens import Tokens

DOMAIN = "pec.bench.test"
PASSWORD = "bench password 123"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_https(port: int, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited during startup")
        try:
            r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=1)
            if r.status_code in (200, 404):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not start")


BASELINE = r"""
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
async def ok(request):
    return PlainTextResponse('{"status": "ok"}')
app = Starlette(routes=[Route("/healthz", ok)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            ssl_certfile=sys.argv[2], ssl_keyfile=sys.argv[3])
"""


def web_child(pid: int) -> int:
    """The pid of ``pecd serve``'s web process."""
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            if b"web_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise SystemExit("no web process")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


async def login(client: httpx.AsyncClient, address: str) -> None:
    page = await client.get("/login")
    found = CSRF.search(page.text)
    assert found is not None, page.text[:300]
    r = await client.post(
        "/login",
        data={"address": address, "password": PASSWORD, "csrf": html.unescape(found.group(1))},
    )
    assert r.status_code == 303 and "/login" not in r.headers["location"], (r.status_code, r.text)


async def measure(
    name: str,
    clients: list[httpx.AsyncClient],
    seconds: float,
    request: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]],
    expect: tuple[int, ...] = (200,),
) -> dict[str, float | str]:
    counts = [0] * len(clients)
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def one(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            t = time.monotonic()
            r = await request(clients[i], n)
            latencies.append(time.monotonic() - t)
            if r.status_code not in expect:
                raise SystemExit(f"{name}: {r.status_code} {r.text[:300]}")
            n += 1
        counts[i] = n

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(len(clients))))
    elapsed = time.monotonic() - t0
    latencies.sort()
    total = sum(counts)
    return {
        "name": name,
        "per_s": total / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "n": total,
    }


def show(row: dict[str, float | str]) -> None:
    print(
        f"  {row['name']:<34} {row['per_s']:8.1f} /s   p50 {row['p50_ms']:6.1f} ms"
        f"   p99 {row['p99_ms']:6.1f} ms   ({row['n']} requests)"
    )


async def install(tmp: Path) -> tuple[Path, int]:
    inst = tmp / "inst"
    await init_installation(inst, domain=DOMAIN, name="Bench PEC", clock=SystemClock(), demo=False)
    port = free_port()
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port(), "https": port}
    text = config_text(domain=DOMAIN, name="Bench PEC", ports=ports)
    text += "\n[queue]\npoll_seconds = 0.2\n"
    (inst / "pecd.toml").write_text(text)
    cfg = load_config(inst / "pecd.toml")
    db = await Database.open(cfg.database_url)
    acc = Accounts(db)
    for address in (ALICE, BOB):
        await acc.add_mailbox(address, PASSWORD)
    await db.close()
    return inst / "pecd.toml", port


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pecd-bench-web-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        config, port = await install(tmp)
        cfg = load_config(config)
        assert cfg.tls.ca is not None
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca))
        log = (tmp / "serve.log").open("ab")
        serve = subprocess.Popen(
            [sys.executable, "-m", "pecd", "serve", "-c", str(config)], stdout=log, stderr=log
        )
        procs.append(serve)
        base_port = free_port()
        baseline = subprocess.Popen(
            [sys.executable, "-c", BASELINE, str(base_port), str(cfg.tls.cert), str(cfg.tls.key)]
        )
        procs.append(baseline)
        wait_https(port, ctx, serve)
        wait_https(base_port, ctx, baseline)
        web = web_child(serve.pid)

        def clients(p: int) -> list[httpx.AsyncClient]:
            limits = httpx.Limits(max_connections=1)
            return [
                httpx.AsyncClient(
                    base_url=f"https://localhost:{p}", verify=ctx, timeout=30, limits=limits
                )
                for _ in range(args.clients)
            ]

        # A PEC from alice to bob, through the API, so there is a transmission, an accettazione
        # and a delivered envelope to read.
        db = await Database.open(cfg.database_url)
        _id, token = await Tokens(db).create(ALICE, "bench")
        await db.close()
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(
            base_url=f"https://localhost:{port}", verify=ctx, timeout=30
        ) as c:
            sent = await c.post(
                "/api/v1/messages",
                headers=auth,
                json={"to": [BOB], "subject": "bench", "body": "Lorem ipsum " * 200},
            )
            assert sent.status_code == 202, sent.text
            status_url = sent.json()["status_url"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                doc = (await c.get(status_url, headers=auth)).json()
                if [r["status"] for r in doc["recipients"]] == ["avvenuta-consegna"]:
                    break
                await asyncio.sleep(0.2)
            else:
                raise SystemExit(f"the bench PEC was not delivered: {doc}")

        base = clients(base_port)
        pecd = clients(port)
        print(
            f"web bench: {args.clients} clients, {args.seconds:.0f} s each, keep-alive, TLS, "
            f"loopback; {Path(sys.executable).name}"
        )
        show(
            await measure("baseline: bare Starlette /healthz", base, args.seconds, _get("/healthz"))
        )
        show(await measure("pecd /healthz", pecd, args.seconds, _get("/healthz")))
        show(await measure("login page (no session)", pecd, args.seconds, _get("/login")))
        for c in pecd:
            await login(c, BOB)
        inbox = await pecd[0].get("/mail/INBOX")
        links = re.findall(r'href="(/mail/INBOX/\d+)"', inbox.text)
        assert links, inbox.text[:500]
        rows = [
            ("INBOX list (logged in)", _get("/mail/INBOX")),
            ("read a PEC envelope", _get(links[0])),
            ("settings page", _get("/settings")),
        ]
        for name, request in rows:
            show(await measure(name, pecd, args.seconds, request))
        for c in pecd:
            c.headers.update(auth)
        show(await measure("API: GET transmission status", pecd, args.seconds, _get(status_url)))
        show(
            await measure(
                "API: POST a PEC (job committed)",
                pecd,
                args.seconds,
                _post_pec(),
                expect=(202,),
            )
        )
        for c in base + pecd:
            await c.aclose()

        # Memory: the web process's RSS before and after N logged-in sessions. Sessions live in
        # the database: each client logs in, loads its INBOX and closes its connection (the
        # listener admits 20 connections per client address, as the mail listeners do), so what
        # grows is what the process keeps per session, not per open connection.
        before = rss_kib(web)
        sem = asyncio.Semaphore(args.clients)
        cookies: list[httpx.Cookies] = []

        async def session() -> None:
            async with (
                sem,
                httpx.AsyncClient(
                    base_url=f"https://localhost:{port}", verify=ctx, timeout=60
                ) as c,
            ):
                await login(c, BOB)
                r = await c.get("/mail/INBOX")
                assert r.status_code == 200
                cookies.append(c.cookies)

        t0 = time.monotonic()
        await asyncio.gather(*(session() for _ in range(args.sessions)))
        took = time.monotonic() - t0
        after = rss_kib(web)
        # Every session is still good: one more INBOX each, on a new connection.
        async with httpx.AsyncClient(
            base_url=f"https://localhost:{port}", verify=ctx, timeout=60
        ) as c:
            for jar in cookies[:: max(1, len(cookies) // 20)]:
                c.cookies = jar
                assert (await c.get("/mail/INBOX")).status_code == 200
        print(
            f"  memory: web process RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB "
            f"after {args.sessions} logged-in sessions: "
            f"{(after - before) / args.sessions:.1f} KiB per session "
            f"({args.sessions / took:.1f} logins + INBOX/s)"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _get(path: str) -> Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]:
    async def request(c: httpx.AsyncClient, _n: int) -> httpx.Response:
        return await c.get(path)

    return request


def _post_pec() -> Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]:
    async def request(c: httpx.AsyncClient, n: int) -> httpx.Response:
        return await c.post(
            "/api/v1/messages",
            json={"to": [BOB], "subject": f"bench {n}", "body": "Lorem ipsum " * 100},
        )

    return request


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sessions", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
