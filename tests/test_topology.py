"""docker-compose.yml's topology started natively, from the same deploy/pecd.toml: PostgreSQL (the
test server, a fresh database), clamd (the session's real one, over TCP as the compose network
has it), two ``pecd serve`` nodes on one Maildir root; Dovecot is left out (the Maildir is read
directly). Traffic through both nodes, the receipts in the Maildirs, the counters on each node's
metrics port (read with ``curl``), one mail log line per event on each node's standard output.

The one difference from the containers is the environment: deploy/pecd.toml reads its paths,
database URL, listen addresses and clamd's address from ``${NAME:-default}`` values, whose
defaults are the containers' (docs/operations.md "Compose topology"). Natively each node gets
its own listen addresses, and both get the same paths and database, as the compose file's two
containers get the same volumes and the same PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from helpers import RunningClamd, free_port, wait_for
from helpers import clamd_fixture as clamd_fixture  # the session's clamd, the fixture `clamd`
from pecd.config import load_config
from pecd.mailbox.maildir import MaildirStore
from pecd.pec.classify import classify
from pecd.store.db import Database
from pecd.store.models import TraceEvent
from store_fixtures import PG_ENV, fresh_postgres_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_TOML = ROOT / "deploy" / "pecd.toml"
PASSWORD = "topology password"
LISTENERS = ("PECD_RECEPTION", "PECD_SMTPS", "PECD_SUBMISSION", "PECD_HTTPS", "PECD_METRICS")


@pytest.fixture(name="pg")
def pg_fixture() -> Iterator[str]:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set")
    from sqlalchemy.engine import make_url

    u = make_url(base)
    try:
        socket.create_connection((u.host or "127.0.0.1", u.port or 5432), timeout=3).close()
    except OSError as exc:
        pytest.skip(f"PostgreSQL at {u.host}:{u.port} unreachable: {exc}")
    url, drop = fresh_postgres_database()
    try:
        yield url
    finally:
        drop()


@dataclass
class Node:
    """One compose service ``node1``/``node2`` as a native process: the shared environment
    (paths, database, clamd) and its own listen addresses."""

    name: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def port(self, var: str) -> int:
        return int(self.env[var].rpartition(":")[2])

    def start(self, command: list[str], etc: Path) -> None:
        """Run the container's ``command`` with this venv's pecd, /etc/pecd being ``etc``."""
        args = [a.replace("/etc/pecd", str(etc), 1) for a in command[1:]]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pecd", *args],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        """The image's HEALTHCHECK: /healthz on the metrics port answers 200."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
        try:
            url = f"http://127.0.0.1:{self.port('PECD_METRICS')}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)  # the compose file's stop signal: a drain
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None


