"""The operations packaging: docker-compose.yml, deploy/ (pecd.toml, clamd.conf, the healthcheck)
and contrib/pecd.service, validated without Docker or systemd running.

* ``docker-compose config`` (Debian's docker-compose, v1) checks docker-compose.yml: it needs no
  daemon and no image;
* deploy/pecd.toml, the one config file both compose nodes mount, loads with pecd's own loader
  (its /etc/pecd and /var/lib/pecd paths moved under a temporary directory by the environment
  values it reads, PECD_ETC and PECD_VAR), and agrees with the
  compose file (database password) and with deploy/clamd/clamd.conf (StreamMaxLength above
  max_message_size); Dovecot's config rendered from it reads the shared root over PostgreSQL;
* the image's HEALTHCHECK script asks /healthz on [metrics] listen;
* ``systemd-analyze verify`` checks contrib/pecd.service.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy.engine import make_url

from pecd.config import Config, load_config
from pecd.dovecot import MailUser, render, write_config
from pecd.pec.size import parse_size

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY_TOML = ROOT / "deploy" / "pecd.toml"
CLAMD_CONF = ROOT / "deploy" / "clamd" / "clamd.conf"
UNIT = ROOT / "contrib" / "pecd.service"
PKI_FILES = ("signing.key", "signing.pem", "chain.pem", "tls.pem", "tls.key")


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed: run ./scripts/setup (Debian's docker-compose)"
        )
    # No daemon is contacted by `config`; a clean environment keeps a DOCKER_HOST or COMPOSE_*
    # variable of the machine from changing the result.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run(
        [exe, "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_docker_compose_config_validates() -> None:
    done = _compose("config")
    assert done.returncode == 0, done.stderr
    full = done.stdout
    services = _compose("config", "--services").stdout.split()
    assert sorted(services) == sorted(
        ["postgres", "clamd", "node1", "node2", "dovecot-config", "dovecot"]
    )
    top_volumes = full[full.index("\nvolumes:\n") :]
    for volume in ("maildir", "pecd-data", "postgres-data", "clamav-db", "dovecot-conf"):
        assert f"\n  {volume}:" in top_volumes, volume
    # Both nodes (and Dovecot's config writer) mount the one deploy/pecd.toml.
    assert full.count(f"{ROOT}/deploy/pecd.toml:/etc/pecd/pecd.toml:ro") == 3, full


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text("utf-8"))
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/dovecot/Dockerfile"])
def test_dockerfile_copies_what_the_context_has(dockerfile: str) -> None:
    """Static checks (no daemon here): every COPY source exists in the build context (the
    repository root) and is not left out by .dockerignore; the compose targets are stages."""
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = _dockerfile_instructions(ROOT / dockerfile)
    assert instructions[0][0] in ("FROM", "ARG")
    copies = [args.split() for word, args in instructions if word == "COPY"]
    assert copies or dockerfile != "Dockerfile"
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue
        for src in [a for a in args if not a.startswith("--")][:-1]:
            assert (ROOT / src).exists(), f"{dockerfile}: COPY {src}: not in the repository"
            assert not _ignored(src, ignore), f"{dockerfile}: COPY {src}: in .dockerignore"
    words = [w for w, _ in instructions]
    assert words.count("CMD") == 1 and "HEALTHCHECK" in words
    if dockerfile == "Dockerfile":
        stages = {args.split()[-1] for w, args in instructions if w == "FROM" and " AS " in args}
        assert {"build", "clamd", "pecd"} <= stages
        # The runtime stage, the last one (the default target), runs as pecd and serves.
        last = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
        tail = instructions[last:]
        assert ("USER", "pecd") in tail
        assert ("CMD", '["pecd", "serve", "-c", "/etc/pecd/pecd.toml"]') in tail


def _deploy_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """deploy/pecd.toml with /etc/pecd and /var/lib/pecd moved under ``tmp_path`` through its
    environment values (PECD_ETC, PECD_VAR), every other one left at its container default."""
    etc, var = tmp_path / "etc" / "pecd", tmp_path / "var" / "lib" / "pecd"
    (etc / "pki").mkdir(parents=True)
    for name in PKI_FILES:
        (etc / "pki" / name).write_text("placeholder\n")
    for name in DEPLOY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PECD_ETC", str(etc))
    monkeypatch.setenv("PECD_VAR", str(var))
    return load_config(DEPLOY_TOML)


#: The environment values deploy/pecd.toml reads (its header lists them).
DEPLOY_ENV = (
    "PECD_ETC",
    "PECD_VAR",
    "PECD_DATABASE_URL",
    "PECD_RECEPTION",
    "PECD_SMTPS",
    "PECD_SUBMISSION",
    "PECD_HTTPS",
    "PECD_METRICS",
    "PECD_CLAMD_HOST",
    "PECD_CLAMD_PORT",
)


def test_deploy_config_names_its_environment_values() -> None:
    text = DEPLOY_TOML.read_text("utf-8")
    used = set(re.findall(r"\$\{(PECD_[A-Z_]+):-", text))
    assert used == set(DEPLOY_ENV)
    header = text[: text.index("[provider]")]
    for name in DEPLOY_ENV:
        assert name in header, f"{name} is not described in deploy/pecd.toml's header"


def test_environment_values_in_a_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pecd's loader: ${NAME} must be set, ${NAME:-default} falls back when NAME is unset or
    empty, $${ is a literal ${, keys and non-strings are left alone; the healthcheck agrees."""
    from pecd.config import ConfigError
    from pecd.devinit import config_text

    monkeypatch.setenv("T_HOST", "127.0.0.2")
    monkeypatch.setenv("T_EMPTY", "")
    monkeypatch.delenv("T_UNSET", raising=False)
    base = config_text(
        domain="pec.example.test", name="Example", ports={"smtps": 1, "submission": 2, "imaps": 3}
    ).split("[listeners]")[0]
    for name in ("signing.key", "signing.pem", "chain.pem", "tls.pem", "tls.key", "ca.pem"):
        (tmp_path / "pki").mkdir(exist_ok=True)
        (tmp_path / "pki" / name).write_text("placeholder\n")
    conf = tmp_path / "pecd.toml"
    conf.write_text(
        base
        + "[listeners]\n"
        + 'smtps = "${T_HOST}:${T_UNSET:-4650}"\n'
        + 'submission = "${T_EMPTY:-127.0.0.1}:5870"\n'
        + '[metrics]\nlisten = "${T_HOST:-0.0.0.0}:9108"\n'
        + '[log]\nmail_log = "/var/log/$${T_HOST}.log"\n',
        "utf-8",
    )
    cfg = load_config(conf)
    assert cfg.listeners.smtps is not None and str(cfg.listeners.smtps) == "127.0.0.2:4650"
    assert str(cfg.listeners.submission) == "127.0.0.1:5870"
    assert cfg.log.mail_log == "/var/log/${T_HOST}.log"
    monkeypatch.setenv("PECD_CONFIG", str(conf))
    assert _healthcheck_module().expand("${T_HOST:-0.0.0.0}:9108") == "127.0.0.2:9108"
    conf.write_text(base + '[listeners]\nsmtps = "${T_UNSET}:465"\n', "utf-8")
    with pytest.raises(ConfigError, match=r"listeners\.smtps: environment variable T_UNSET"):
        load_config(conf)
    # Forms that are not expanded are errors, not literals that surface later.
    for value in ("${T_HOST-x}:465", "${T_UNSET:-${T_HOST}}:465", "${T_HOST:465"):
        conf.write_text(base + f'[listeners]\nsmtps = "{value}"\n', "utf-8")
        with pytest.raises(ConfigError, match=r"listeners\.smtps: .*\$\{"):
            load_config(conf)


