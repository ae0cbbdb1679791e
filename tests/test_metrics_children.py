"""The metrics port of `pecd serve` counts what its child processes count (runtime/metrics.py):
the mailbox process's IMAP and POP3 logins, the web process's, the engine processes' events, with
`pecd serve`'s own SMTP logins in the same series.

The first tests run small stand-in children (``python -c``, started with the directory in
``PROMETHEUS_MULTIPROC_DIR`` as the supervisor starts them) against the summing of this process's
port; the last ones start `pecd serve` and fail a login over SMTPS, IMAPS, POP3S and the web
login form, then read /metrics with curl as an operator would: with one engine (SQLite) and with
two engine processes (PostgreSQL), and through the replacement of a killed child.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    DOMAIN,
    PASSWORD,
    children,
    client_tls,
    free_port,
    free_ports,
    install,
    start,
    wait_for,
)
from pecd.config import Config, load_config
from pecd.runtime import metrics
from store_fixtures import PG_ENV, migrated_postgres

needs_pg = pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} not set")
CURL = shutil.which("curl")
TIMEOUT = 10

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line of an exposition (labels as written)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            key = m[1] + (m[2] or "")
            assert key not in out, f"{key} twice in the exposition"
            out[key] = float(m[3])
    return out


def failed(protocol: str) -> str:
    return f'pecd_logins_failed_total{{protocol="{protocol}"}}'


def succeeded(protocol: str) -> str:
    return f'pecd_logins_succeeded_total{{protocol="{protocol}"}}'


# --- the sum, with stand-in children -------------------------------------------------------------


def child(path: Path, code: str, before: str = "") -> None:
    """Run ``code`` in a child process counting under ``path``, as `pecd serve` starts its
    children; ``metrics`` (pecd.runtime.metrics) is imported there, after ``before``."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    script = before + "\nfrom pecd.runtime import metrics\n" + textwrap.dedent(code)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)


@pytest.fixture(name="children_dir")
def children_dir_fixture() -> Iterator[Path]:
    path = metrics.multiprocess_dir()
    assert path.name.startswith(f"pecd-metrics-{os.getpid()}-") and not any(path.iterdir())
    metrics.use_multiprocess(path)
    try:
        yield path
    finally:
        metrics.use_multiprocess(None)
        metrics.remove_multiprocess_dir(path)
        assert not path.exists()


def test_the_port_sums_this_process_and_its_children(children_dir: Path) -> None:
    before = samples(metrics.exposition().decode())
    child(children_dir, 'metrics.login_failed("imap"); metrics.login_failed("imap")')
    child(children_dir, 'metrics.login_failed("pop3"); metrics.login_succeeded("pop3")')
    child(
        children_dir,
        """
        metrics.login_failed("smtp")
        metrics.count_event("accettazione")
        metrics.STAGE_SECONDS.labels("submission").observe(0.02)
        metrics.STAGE_SECONDS.labels("submission").observe(7)
        # A gauge a child should never set: it must not be summed into this process's own.
        metrics.QUEUE.labels("delivery", "ready").set(1000)
        """,
    )
    metrics.login_failed("smtp")  # this process's own, as `pecd serve` counts SMTP with one engine
    metrics.STAGE_SECONDS.labels("submission").observe(0.02)
    metrics.QUEUE.labels("delivery", "ready").set(3)
    after = samples(metrics.exposition().decode())

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved(failed("imap")) == 2
    assert moved(failed("pop3")) == 1 and moved(succeeded("pop3")) == 1
    assert moved(failed("smtp")) == 2  # one here, one in a child: the same series
    assert moved("pecd_messages_accepted_total") == 1
    assert moved('pecd_events_total{event="accettazione"}') == 1
    # A histogram sums bucket by bucket, its count and its sum too.
    stage = 'pecd_stage_seconds_{}{{kind="submission"{}}}'
    assert moved(stage.format("count", "")) == 3
    assert moved(stage.format("bucket", ',le="0.025"')) == 2
    assert moved(stage.format("bucket", ',le="10.0"')) == 3
    assert moved(stage.format("bucket", ',le="+Inf"')) == 3
    assert moved(stage.format("sum", "")) == pytest.approx(7.04)
    # The gauges are this process's own; the children's are not added (nor shown with a pid).
    assert after['pecd_queue_jobs{kind="delivery",state="ready"}'] == 3
    assert not [k for k in after if k.startswith("pecd_queue_jobs") and "pid=" in k]
    assert not [k for k in after if k.endswith("_created") or "_created{" in k]
    # Each series once, with its TYPE line once; what Prometheus's own parser reads.
    text = metrics.exposition().decode()
    assert text.count("# TYPE pecd_logins_failed_total counter") == 1
    assert text.count("# TYPE pecd_stage_seconds histogram") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["pecd_stage_seconds"].type == "histogram"
    assert parsed["pecd_queue_jobs"].type == "gauge"


