"""``pecd init``: a working development installation in one directory."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from pecd.clock import Clock
from pecd.devpki import write_dev_pki
from pecd.pec.pki import create_dev_pki

CONFIG_NAME = "pecd.toml"
DEV_PORTS = {
    "smtps": 2465,
    "submission": 2587,
    "imaps": 2993,
    "pop3s": 2995,
    "reception": 2525,
    "https": 2443,
}


@dataclass(frozen=True)
class InitResult:
    config: Path
    mailboxes: dict[str, str]  # address -> password, shown once
    clamd_config: Path | None = None  # the clamd pecd serve starts, when antivirus is on


#: What `pecd init` adds when clamd is installed: `pecd serve` starts that clamd (managed) on
#: the signature database pecd generates (EICAR and Pecd.Test.Signature, nothing downloaded).
ANTIVIRUS_SECTION = """
[antivirus]
# Every message is scanned by clamd at both points; while clamd cannot answer, messages wait.
enabled = true
socket = "clamav/clamd.sock"
# `pecd serve` starts this clamd and stops it on exit (its database: clamav/db, generated).
managed = true
clamd_config = "clamav/clamd.conf"
"""


def config_text(*, domain: str, name: str, ports: dict[str, int], host: str = "127.0.0.1") -> str:
    return (
        f"""# pecd configuration, written by `pecd init`. Every key is documented in config/pecd.example.toml.
# Relative paths are relative to this file.

[provider]
name = "{name}"
domain = "{domain}"
service_address = "posta-certificata@{domain}"
mail_receipt = "ricevute@{domain}"
local_domains = ["{domain}"]

[signing]
key = "pki/signing.key"
cert = "pki/signing.pem"
# The signing certificate's issuer (the development intermediate CA), included in every
# signature, as every provider's signature carries AgID CA1.
chain = ["pki/chain.pem"]
# SHA-1 is the CMS profile every PEC provider emits today (Aruba, Sogei, Namirial up to Dec 2024:
# digestAlgorithm sha1, micalg="sha1", the issuing CA included): a peer whose checks expect it
# could make anything else an anomaly. "sha256" is the opt-in; pecd verifies both either way.
digest = "sha1"

[tls]
cert = "pki/tls.pem"
key = "pki/tls.key"
ca = "pki/ca.pem"

[storage]
data_dir = "data"

[listeners]
hostname = "localhost"
smtps = "{host}:{ports["smtps"]}"
submission = "{host}:{ports["submission"]}"
imaps = "{host}:{ports["imaps"]}"
"""
        + (f'pop3s = "{host}:{ports["pop3s"]}"\n' if "pop3s" in ports else "")
        + (f'reception = "{host}:{ports["reception"]}"\n' if "reception" in ports else "")
        + (f'https = "{host}:{ports["https"]}"\n' if "https" in ports else "")
    )


async def init_installation(
    directory: Path,
    *,
    domain: str,
    name: str,
    clock: Clock,
    demo: bool = True,
    mailbox_server: str = "pecd",
    mail_user: str | None = None,
    antivirus: bool | None = False,
) -> InitResult:
    """Write config + PKI + database + mailboxes into ``directory``; refuse to overwrite.

    ``antivirus``: write ``directory/clamav`` (a clamd.conf and the generated signature
    database) and an ``[antivirus]`` section whose clamd ``pecd serve`` starts; ``None``: only if
    clamd is installed (``pecd init``), ``False``: not (the default of this function).

    ``mailbox_server="dovecot"``: ``[mailbox] server = "dovecot"`` in the config and Dovecot's
    config in ``directory/dovecot`` (pecd.dovecot; ``mail_user``: the user it reads mail as)."""
    if mailbox_server not in ("pecd", "dovecot"):
        raise ValueError(f"unknown mailbox server {mailbox_server!r}")
    if mailbox_server == "dovecot":
        from pecd.dovecot import lookup_mail_user, write_config

        dovecot_user = lookup_mail_user(mail_user)  # before writing anything: no root, known
    from pecd.config import load_config
    from pecd.store.accounts import Accounts
    from pecd.store.db import Database, migrate_async

    cfg_path = directory / CONFIG_NAME
    if cfg_path.exists():
        raise FileExistsError(f"{cfg_path} already exists; pecd init does not overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    write_dev_pki(
        directory / "pki",
        create_dev_pki(domain=domain, name=name, now=clock.now(), intermediate=True),
    )
    text = config_text(domain=domain, name=name, ports=DEV_PORTS)
    if mailbox_server == "dovecot":
        text += (
            '\n[mailbox]\nserver = "dovecot"  # Dovecot serves IMAPS/POP3S: dovecot/dovecot.conf\n'
        )
    clamd_conf = _write_clamd(directory) if antivirus is not False else None
    if antivirus and clamd_conf is None:
        raise ValueError(
            "antivirus: clamd is not installed (Debian: apt-get install clamav-daemon),"
            f" or {directory.resolve()}/clamav/clamd.sock is too long for a unix socket"
        )
    if clamd_conf is not None:
        text += ANTIVIRUS_SECTION
    cfg_path.write_text(text, "utf-8")
    cfg = load_config(cfg_path)
    if mailbox_server == "dovecot":
        write_config(cfg, directory / "dovecot", mail_user=dovecot_user)
    cfg.storage.data_dir.mkdir(parents=True, exist_ok=True)
    await migrate_async(cfg.database_url)
    db = await Database.open(cfg.database_url)
    try:
        accounts = Accounts(db)
        await accounts.add_domain(domain)
        made: dict[str, str] = {}
        wanted = [cfg.provider.mail_receipt] + (
            [f"alice@{domain}", f"bob@{domain}"] if demo else []
        )
        for addr in wanted:
            pw = secrets.token_urlsafe(12)
            await accounts.add_mailbox(addr, pw)
            made[addr] = pw
    finally:
        await db.close()
    return InitResult(cfg_path, made, clamd_conf)


def _write_clamd(directory: Path) -> Path | None:
    """``directory/clamav``: clamd.conf and the generated database, sized for the default
    message limit; None if clamd is not installed or the socket path would be too long."""
    from pecd.antivirus.clamd import MAX_SOCKET_PATH, clamd_binary, write_clamd
    from pecd.config import LimitsConfig

    where = directory.resolve() / "clamav"
    if clamd_binary() is None or len(str(where / "clamd.sock")) > MAX_SOCKET_PATH:
        return None
    return write_clamd(where, max_scan_size=LimitsConfig().max_message_size).config
