"""The config file: the documented example loads, and every kind of mistake is one clear line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from helpers import PKI_NOW
from pecd.cli import main
from pecd.config import ConfigError, load_config
from pecd.devinit import config_text
from pecd.devpki import write_dev_pki
from pecd.pec.pki import create_dev_pki

EXAMPLE = Path(__file__).resolve().parents[1] / "config/pecd.example.toml"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cfg") / "pki"
    write_dev_pki(d, create_dev_pki(domain="pec.example.it", name="Example", now=PKI_NOW))
    return d


def install(tmp_path: Path, pki_dir: Path, text: str) -> Path:
    shutil.copytree(pki_dir, tmp_path / "pki", dirs_exist_ok=True)
    path = tmp_path / "pecd.toml"
    path.write_text(text, "utf-8")
    return path


def good(extra: str = "") -> str:
    ports = {"smtps": 0, "submission": 0, "imaps": 0}
    return config_text(domain="pec.example.it", name="Example", ports=ports) + extra


def test_documented_example_loads(tmp_path: Path, pki_dir: Path) -> None:
    cfg = load_config(install(tmp_path, pki_dir, EXAMPLE.read_text("utf-8")))
    assert cfg.provider.name == "Example PEC S.p.A."
    assert cfg.limits.max_message_size == 100 * 1024 * 1024
    assert cfg.listeners.reception is not None and cfg.listeners.reception.port == 25
    assert cfg.relay.expire_hours == 24 and cfg.routes == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\n[limits]\nmax_recipients = 10\n", "limits: max_recipients must be at least 50"),
        (
            '\n[limits]\nmax_message_size = "lots"\n',
            "limits.max_message_size: not a size: 'lots'",
        ),
        ("\n[queue]\nworkerz = 3\n", "queue.workerz: is not a known key"),
        ('\n[relay]\nstarttls = "maybe"\n', "relay.starttls: Input should be"),
        ('\n[routes]\n"pec.other.it" = "nohost"\n', "routes: 'nohost' is not host:port"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, pki_dir: Path, extra: str, message: str) -> None:
    path = install(tmp_path, pki_dir, good(extra))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)), text
    assert message in text, text


def test_hostname_must_be_a_host_name(tmp_path: Path, pki_dir: Path) -> None:
    """The name in the SMTP greeting, EHLO and Received: a line break would forge reply lines."""

    def with_hostname(value: str) -> str:
        return re.sub(r"(?m)^hostname = .*$", lambda _: f'hostname = "{value}"', good(), count=1)

    for bad in ("mx\\r\\n250 x", "two words", "-dash.example"):
        with pytest.raises(ConfigError, match=r"listeners\.hostname: .* is not a host name"):
            load_config(install(tmp_path, pki_dir, with_hostname(bad)))
    text = with_hostname("mx1.pec.example.it")
    assert load_config(install(tmp_path, pki_dir, text)).listeners.hostname == "mx1.pec.example.it"


def test_missing_key_file_and_bad_toml(tmp_path: Path, pki_dir: Path) -> None:
    path = install(tmp_path, pki_dir, good())
    (tmp_path / "pki/signing.key").unlink()
    with pytest.raises(ConfigError, match=r"signing.key: file .*signing.key does not exist"):
        load_config(path)
    path.write_text("[provider\nname=", "utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nothere.toml")


def test_serve_refuses_a_bad_file_with_one_line(
    tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = install(tmp_path, pki_dir, good("\n[provider2]\nx = 1\n"))
    assert main(["serve", "-c", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pecd: {path}: provider2: is not a known key", err