def test_a_child_that_is_gone_keeps_its_counts(children_dir: Path) -> None:
    """A replaced child's counts stay in the sum (counters never go back), and a child that
    happens to get the pid of one gone before goes on from its counts."""
    key = failed("imap")
    base = samples(metrics.exposition().decode()).get(key, 0.0)
    child(
        children_dir,
        """
        import os
        metrics.login_failed("imap")
        print(os.getpid())
        """,
    )
    assert samples(metrics.exposition().decode())[key] == base + 1
    files = sorted(p.name for p in children_dir.iterdir())
    assert files and all(re.fullmatch(r"(counter|histogram)_\d+\.db", f) for f in files)
    (pid,) = {int(f.split("_")[1][:-3]) for f in files if f.startswith("counter_")}
    metrics.process_gone(pid)  # what the supervisor calls: the counts stay
    assert samples(metrics.exposition().decode())[key] == base + 1
    child(children_dir, 'metrics.login_failed("imap")')  # its replacement, another pid
    assert samples(metrics.exposition().decode())[key] == base + 2
    # The same pid again (pids wrap): prometheus_client takes the file's counts up again.
    child(
        children_dir,
        'metrics.login_failed("imap")',
        before=(
            "import prometheus_client.values as values\n"
            f"values.ValueClass = values.MultiProcessValue(lambda: {pid})"
        ),
    )
    assert samples(metrics.exposition().decode())[key] == base + 3


def test_one_guard_two_protocols() -> None:
    """The mailbox process's Guard: IMAP and POP3 share the throttle, each counts under its name."""
    from pecd.config import SecurityConfig
    from pecd.guard import Guard

    guard = Guard(SecurityConfig(delay_after_failures=1, delay_base_seconds=30))
    imap, pop3 = guard.speaking("imap"), guard.speaking("pop3")
    exposed = samples(metrics.exposition().decode())
    assert failed("pop3") in exposed and succeeded("imap") in exposed  # at 0 from the start
    before = exposed[succeeded("imap")], exposed[succeeded("pop3")], exposed[failed("pop3")]
    pop3.failed("pop3", "192.0.2.1", "alice@x.it")
    pop3.failed("pop3", "192.0.2.1", "alice@x.it")
    # The failures made over POP3 count for IMAP from the same address.
    assert imap.failures("192.0.2.1") == 2 and guard.delay_for(imap.failures("192.0.2.1")) > 0
    imap.succeeded("192.0.2.1", "alice@x.it")
    assert pop3.failures("192.0.2.1") == 0  # forgiven for both
    assert guard.admit("imaps", "192.0.2.1") is not None
    assert pop3.connections("imaps") == 1
    after = samples(metrics.exposition().decode())
    assert after[succeeded("imap")] == before[0] + 1
    assert after[succeeded("pop3")] == before[1]
    assert after[failed("pop3")] == before[2] + 2
    # A Guard made without a protocol (a test's) counts no success.
    Guard(SecurityConfig()).succeeded("192.0.2.2", "bob@x.it")
    assert samples(metrics.exposition().decode())[succeeded("imap")] == before[0] + 1


# --- pecd serve ------------------------------------------------------------------------------------


def _config(directory: Path, url: str | None, processes: int) -> tuple[Config, int]:
    metrics_port = free_port()
    extra = (
        "\n[queue]\nbase_delay_seconds = 0.2\nformat_processes = 1\n"
        f"\n[serve]\nprocesses = {processes}\n"
        f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\nqueue_cache_seconds = 0\n'
        "\n[mailbox]\nheartbeat_seconds = 0.2\nheartbeat_timeout_seconds = 5\n"
        # Each failure below must be answered at once (throttling has tests of its own).
        "\n[security]\ndelay_after_failures = 1000000\n"
    )
    cfg = asyncio.run(install(directory, url, extra_config=extra))
    assert cfg.source is not None
    imaps = cfg.listeners.imaps
    assert imaps is not None
    pop3s, https = free_ports(2)
    text = cfg.source.read_text("utf-8")
    listen = f'imaps = "127.0.0.1:{imaps.port}"\n'
    assert listen in text
    text = text.replace(
        listen, listen + f'pop3s = "127.0.0.1:{pop3s}"\nhttps = "127.0.0.1:{https}"\n'
    )
    cfg.source.write_text(text, "utf-8")
    return load_config(cfg.source), metrics_port


def _scrape(port: int) -> dict[str, float]:
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-sSf", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return samples(out.stdout.decode())


def _fail_smtp(cfg: Config) -> None:
    assert cfg.listeners.smtps is not None
    with (
        smtplib.SMTP_SSL(
            "127.0.0.1", cfg.listeners.smtps.port, context=client_tls(cfg), timeout=TIMEOUT
        ) as smtp,
        pytest.raises(smtplib.SMTPAuthenticationError),
    ):
        # One AUTH (login() would try PLAIN, then LOGIN: two failures).
        smtp.ehlo()
        smtp.user, smtp.password = f"alice@{DOMAIN}", "not the password"
        smtp.auth("PLAIN", smtp.auth_plain)


def _fail_imap(cfg: Config, timeout: float = TIMEOUT) -> None:
    assert cfg.listeners.imaps is not None
    with imaplib.IMAP4_SSL(
        "127.0.0.1", cfg.listeners.imaps.port, ssl_context=client_tls(cfg), timeout=timeout
    ) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(f"alice@{DOMAIN}", "not the password")
        imap.login(f"bob@{DOMAIN}", PASSWORD)