def test_deploy_config_loads_with_pecds_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _deploy_config(tmp_path, monkeypatch)
    var = tmp_path / "var" / "lib" / "pecd"
    url = make_url(cfg.database_url)
    assert url.get_backend_name() == "postgresql"
    assert (url.host, url.port, url.database) == ("postgres", 5432, "pecd")
    assert cfg.maildir_root == var / "mail"
    assert cfg.storage.data_dir == var / "data"
    assert cfg.mailbox.server == "dovecot"
    assert cfg.antivirus.enabled and cfg.antivirus.host == "clamd" and cfg.antivirus.port == 3310
    assert cfg.antivirus.socket is None
    assert cfg.metrics.listen is not None
    assert cfg.listeners.reception is not None and cfg.listeners.reception.port == 25
    # The compose file's PostgreSQL password is the one in the URL.
    compose = COMPOSE.read_text("utf-8")
    assert f"POSTGRES_PASSWORD: {url.password}" in compose
    # clamd refuses a stream AT StreamMaxLength: it must exceed what pecd sends.
    conf = dict(
        line.split(None, 1)
        for line in CLAMD_CONF.read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    scan = cfg.antivirus.max_scan_size or cfg.limits.max_message_size
    assert parse_size(conf["StreamMaxLength"]) > scan
    assert parse_size(conf["MaxFileSize"]) > scan and parse_size(conf["MaxScanSize"]) > scan
    assert conf["AlertExceedsMax"] == "yes" and conf["TCPSocket"] == str(cfg.antivirus.port)


def test_dovecot_config_from_the_deploy_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _deploy_config(tmp_path, monkeypatch)
    files = render(cfg, tmp_path / "dovecot", mail_user=MailUser("pecd", 10025, 10025))
    conf = files["dovecot.conf"]
    assert f"mail_location = maildir:{cfg.maildir_root}/%Ld/%Ln" in conf
    assert "auth_cache_size = 0" in conf
    assert re.search(r"inet_listener imaps \{\s+address = 0\.0\.0\.0\s+port = 993", conf)
    assert re.search(r"inet_listener pop3s \{\s+address = 0\.0\.0\.0\s+port = 995", conf)
    sql = files["sql.conf.ext"]
    assert "driver = pgsql" in sql and "host='postgres'" in sql and "dbname='pecd'" in sql
    # Dovecot's own parser reads it (where Dovecot is installed, as scripts/setup does).
    if shutil.which("doveconf") is not None:
        written = write_config(cfg, tmp_path / "dovecot", mail_user=MailUser("pecd", 10025, 10025))
        done = subprocess.run(
            ["doveconf", "-n", "-c", str(written.conf)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pecd_healthcheck", ROOT / "deploy" / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def healthz_server() -> Iterator[tuple[int, list[int]]]:
    """A stand-in for the metrics port: /healthz answers the first status of ``codes``."""
    codes = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(codes[0] if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], codes
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_asks_healthz_on_the_metrics_port(
    tmp_path: Path, healthz_server: tuple[int, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, codes = healthz_server
    hc = _healthcheck_module()
    conf = tmp_path / "pecd.toml"
    monkeypatch.setenv("PECD_CONFIG", str(conf))
    conf.write_text(f'[metrics]\nlisten = "0.0.0.0:{port}"\n')
    assert hc.main() == 0
    codes[0] = 503
    assert hc.main() == 1
    conf.write_text('[metrics]\nlisten = ""\n')  # metrics off: nothing to ask
    assert hc.main() == 0
    conf.write_text('[metrics]\nlisten = "127.0.0.1:1"\n')  # nobody listening
    assert hc.main() == 1
    monkeypatch.setenv("PECD_CONFIG", str(tmp_path / "missing.toml"))
    assert hc.main() == 1


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text("utf-8")
    for key in (
        "Type=simple",
        "User=pecd",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ):
        assert key in text, key
    assert re.search(r"^ReadWritePaths=.*/var/lib/pecd/data.*/var/lib/pecd/mail", text, re.M)
    assert re.search(r"^LimitNOFILE=\d+", text, re.M)
    # verify checks that ExecStart's program exists: point it at this installation's pecd.
    pecd = Path(sys.executable).parent / "pecd"
    if not pecd.exists():
        found = shutil.which("pecd")
        assert found is not None, "no pecd executable to point ExecStart at"
        pecd = Path(found)
    unit = tmp_path / "pecd.service"
    unit.write_text(text.replace("/usr/local/bin/pecd", str(pecd)), "utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # An unknown or misspelt key is only a warning (exit 0): no output at all is required.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr
    )
