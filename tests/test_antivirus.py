"""Virus scanning against a real clamd (Debian's clamav-daemon) on the signature database pecd
generates: EICAR alone and inside messages, the project signature, clean and large messages;
every way clamd can fail to answer is ScannerUnavailable, never clean; the [antivirus] config."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from helpers import PKI_NOW, RunningClamd, clamd_pong, free_port
from helpers import clamd_fixture as clamd_fixture  # the fixture `clamd`
from pecd.antivirus import testsigs
from pecd.antivirus.clamd import ClamdProcess, clamd_config_text, write_clamd
from pecd.antivirus.scanner import (
    HEADER_SLACK,
    ClamdScanner,
    NullScanner,
    ScannerUnavailable,
    ScanTimedOut,
    make_scanner,
)
from pecd.config import ConfigError, load_config
from pecd.devinit import config_text
from pecd.devpki import write_dev_pki
from pecd.engine.effects import Scanned
from pecd.pec.pki import create_dev_pki

CLEAN = Scanned(False)
EICAR_FOUND = Scanned(True, "Eicar-Test-Signature.UNOFFICIAL")
PROJECT_FOUND = Scanned(True, "Pecd.Test.Signature.UNOFFICIAL")


def scan(scanner: ClamdScanner, data: bytes) -> Scanned:
    return asyncio.run(scanner.scan(data))


def unix(clamd: RunningClamd) -> ClamdScanner:
    return ClamdScanner(socket=clamd.socket, max_scan_size=clamd.max_scan_size, timeout=30)


def mime(*parts: bytes, boundary: str = "b1") -> bytes:
    head = (
        b"From: alice@pec.example.test\r\nTo: bob@pec.example.test\r\nSubject: documenti\r\n"
        b"Message-ID: <m1@pec.example.test>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary.encode() + b'"\r\n\r\n'
    )
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return head + body + b"--" + boundary.encode() + b"--\r\n"


TEXT_PART = b"Content-Type: text/plain; charset=utf-8\r\n\r\nIn allegato i documenti.\r\n"


def attachment(data: bytes, name: str = "fattura.pdf") -> bytes:
    return (
        b'Content-Type: application/octet-stream; name="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="'
        + name.encode()
        + b'"\r\n\r\n'
        + base64.encodebytes(data).replace(b"\n", b"\r\n")
    )


# --- the generated database -----------------------------------------------------------------


def test_database_has_eicar_and_the_project_signature(tmp_path: Path) -> None:
    assert len(testsigs.EICAR) == 68
    assert hashlib.md5(testsigs.EICAR).hexdigest() == "44d88612fea8a8f36de82e1278abb02f"
    assert testsigs.EICAR.startswith(b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS")
    d = testsigs.write_database(tmp_path / "db")
    assert sorted(p.name for p in d.iterdir()) == ["pecd-test.hdb", "pecd-test.ndb"]
    hdb = (d / "pecd-test.hdb").read_text()
    assert hdb == "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature\n"
    ndb = (d / "pecd-test.ndb").read_text().splitlines()
    assert ndb == [
        f"Eicar-Test-Signature:0:*:{testsigs.EICAR.hex()}",
        f"Pecd.Test.Signature:0:*:{b'PECD-TEST-VIRUS-SIGNATURE-7f3a'.hex()}",
    ]
    # pecd's own source does not match the database (the strings are assembled, not written).
    src = Path(testsigs.__file__).read_bytes()
    assert testsigs.EICAR not in src and testsigs.PROJECT_TEXT not in src


def test_clamscan_agrees_on_the_database(tmp_path: Path) -> None:
    """clamscan (no daemon) detects with the same database: the signatures are ClamAV's syntax."""
    import subprocess

    clamscan = shutil.which("clamscan")
    assert clamscan, "clamscan is not installed: run scripts/setup"
    db = testsigs.write_database(tmp_path / "db")
    (tmp_path / "eicar.com").write_bytes(testsigs.EICAR)
    (tmp_path / "clean.txt").write_bytes(b"hello\n")
    out = subprocess.run(
        [
            clamscan,
            "--no-summary",
            "-d",
            str(db),
            str(tmp_path / "eicar.com"),
            str(tmp_path / "clean.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "eicar.com: Eicar-Test-Signature.UNOFFICIAL FOUND" in out
    assert "clean.txt: OK" in out


# --- verdicts from the real clamd ---------------------------------------------------------------


def test_eicar_alone(clamd: RunningClamd) -> None:
    assert scan(unix(clamd), testsigs.EICAR) == EICAR_FOUND


def test_eicar_over_tcp(clamd: RunningClamd) -> None:
    tcp = ClamdScanner(host="127.0.0.1", port=clamd.port, max_scan_size=clamd.max_scan_size)
    assert scan(tcp, testsigs.EICAR) == EICAR_FOUND
    assert scan(tcp, b"nothing to see\r\n") == CLEAN


def test_eicar_as_base64_attachment(clamd: RunningClamd) -> None:
    raw = mime(TEXT_PART, attachment(testsigs.EICAR, "eicar.com"))
    assert testsigs.EICAR not in raw  # found only by decoding the attachment
    assert scan(unix(clamd), raw) == EICAR_FOUND


def test_eicar_inside_a_signed_envelope(clamd: RunningClamd) -> None:
    """As at the reception point: a multipart/signed transport envelope holding the original
    message (message/rfc822) whose base64 attachment is EICAR."""
    original = mime(TEXT_PART, attachment(testsigs.EICAR, "eicar.com"), boundary="inner")
    envelope = (
        b"From: posta-certificata@pec.other.test\r\nSubject: POSTA CERTIFICATA: documenti\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
        b' micalg=sha-256; boundary="sig"\r\n\r\n'
        b"--sig\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        b"--outer\r\nContent-Type: text/plain\r\n\r\nMessaggio di posta certificata\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + original + b"\r\n--outer--\r\n"
        b"\r\n--sig\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHAqCAMIACAQEx\r\n--sig--\r\n"
    )
    assert scan(unix(clamd), envelope) == EICAR_FOUND


def test_project_signature(clamd: RunningClamd) -> None:
    plain = b"Subject: prova\r\n\r\nQui c'e' PECD-TEST-VIRUS-SIGNATURE-7f3a, innocuo.\r\n"
    assert scan(unix(clamd), plain) == PROJECT_FOUND
    inside = mime(TEXT_PART, attachment(b"%PDF-1.4 " + testsigs.PROJECT_TEXT + b" %%EOF"))
    assert scan(unix(clamd), inside) == PROJECT_FOUND


def test_clean_message(clamd: RunningClamd) -> None:
    raw = mime(TEXT_PART, attachment(b"%PDF-1.4 just a document %%EOF"))
    assert scan(unix(clamd), raw) == CLEAN
    assert scan(unix(clamd), b"") == CLEAN


def test_large_clean_message_near_the_limit(clamd: RunningClamd) -> None:
    # base64 in lines of 76 + CRLF: 57 bytes take 78
    payload = bytes(range(256)) * ((clamd.max_scan_size - 16384) * 57 // 78 // 256)
    raw = mime(TEXT_PART, attachment(payload, "dati.bin"))
    assert clamd.max_scan_size - 64 * 1024 < len(raw) <= clamd.max_scan_size
    assert scan(unix(clamd), raw) == CLEAN
    # and a virus at the very end of it is still found
    raw = mime(TEXT_PART, attachment(payload[:-4096] + testsigs.EICAR, "dati.bin"))
    assert len(raw) <= clamd.max_scan_size
    assert scan(unix(clamd), raw) == EICAR_FOUND


def test_over_max_scan_size_is_unscannable_not_clean(clamd: RunningClamd) -> None:
    """Larger than max_scan_size (beyond the slack for pecd's own Received: field): a verdict
    about this message, neither clean nor a wait for a scanner that will never say otherwise."""
    s = ClamdScanner(socket=clamd.socket, max_scan_size=1000)
    over = scan(s, b"x" * (1000 + HEADER_SLACK + 1))
    assert not over.infected and over.unscannable is not None
    assert "over antivirus.max_scan_size" in over.unscannable
    assert scan(s, b"x" * (1000 + HEADER_SLACK)) == CLEAN


def test_clamd_stream_limit_is_never_clean(clamd: RunningClamd) -> None:
    """pecd allowed more than clamd's StreamMaxLength (a misconfigured clamd): clamd's ERROR
    reply is an unscannable verdict; a connection it cut first is a scanner that cannot
    answer. Never clean."""
    s = ClamdScanner(socket=clamd.socket, max_scan_size=64 * 1024 * 1024)
    try:
        got = scan(s, b"x" * (clamd.max_scan_size + 2 * 1024 * 1024))
    except ScannerUnavailable as exc:
        assert "StreamMaxLength" in str(exc)
    else:
        assert not got.infected and got.unscannable is not None
        assert "StreamMaxLength" in got.unscannable


def test_ping(clamd: RunningClamd) -> None:
    assert asyncio.run(unix(clamd).ping()) is True
    nowhere = ClamdScanner(socket=clamd.socket.parent / "none.sock", max_scan_size=1)
    assert asyncio.run(nowhere.ping()) is False


def test_scans_at_once(clamd: RunningClamd) -> None:
    async def many() -> list[Scanned]:
        s = unix(clamd)
        datas = [testsigs.EICAR if i % 3 == 0 else b"clean %d" % i for i in range(30)]
        return list(await asyncio.gather(*(s.scan(d) for d in datas)))

    got = asyncio.run(many())
    assert got == [EICAR_FOUND if i % 3 == 0 else CLEAN for i in range(30)]


# --- clamd not answering: never clean ---------------------------------------------------------


def test_no_clamd_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ScannerUnavailable, match="No such file"):
        scan(ClamdScanner(socket=tmp_path / "clamd.sock", max_scan_size=1024), testsigs.EICAR)
    closed = ClamdScanner(host="127.0.0.1", port=free_port(), max_scan_size=1024)
    with pytest.raises(ScannerUnavailable, match=r"127\.0\.0\.1"):
        scan(closed, b"hello")


@pytest.mark.slow
def test_clamd_stopped_then_back(tmp_path: Path) -> None:
    """A clamd of its own (pecd's ClamdProcess): clean while up, unavailable once stopped (not
    clean), clean again after it is started again."""

    async def run() -> None:
        files = write_clamd(tmp_path / "av", max_scan_size=1024 * 1024)
        proc = ClamdProcess(files.config)
        await proc.start()
        s = ClamdScanner(socket=files.socket, max_scan_size=1024 * 1024, timeout=5)
        try:
            assert await s.scan(b"hello") == CLEAN
            await proc.stop()
            assert proc.proc is not None and proc.proc.returncode is not None
            with pytest.raises(ScannerUnavailable):
                await s.scan(b"hello")
            with pytest.raises(ScannerUnavailable):
                await s.scan(testsigs.EICAR)
            await proc.start()
            assert await s.scan(testsigs.EICAR) == EICAR_FOUND
        finally:
            await proc.stop()

    asyncio.run(run())


@pytest.mark.slow
def test_supervised_clamd_is_started_again(tmp_path: Path) -> None:
    """``pecd serve``'s managed clamd: killed, it is started again; stopped, it stays down."""

    async def run() -> None:
        files = write_clamd(tmp_path / "av", max_scan_size=1024 * 1024)
        proc = ClamdProcess(files.config)
        await proc.start()
        proc.supervise()
        try:
            first = proc.proc
            assert first is not None
            first.kill()
            deadline = time.monotonic() + 30
            while proc.proc is first or not clamd_pong(files.socket):
                assert time.monotonic() < deadline, "clamd was not started again"
                await asyncio.sleep(0.1)
            s = ClamdScanner(socket=files.socket, max_scan_size=1024 * 1024)
            assert await s.scan(testsigs.EICAR) == EICAR_FOUND
        finally:
            await proc.stop()
        assert proc.proc is not None and proc.proc.returncode is not None
        assert not clamd_pong(files.socket)

    asyncio.run(run())


def fake_clamd(
    sock: Path, reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> Callable[[Callable[[ClamdScanner], Awaitable[None]]], None]:
    """Run a test against a unix-socket server that answers like ``reply``."""

    def run(body: Callable[[ClamdScanner], Awaitable[None]]) -> None:
        async def main() -> None:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    await reply(r, w)
                finally:
                    w.close()

            server = await asyncio.start_unix_server(handle, path=str(sock))
            try:
                await body(ClamdScanner(socket=sock, max_scan_size=1 << 20, timeout=0.5))
            finally:
                server.close()

        asyncio.run(main())

    return run


async def read_stream(r: asyncio.StreamReader) -> bytes:
    """Read an INSTREAM request to its end, as clamd does."""
    assert await r.readexactly(10) == b"zINSTREAM\0"
    data = b""
    while n := int.from_bytes(await r.readexactly(4), "big"):
        data += await r.readexactly(n)
    return data


def test_slow_clamd_times_out(tmp_path: Path) -> None:
    async def never(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_stream(r)
        await asyncio.sleep(30)

    async def body(s: ClamdScanner) -> None:
        t = time.monotonic()
        # Counted, not waited for: a message that keeps clamd busy every time is parked.
        with pytest.raises(ScanTimedOut, match=r"no answer within 0.5 s"):
            await s.scan(testsigs.EICAR)
        assert time.monotonic() - t < 5

    fake_clamd(tmp_path / "slow.sock", never)(body)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"hello there\0", "unexpected reply 'hello there'"),
        (b"stream: OK", None),  # no NUL, then closed: still clamd's line
        (b"", "closed without a reply"),
        (b"stream: FOUND\0", "unexpected reply|FOUND without a name"),
        (b"x" * 70000, "a reply over 65536 bytes"),
        (b"Can't allocate memory ERROR\0", "Can't allocate memory ERROR"),
        (b"\xff\xfe garbage\0", "unexpected reply"),
    ],
)
def test_replies_that_are_not_a_verdict(tmp_path: Path, reply: bytes, match: str | None) -> None:
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert await read_stream(r) == testsigs.EICAR
        w.write(reply)
        await w.drain()

    async def body(s: ClamdScanner) -> None:
        if match is None:
            assert await s.scan(testsigs.EICAR) == CLEAN
        else:
            with pytest.raises(ScannerUnavailable, match=match):
                await s.scan(testsigs.EICAR)

    fake_clamd(tmp_path / "fake.sock", answer)(body)


def test_limits_exceeded_is_an_unscannable_verdict(tmp_path: Path) -> None:
    """clamd could not scan all of it (a zip bomb, deep nesting): the same on every try, so a
    verdict about the message (refused, kept), not a wait."""

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_stream(r)
        w.write(b"stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND\0")
        await w.drain()

    async def body(s: ClamdScanner) -> None:
        got = await s.scan(testsigs.EICAR)
        assert not got.infected and got.unscannable is not None
        assert "could not scan all of it" in got.unscannable

    fake_clamd(tmp_path / "limits.sock", answer)(body)


def test_chunks_are_sent_whole(tmp_path: Path) -> None:
    data = bytes(range(256)) * 3000  # several INSTREAM chunks
    got: list[bytes] = []

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await read_stream(r))
        w.write(b"stream: Some.Virus FOUND\0")

    async def body(s: ClamdScanner) -> None:
        assert await s.scan(data) == Scanned(True, "Some.Virus")

    fake_clamd(tmp_path / "fake.sock", answer)(body)
    assert got == [data]


def test_null_scanner_is_always_clean() -> None:
    assert asyncio.run(NullScanner().scan(testsigs.EICAR)) == CLEAN


def test_clamd_config_text(tmp_path: Path) -> None:
    text = clamd_config_text(
        socket=tmp_path / "s",
        database=tmp_path / "db",
        log_file=tmp_path / "l",
        max_scan_size=100 * 1024 * 1024,
    )
    lines = set(text.splitlines())
    assert {"Foreground yes", "AlertExceedsMax yes", "StreamMaxLength 101M"} <= lines
    assert {"MaxFileSize 200M", "MaxScanSize 400M"} <= lines
    assert not any(line.startswith("TCP") for line in lines)
    with pytest.raises(ValueError, match="at most 107"):
        clamd_config_text(
            socket=tmp_path / ("x" * 120),
            database=tmp_path,
            log_file=tmp_path / "l",
            max_scan_size=1,
        )


# --- [antivirus] in the config file --------------------------------------------------------


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("avcfg") / "pki"
    write_dev_pki(d, create_dev_pki(domain="pec.example.it", name="Example", now=PKI_NOW))
    return d


@pytest.fixture
def cfg_file(tmp_path: Path, pki_dir: Path) -> Iterator[Callable[[str], Path]]:
    shutil.copytree(pki_dir, tmp_path / "pki")

    def write(extra: str) -> Path:
        ports = {"smtps": 0, "submission": 0, "imaps": 0}
        path = tmp_path / "pecd.toml"
        base = config_text(domain="pec.example.it", name="Example", ports=ports)
        path.write_text(base + extra, "utf-8")
        return path

    yield write


def test_antivirus_off_by_default(cfg_file: Callable[[str], Path]) -> None:
    cfg = load_config(cfg_file(""))
    av = cfg.antivirus
    assert (av.enabled, av.socket, av.host, av.port) == (False, None, "", 3310)
    assert (av.timeout_seconds, av.max_scan_size, av.on_unavailable) == (60.0, None, "wait")
    assert isinstance(make_scanner(cfg), NullScanner)


def test_antivirus_socket(cfg_file: Callable[[str], Path], tmp_path: Path) -> None:
    cfg = load_config(
        cfg_file('\n[antivirus]\nenabled = true\nsocket = "av/clamd.sock"\ntimeout_seconds = 5\n')
    )
    assert cfg.antivirus.socket == (tmp_path / "av/clamd.sock").resolve()
    s = make_scanner(cfg)
    assert isinstance(s, ClamdScanner)
    assert (s.socket, s.host, s.timeout) == (cfg.antivirus.socket, None, 5)
    assert s.max_scan_size == cfg.limits.max_message_size  # the default


def test_antivirus_tcp(cfg_file: Callable[[str], Path]) -> None:
    cfg = load_config(
        cfg_file(
            '\n[limits]\nmax_message_size = "10M"\n'
            '\n[antivirus]\nenabled = true\nhost = "127.0.0.1"\nport = 3311\n'
            'max_scan_size = "12M"\n'
        )
    )
    s = make_scanner(cfg)
    assert isinstance(s, ClamdScanner)
    assert (s.socket, s.host, s.port, s.max_scan_size) == (None, "127.0.0.1", 3311, 12 << 20)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("enabled = true", "antivirus: enabled needs where clamd listens"),
        ('socket = "/run/c.sock"\nhost = "h"', "antivirus: set socket .* or host and port"),
        ('max_scan_size = "lots"', "antivirus.max_scan_size: not a size: 'lots'"),
        ("max_scan_size = 0", "antivirus.max_scan_size: must be more than 0"),
        ('max_scan_size = "1M"', r"antivirus.max_scan_size \(1048576\) must be at least limits"),
        ('on_unavailable = "deliver"', "antivirus.on_unavailable: Input should be 'wait'"),
        ("timeout_seconds = 0", "antivirus.timeout_seconds: Input should be greater than 0"),
        ("port = 70000", "antivirus.port: Input should be less than or equal to 65535"),
        ("managed = true", "antivirus: managed needs clamd_config"),
        ("enable = true", "antivirus.enable: is not a known key"),
    ],
)
def test_antivirus_mistakes(cfg_file: Callable[[str], Path], section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(cfg_file(f"\n[antivirus]\n{section}\n"))


# --- pecd init and pecd serve -----------------------------------------------------------------


@pytest.mark.slow
def test_init_configures_clamd_when_installed(tmp_path: Path) -> None:
    from pecd.clock import SystemClock
    from pecd.devinit import init_installation

    inst = tmp_path / "pecd-data"
    result = asyncio.run(
        init_installation(
            inst, domain="pec.test", name="Test PEC", clock=SystemClock(), antivirus=None
        )
    )
    assert result.clamd_config == (inst / "clamav/clamd.conf").resolve()
    cfg = load_config(result.config)
    av = cfg.antivirus
    assert av.enabled and av.managed and av.on_unavailable == "wait"
    assert av.socket == (inst / "clamav/clamd.sock").resolve()
    assert av.clamd_config == result.clamd_config
    assert sorted(p.name for p in (inst / "clamav/db").iterdir()) == [
        "pecd-test.hdb",
        "pecd-test.ndb",
    ]
    conf = result.clamd_config.read_text().splitlines()
    assert f"LocalSocket {av.socket}" in conf and "StreamMaxLength 101M" in conf


@pytest.mark.slow
def test_init_without_antivirus(tmp_path: Path) -> None:
    from pecd.clock import SystemClock
    from pecd.devinit import init_installation

    result = asyncio.run(
        init_installation(tmp_path / "i", domain="pec.test", name="Test PEC", clock=SystemClock())
    )
    assert result.clamd_config is None and not (tmp_path / "i/clamav").exists()
    assert load_config(result.config).antivirus.enabled is False


@pytest.mark.slow
def test_serve_starts_and_stops_its_clamd(tmp_path: Path) -> None:
    """``managed = true``: pecd serve starts clamd before it listens, and stops it on SIGTERM."""
    import signal

    from helpers import start
    from pecd.clock import SystemClock
    from pecd.devinit import ANTIVIRUS_SECTION, init_installation

    inst = tmp_path / "i"
    asyncio.run(
        init_installation(
            inst, domain="pec.test", name="Test PEC", clock=SystemClock(), antivirus=True
        )
    )
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    text = config_text(domain="pec.test", name="Test PEC", ports=ports) + ANTIVIRUS_SECTION
    (inst / "pecd.toml").write_text(text, "utf-8")
    cfg = load_config(inst / "pecd.toml")
    assert cfg.antivirus.socket is not None
    proc = start(cfg, tmp_path / "serve.log")
    try:
        assert clamd_pong(cfg.antivirus.socket)  # before pecd listens
        s = ClamdScanner(socket=cfg.antivirus.socket, max_scan_size=1 << 20)
        assert scan(s, testsigs.EICAR) == EICAR_FOUND
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "pecd: clamd (pid" in log and "pecd: stopped" in log
    assert not clamd_pong(cfg.antivirus.socket)
    assert not cfg.antivirus.socket.exists()  # clamd removed it: it ended, not orphaned


@pytest.mark.slow
def test_serve_refuses_to_start_without_its_clamd(tmp_path: Path, pki_dir: Path) -> None:
    import subprocess
    import sys

    shutil.copytree(pki_dir, tmp_path / "pki")
    conf = tmp_path / "clamd.conf"
    conf.write_text(
        f"Foreground yes\nLocalSocket {tmp_path}/c.sock\nDatabaseDirectory /nonexistent\n"
    )
    ports = {"smtps": free_port(), "submission": free_port(), "imaps": free_port()}
    text = config_text(domain="pec.example.it", name="Example", ports=ports) + (
        '\n[antivirus]\nenabled = true\nsocket = "c.sock"\nmanaged = true\n'
        'clamd_config = "clamd.conf"\n'
    )
    (tmp_path / "pecd.toml").write_text(text, "utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "pecd", "serve", "-c", str(tmp_path / "pecd.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "pecd: antivirus.managed: clamd -c" in out.stderr and "exited with" in out.stderr


def test_documented_example_section(cfg_file: Callable[[str], Path]) -> None:
    """config/pecd.example.toml's [antivirus], switched on, is a working clamd scanner."""
    example = (Path(__file__).resolve().parents[1] / "config/pecd.example.toml").read_text()
    section = example[example.index("[antivirus]") :]
    section = section[: section.index("\n[", 1)].replace("enabled = false", "enabled = true")
    cfg = load_config(cfg_file("\n" + section))
    s = make_scanner(cfg)
    assert isinstance(s, ClamdScanner)
    assert (s.socket, s.timeout) == (Path("/run/clamav/clamd.ctl"), 60)
    assert cfg.antivirus.on_unavailable == "wait" and not cfg.antivirus.managed