def _pecd(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pecd", *args, "-c", env["PECD_CONFIG"]],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"pecd {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def _metrics(port: int) -> dict[str, float]:
    """The samples of a node's /metrics, read with curl as an operator would."""
    curl = shutil.which("curl")
    assert curl, "curl is needed (scripts/setup installs it)"
    done = subprocess.run(
        [curl, "-sSf", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _mail_log(path: Path) -> list[dict[str, object]]:
    """The JSON lines of a node's standard output ([log] mail_log = "-", format json)."""
    found = []
    for line in path.read_text("utf-8", "replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def test_compose_topology_natively(
    pg: str, clamd: RunningClamd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the compose file runs (tests/test_deploy.py validates it with docker-compose): both
    # nodes on the one config file and the one Maildir volume, the image's command (the
    # defaults of the node template), PostgreSQL and clamd; node2 once node1 is healthy.
    compose = COMPOSE.read_text("utf-8")
    template = compose[compose.index("x-pecd-node:") : compose.index("\nservices:")]
    assert "PECD_CONFIG: /etc/pecd/pecd.toml" in template
    assert "./deploy/pecd.toml:/etc/pecd/pecd.toml:ro" in template
    assert "maildir:/var/lib/pecd/mail" in template
    assert "command:" not in template  # the Dockerfile's CMD
    command = ["pecd", "serve", "-c", "/etc/pecd/pecd.toml"]
    assert 'CMD ["pecd", "serve", "-c", "/etc/pecd/pecd.toml"]' in DOCKERFILE.read_text("utf-8")
    for service in ("postgres", "clamd", "node1", "node2"):
        assert f"\n  {service}:\n" in compose, service
    node2 = compose[compose.index("\n  node2:\n") : compose.index("\n  dovecot-config:\n")]
    assert re.search(r"node1:\s+condition: service_healthy", node2)

    # The volumes and mounts of the compose file, as directories: /etc/pecd (the config file
    # itself, unchanged, and deploy/pki with development keys) and /var/lib/pecd.
    etc, var = tmp_path / "etc" / "pecd", tmp_path / "var" / "lib" / "pecd"
    etc.mkdir(parents=True)
    (var / "data").mkdir(parents=True)
    (var / "mail").mkdir()
    config = etc / "pecd.toml"
    shutil.copyfile(DEPLOY_TOML, config)
    shared = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "PECD_CONFIG": str(config),
        "PECD_ETC": str(etc),
        "PECD_VAR": str(var),
        "PECD_DATABASE_URL": pg,
        "PECD_CLAMD_HOST": "127.0.0.1",
        "PECD_CLAMD_PORT": str(clamd.port),
    }
    for key in ("PECD_TEST_POSTGRES_URL", "VIRTUAL_ENV", "LANG"):
        if key in os.environ:
            shared[key] = os.environ[key]
    # The development keys `pecd pki init` writes for the provider deploy/pecd.toml names, as
    # deploy/pki/README.md says for a trial.
    provider = tomllib.loads(DEPLOY_TOML.read_text("utf-8"))["provider"]
    domain_name = provider["domain"]
    pki = [str(etc / "pki"), "--domain", domain_name, "--name", provider["name"]]
    done = subprocess.run(
        [sys.executable, "-m", "pecd", "pki", "init", *pki],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    nodes = [
        Node(
            n,
            {**shared, **{var_: f"127.0.0.1:{free_port()}" for var_ in LISTENERS}},
            tmp_path / f"{n}.log",
        )
        for n in ("node1", "node2")
    ]
    for key, value in nodes[0].env.items():  # deploy/pecd.toml as node1 reads it
        monkeypatch.setenv(key, value)
    cfg = load_config(config)
    assert cfg.antivirus.enabled and cfg.antivirus.port == clamd.port
    assert cfg.mailbox.server == "dovecot" and cfg.maildir_root == var / "mail"
    users = [f"{u}@{domain_name}" for u in ("alice", "bob", "carol")]
    ghost = f"ghost@{domain_name}"
    sent: list[tuple[str, str, list[str]]] = []  # (Message-ID, sender, recipients)
    try:
        # node1 first: it applies the migrations; node2 once node1 is healthy (depends_on).
        nodes[0].start(command, etc)
        wait_for(nodes[0].healthy, 60, "node1 healthy", interval=0.1)
        # docker-compose exec node1 pecd domain add / mailbox add ... (its header says so).
        _pecd(nodes[0].env, "domain", "add", domain_name)
        for box in (*users, cfg.provider.mail_receipt):
            _pecd(nodes[0].env, "mailbox", "add", box, "--password-stdin", stdin=PASSWORD + "\n")
        nodes[1].start(command, etc)
        wait_for(nodes[1].healthy, 60, "node2 healthy", interval=0.1)

        before = [_metrics(node.port("PECD_METRICS")) for node in nodes]
        for m in before:
            assert m.get("pecd_messages_accepted_total", 0) == 0, m
        ctx = ssl.create_default_context(cafile=str(etc / "pki" / "ca.pem"))
        for i in range(8):
            node = nodes[i % 2]
            frm, to = users[i % 3], [users[(i + 1) % 3], users[(i + 2) % 3]]
            if i == 5:
                to.append(ghost)
            mid = f"<topology-{i}@client.example>"
            raw = (
                f"From: {frm}\r\nTo: {', '.join(to)}\r\nSubject: topology {i}\r\n"
                f"Message-ID: {mid}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0100\r\n\r\n"
                "Attraverso la topologia di docker-compose.yml.\r\n"
            ).encode()
            # SMTPS on one node, submission (STARTTLS) on the other: both listeners work.
            if i % 4 < 2:
                with smtplib.SMTP_SSL(
                    "127.0.0.1", node.port("PECD_SMTPS"), context=ctx, timeout=30
                ) as smtp:
                    smtp.login(frm, PASSWORD)
                    smtp.sendmail(frm, to, raw)
            else:
                with smtplib.SMTP("127.0.0.1", node.port("PECD_SUBMISSION"), timeout=30) as smtp:
                    smtp.starttls(context=ctx)
                    smtp.login(frm, PASSWORD)
                    smtp.sendmail(frm, to, raw)
            sent.append((mid, frm, to))

        store = MaildirStore(cfg.maildir_root)

        def tally() -> Counter[tuple[str, str, str]]:
            seen: Counter[tuple[str, str, str]] = Counter()
            for box in (*users, cfg.provider.mail_receipt):
                for path in store.list_folder(box):
                    c = classify(path.read_bytes())
                    assert c.daticert is not None and c.is_valid_pec, path
                    what = c.ricevuta.value if c.ricevuta else "envelope"
                    seen[(c.daticert.msgid or "", f"{what}:{c.daticert.consegna or ''}", box)] += 1
            return seen

        want: Counter[tuple[str, str, str]] = Counter()
        for mid, frm, to in sent:
            want[(mid, "accettazione:", frm)] = 1
            want[(mid, "presa-in-carico:", cfg.provider.mail_receipt)] = 1
            for r in to:
                if r == ghost:
                    want[(mid, f"errore-consegna:{r}", frm)] = 1
                else:
                    want[(mid, "envelope:", r)] = 1
                    want[(mid, f"avvenuta-consegna:{r}", frm)] = 1
        wait_for(lambda: tally() == want, 60, "every receipt and envelope", interval=0.3)

        # The metrics port of each node serves the counters (read with curl); which node's
        # workers did a job is up to the shared queue, so the counts add up over both nodes.
        for node in nodes:
            m = _metrics(node.port("PECD_METRICS"))
            for family in ("pecd_messages_accepted_total", "pecd_messages_refused_total"):
                assert family in m, (node.name, family, m)
            assert m.get('pecd_scanner_up{scanner="clamd"}') == 1, (node.name, m)
        merged: Counter[str] = Counter()
        scraped = [_metrics(node.port("PECD_METRICS")) for node in nodes]
        for samples in scraped:
            for k, v in samples.items():
                if k.startswith(
                    ("pecd_messages_accepted_total", "pecd_deliveries_total", "pecd_receipts")
                ):
                    merged[k] += int(v)
        assert merged["pecd_messages_accepted_total"] == len(sent), (merged, scraped)
        delivered = sum(len([r for r in to if r != ghost]) for _, _, to in sent)
        assert merged['pecd_deliveries_total{outcome="delivered"}'] == delivered, merged
        assert merged['pecd_receipts_total{kind="accettazione"}'] == len(sent), merged
        assert merged['pecd_receipts_total{kind="avvenuta-consegna"}'] == delivered, merged
        events = asyncio.run(_trace_events(pg))
    finally:
        codes = [node.stop() for node in reversed(nodes)]
    assert codes == [0, 0], [n.log.read_text()[-3000:] for n in nodes]

    # The mail log (JSON on standard output): one line per event, each message's acceptance
    # logged once, by whichever node did it.
    lines = [entry for node in nodes for entry in _mail_log(node.log)]
    accepted = Counter(
        str(e.get("client_msgid")) for e in lines if e.get("event") == "accettazione"
    )
    assert accepted == Counter({mid: 1 for mid, _, _ in sent}), accepted
    logged = Counter((str(e.get("event")), str(e.get("pec_msgid"))) for e in lines)
    assert logged == events, (logged - events, events - logged)


async def _trace_events(url: str) -> Counter[tuple[str, str]]:
    """(event, PEC msgid) of every event in the trace log."""
    db = await Database.open(url)
    try:
        async with db.read_session() as s:
            rows = (await s.execute(select(TraceEvent.event, TraceEvent.pec_msgid))).all()
            return Counter((str(e), str(m)) for e, m in rows)
    finally:
        await db.close()
