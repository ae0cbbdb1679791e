"""pecd as a user installs it: a wheel built from the source (not an editable install), installed
apart from the source tree, then `pecd init` and `pecd serve` from the installed copy."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The first setuptools that reads `project.license` as an SPDX expression (see pyproject.toml).
SETUPTOOLS_FOR_PEP639 = 77


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the source (the checkout gets no build/ or egg-info)."""
    source = tmp / "source"
    shutil.copytree(
        ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist)]
    if setuptools_major() >= SETUPTOOLS_FOR_PEP639:
        command += ["--no-build-isolation", "--no-index"]  # nothing to fetch at all
    # else pip sets up the build backend from its configured index, as `pip install .` does.
    r = subprocess.run(
        [*command, str(source)], capture_output=True, text=True, timeout=180, check=False
    )
    if r.returncode != 0 and "No matching distribution found for setuptools" in r.stderr:
        pytest.skip(f"no setuptools>={SETUPTOOLS_FOR_PEP639} here or in pip's index to build with")
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("pecd-*.whl")
    return wheel


def install(wheel: Path, target: Path) -> dict[str, str]:
    """``wheel`` installed in ``target`` (its dependencies are this interpreter's); the
    environment that runs the installed copy ahead of any other (the editable one included)."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run(
        [*pip, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PECD_")}
    env["PYTHONPATH"] = str(target)
    return env


def use_free_ports(config: Path) -> int:
    """Every listener of ``config`` moved to a free loopback port; returns the SMTPS one."""
    text = re.sub(
        r'"127\.0\.0\.1:\d+"', lambda _: f'"127.0.0.1:{free_port()}"', config.read_text("utf-8")
    )
    config.write_text(text, "utf-8")
    found = re.search(r'^smtps = "127\.0\.0\.1:(\d+)"$', text, re.MULTILINE)
    assert found is not None, text
    return int(found.group(1))


@pytest.mark.slow
def test_the_wheel_installs_initialises_and_serves(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    site = tmp_path / "site"
    env = install(wheel, site)
    pecd = site / "bin" / "pecd"  # the console script of [project.scripts]
    assert pecd.exists()
    work = tmp_path / "work"  # no source tree here or above it to import by accident
    work.mkdir()

    where = subprocess.run(
        [sys.executable, "-c", "import pecd, pecd.cli; print(pecd.__file__)"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout

    inst = work / "inst"
    r = subprocess.run(
        [str(pecd), "init", "--dir", str(inst), "--domain", "pec.install.test"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"pecd: wrote {inst / 'pecd.toml'}" in r.stdout
    assert "alice@pec.install.test" in r.stdout  # a mailbox made: the database was migrated
    smtps = use_free_ports(inst / "pecd.toml")

    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(pecd), "serve", "-c", str(inst / "pecd.toml")],
            env=env,
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 45
        while "User name:" not in log.read_text("utf-8", "replace"):
            assert proc.poll() is None, log.read_text("utf-8", "replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text("utf-8", "replace")[-3000:]
            time.sleep(0.1)
        printed = log.read_text("utf-8", "replace")
        assert "pecd 0.1.0 serving pecd Development PEC (pec.install.test)" in printed
        assert f"SMTP (send):   localhost port {smtps}, SSL/TLS" in printed

        tls = ssl.create_default_context(cafile=str(inst / "pki" / "ca.pem"))
        with (
            socket.create_connection(("127.0.0.1", smtps), timeout=10) as raw,
            tls.wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            banner = conn.recv(512)
        assert banner.startswith(b"220 ") and b"pecd" in banner, banner

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text("utf-8", "replace")[-3000:]
        assert log.read_text("utf-8", "replace").rstrip().endswith("pecd: stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