def _fail_pop3(cfg: Config) -> None:
    assert cfg.listeners.pop3s is not None
    pop = poplib.POP3_SSL(
        "127.0.0.1", cfg.listeners.pop3s.port, context=client_tls(cfg), timeout=TIMEOUT
    )
    try:
        pop.user(f"alice@{DOMAIN}")
        with pytest.raises(poplib.error_proto):
            pop.pass_("not the password")
    finally:
        pop.close()


def _fail_web(cfg: Config) -> None:
    assert cfg.listeners.https is not None
    base = f"https://127.0.0.1:{cfg.listeners.https.port}"
    with httpx.Client(base_url=base, verify=client_tls(cfg), timeout=TIMEOUT) as web:
        page = web.get("/login")
        assert page.status_code == 200
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None, page.text[:2000]
        r = web.post(
            "/login",
            data={"address": f"alice@{DOMAIN}", "password": "wrong", "csrf": token[1]},
        )
        assert r.status_code in (200, 401), r.status_code
        assert "alice" in r.text  # the form again, with the address kept


PROTOCOLS = ("smtp", "imap", "pop3", "web")


def _every_protocol_fails(cfg: Config, port: int) -> dict[str, float]:
    before = wait_for(lambda: _scrape(port), 30, "the metrics port")
    # Every protocol's series is there before its first failure (at 0 in a fresh start).
    for p in PROTOCOLS:
        assert before.get(failed(p)) == 0, (p, before.get(failed(p)))
        assert succeeded(p) in before, p
    _fail_smtp(cfg)
    _fail_imap(cfg)
    _fail_pop3(cfg)
    _fail_web(cfg)

    def moved() -> dict[str, float]:
        m = _scrape(port)
        return m if all(m.get(failed(p), 0) >= 1 for p in PROTOCOLS) else {}

    after: dict[str, float] = wait_for(moved, 10, "a failed login of every protocol counted")
    for p in PROTOCOLS:
        assert after[failed(p)] == 1, (p, after[failed(p)])
    assert after[succeeded("imap")] == before[succeeded("imap")] + 1  # bob's
    return after


@pytest.mark.slow
@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_every_protocols_failed_logins_on_the_metrics_port(tmp_path: Path) -> None:
    cfg, port = _config(tmp_path / "inst", None, 1)
    log = tmp_path / "serve.log"
    proc = start(cfg, log)
    try:
        wait_for(lambda: "Mail client settings" in log.read_text(), 60, "pecd serving")
        counted = _every_protocol_fails(cfg, port)
        dirs = list(Path(tempfile.gettempdir()).glob(f"pecd-metrics-{proc.pid}-*"))
        assert len(dirs) == 1, dirs

        # A killed mailbox process is replaced: its counts stay, the new one's add to them.
        module = "pecd.runtime.mailbox_process"
        mailbox = _child_pid(proc.pid, module)
        assert mailbox
        os.kill(mailbox, signal.SIGKILL)
        wait_for(
            lambda: _child_pid(proc.pid, module) not in (0, mailbox), 30, "a new mailbox process"
        )
        after = _scrape(port)
        for p in PROTOCOLS:
            assert after[failed(p)] == counted[failed(p)], p
        # The connection waits in the listen backlog until the new process serves.
        _fail_imap(cfg, timeout=60)
        after = _scrape(port)
        assert after[failed("imap")] == counted[failed("imap")] + 1
        assert after[failed("pop3")] == counted[failed("pop3")]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert not dirs[0].exists()  # removed at the stop


@pytest.fixture(name="url")
def url_fixture() -> Iterator[str]:
    yield from migrated_postgres()


@needs_pg
@pytest.mark.slow
@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_every_protocols_failed_logins_with_two_engine_processes(tmp_path: Path, url: str) -> None:
    cfg, port = _config(tmp_path / "inst", url, 2)
    log = tmp_path / "serve.log"
    proc = start(cfg, log)
    try:
        wait_for(lambda: "Mail client settings" in log.read_text(), 60, "pecd serving")
        counted = _every_protocol_fails(cfg, port)
        # SMTP, now counted in an engine process: kill both engines, the count stays.
        for pid in _engine_pids(log):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(_engine_pids(log)) == 4, 60, "two new engine processes")
        assert _scrape(port)[failed("smtp")] == counted[failed("smtp")]
        _fail_smtp(cfg)
        assert _scrape(port)[failed("smtp")] == counted[failed("smtp")] + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]


ENGINE_UP = re.compile(r"\[engine \d+ pid (\d+)\] pecd\.engine: engine process \d+ serving")


def _engine_pids(log: Path) -> list[int]:
    return [int(p) for p in ENGINE_UP.findall(log.read_text())]


def _child_pid(parent: int, module: str) -> int:
    """The pid of ``parent``'s child running ``python -m <module>`` (0: none now)."""
    for pid in children(parent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in cmdline:
            return pid
    return 0
