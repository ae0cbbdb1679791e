"""Dovecot as the mailbox server over pecd's Maildir tree: its configuration, written by pecd.

``pecd init --mailbox-server dovecot`` and ``pecd dovecot-config`` write ``dovecot/`` beside
``pecd.toml``::

    dovecot/dovecot.conf     the whole configuration (nothing from /etc/dovecot is read)
    dovecot/sql.conf.ext     the passdb: pecd's ``mailboxes`` table, same argon2id hashes
    dovecot/sql-app-passwords.conf.ext   the passdb of app passwords (``app_passwords``)
    dovecot/run/             base_dir (sockets, the master pid)
    dovecot/state/           state_dir
    dovecot/dovecot.log      the log

Run it with ``dovecot -c dovecot/dovecot.conf`` (``-F`` in the foreground) and stop it with
``doveadm -c dovecot/dovecot.conf stop``. Everything lives under that directory, so it does not
clash with a system Dovecot. The decisions, explained in docs/dovecot.md:

* ``mail_location = maildir:<maildir_root>/%Ld/%Ln``: ``MaildirStore.path_for`` (INBOX at the
  root, Maildir++ subfolders ``.Sent``), the layout Dovecot's maildir reads by default; UIDs in
  each folder's ``dovecot-uidlist``, which pecd's IMAP and POP3 share (``pecd.mailbox.uidlist``).
* one mail user for everything: pecd writes message files 0600, so Dovecot's mail processes
  (``userdb static``: uid, gid, home) run as the user that owns the Maildir tree, and the SQL
  auth worker as that user too (it opens pecd's SQLite database, WAL mode).
* passdb sql: ``'{ARGON2ID}' || password_hash`` of enabled mailboxes, so a holder's one password
  works with both servers. Driver sqlite for the default database, pgsql for PostgreSQL. As
  with pecd's own servers (``Accounts.authenticate``), the mailbox password is not taken for a
  mailbox with TOTP enabled or required (``mailbox_security``): such a mailbox logs in with app
  passwords, which a first passdb finds by their SHA-256: the query names the digest Dovecot
  computes of what the client typed (``%{sha256:password}``), and Dovecot checks the password against
  the row's ``{SHA256.HEX}`` once more. Dovecot does not canonicalise what is typed, so there an
  app password must be typed as it was shown (lowercase, with its dashes). No auth cache, so
  that a change (password, disable, second factor, revocation) counts at the next login.
* TLS only: ``ssl = required``, ``disable_plaintext_auth = yes``, ``auth_mechanisms = plain
  login``; implicit TLS on ``listeners.imaps`` / ``listeners.pop3s``, STARTTLS on
  ``listeners.imap`` / ``listeners.pop3`` when they are set.
* ``pop3_uidl_format = %08Xu%08Xv``: the UIDL pecd's own POP3 gives, so a client that moves
  from one server to the other downloads nothing twice.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from pecd.config import Config, Endpoint

__all__ = [
    "DovecotFiles",
    "MailUser",
    "lookup_mail_user",
    "mail_user_for",
    "render",
    "write_config",
]

CONF_NAME = "dovecot.conf"
SQL_NAME = "sql.conf.ext"
APP_SQL_NAME = "sql-app-passwords.conf.ext"


@dataclass(frozen=True)
class MailUser:
    """The system user Dovecot's mail processes run as (the owner of the Maildir tree)."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class DovecotFiles:
    directory: Path
    conf: Path
    sql: Path
    log: Path
    base_dir: Path
    app_sql: Path | None = None


def mail_user_for(cfg: Config, name: str | None = None) -> MailUser:
    """``name`` from the passwd database, or else the owner of the Maildir tree (of the data
    directory before the tree exists; the current user before either exists)."""
    if name is not None:
        pw = pwd.getpwnam(name)
        return MailUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    for path in (cfg.maildir_root, cfg.storage.data_dir):
        if path.exists():
            st = path.stat()
            uid, gid = st.st_uid, st.st_gid
            break
    else:
        uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return MailUser(user, uid, gid)


def lookup_mail_user(name: str | None = None) -> MailUser:
    """``name`` (default: the user running this) as a MailUser; ValueError for an unknown user
    or root, which Dovecot refuses to read mail as ("userdb returned 0 as uid")."""
    try:
        pw = pwd.getpwnam(name) if name is not None else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ValueError(f"no such user: {name}") from None
    user = MailUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    _check_not_root(user)
    return user


def _check_not_root(user: MailUser) -> None:
    if user.uid == 0:
        raise ValueError(
            "Dovecot does not read mail as root: name the user pecd runs as (--mail-user), "
            "which must own the data directory"
        )


def _quote(value: str) -> str:
    """A Dovecot config value in double quotes (paths with spaces, passwords)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sql_connect(cfg: Config) -> tuple[str, str]:
    """Dovecot's SQL ``driver`` and ``connect`` for pecd's database."""
    url = make_url(cfg.database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database:
            raise ValueError("an in-memory SQLite database cannot be shared with Dovecot")
        driver = "sqlite"
        connect = str(Path(url.database).resolve())
    elif backend == "postgresql":
        driver = "pgsql"
        parts = []
        for key, value in (
            ("host", url.host),
            ("port", str(url.port) if url.port else None),
            ("dbname", url.database),
            ("user", url.username),
            ("password", url.password),
        ):
            if value:
                escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
                parts.append(f"{key}='{escaped}'")
        connect = " ".join(parts)
    else:
        raise ValueError(f"Dovecot cannot read a {backend} database")
    return driver, connect


def _sql_text(cfg: Config) -> str:
    driver, connect = _sql_connect(cfg)
    # %Lu: the login name lowercased (addresses are stored lowercase); Dovecot escapes it.
    # "user" is returned so that Dovecot continues with the canonical address. No row for a
    # mailbox with TOTP enabled or required: its password alone opens it to no mail client.
    return f"""# Written by pecd: the passdb of pecd's mailboxes (see docs/dovecot.md).
driver = {driver}
connect = {connect}
default_pass_scheme = ARGON2ID
password_query = SELECT address AS user, '{{ARGON2ID}}' || password_hash AS password \\
  FROM mailboxes WHERE address = '%Lu' AND NOT disabled \\
  AND NOT EXISTS (SELECT 1 FROM mailbox_security s WHERE s.mailbox = mailboxes.address \\
    AND (s.totp_enabled_at IS NOT NULL OR s.totp_required))
"""


def _app_sql_text(cfg: Config) -> str:
    driver, connect = _sql_connect(cfg)
    # %{sha256:password}: the SHA-256 (hex) of the password the client typed (escaped like every
    # variable), so the row is found by its digest, as pecd finds it (pecd.store.security).
    # substr(..., 8) drops the "sha256:" prefix.
    return f"""# Written by pecd: the passdb of pecd's app passwords (see docs/accounts-security.md).
driver = {driver}
connect = {connect}
default_pass_scheme = SHA256.HEX
password_query = SELECT a.mailbox AS user, \\
    '{{SHA256.HEX}}' || substr(a.password_hash, 8) AS password \\
  FROM app_passwords a JOIN mailboxes m ON m.address = a.mailbox \\
  WHERE a.mailbox = '%Lu' AND a.password_hash = 'sha256:%{{sha256:password}}' \\
    AND a.revoked_at IS NULL AND NOT m.disabled
"""


def _listener(kind: str, name: str, endpoint: Endpoint | None, *, ssl: bool) -> str:
    if endpoint is None:
        return f"  inet_listener {name} {{\n    port = 0\n  }}\n"
    return (
        f"  inet_listener {name} {{\n"
        f"    address = {endpoint.host}\n"
        f"    port = {endpoint.port}\n"
        f"    ssl = {'yes' if ssl else 'no'}\n"
        f"  }}\n"
    )


def render(
    cfg: Config,
    directory: Path,
    *,
    mail_user: MailUser | None = None,
    internal_user: str = "dovecot",
    login_user: str = "dovenull",
) -> dict[str, str]:
    """The files of ``directory`` (name -> text) for ``cfg``."""
    directory = directory.resolve()
    user = mail_user or mail_user_for(cfg)
    _check_not_root(user)
    lst = cfg.listeners
    protocols = []
    if lst.imaps or lst.imap:
        protocols.append("imap")
    if lst.pop3s or lst.pop3:
        protocols.append("pop3")
    if not protocols:
        raise ValueError("no IMAP or POP3 listener configured ([listeners] imaps, pop3s)")
    root = cfg.maildir_root.resolve()
    home = f"{root}/%Ld/%Ln"
    per_ip = cfg.security.max_connections_per_address
    conf = f"""# Dovecot for pecd, written by pecd (`pecd dovecot-config` rewrites it; see docs/dovecot.md).
# Run: dovecot -c {directory / CONF_NAME}    Stop: doveadm -c {directory / CONF_NAME} stop
instance_name = pecd
base_dir = {_quote(str(directory / "run"))}
state_dir = {_quote(str(directory / "state"))}
log_path = {_quote(str(directory / "dovecot.log"))}
info_log_path = {_quote(str(directory / "dovecot.log"))}
protocols = {" ".join(protocols)}
listen = 127.0.0.1
shutdown_clients = yes

# Users: login processes and the auth process as Dovecot's own unprivileged users; mail and
# the SQL auth worker as the owner of pecd's Maildir tree ({user.name}), whose files are 0600.
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = {min(user.uid, 500)}
first_valid_gid = {min(user.gid, 500)}

# pecd's Maildir tree: root/<domain>/<localpart>, INBOX at the top, Maildir++ ".Sent".
mail_location = maildir:{home}
mail_uid = {user.uid}
mail_gid = {user.gid}
mail_fsync = always
# CRLF files, as pecd writes them: pecd's IMAP and POP3 serve file bytes as they are.
mail_save_crlf = yes
maildir_copy_with_hardlinks = yes
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
}}

# TLS only, with pecd's certificate.
ssl = required
ssl_cert = <{cfg.tls.cert.resolve()}
ssl_key = <{cfg.tls.key.resolve()}
ssl_min_protocol = TLSv1.2
ssl_prefer_server_ciphers = yes
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_username_format = %Lu
# No auth cache: a cache hit still verifies the password against the cached argon2id hash
# (measured: the same ~150 ms a login), so it would save one SQL query while letting a changed
# password, a disabled mailbox, a second factor just enabled or an app password just revoked
# work on for its TTL. Without it every change in pecd's database counts at the next login.
auth_cache_size = 0
auth_failure_delay = 2 secs

# App passwords first: found by their SHA-256 with no argon2id check, the way mail clients of
# a mailbox with a second factor log in. Then the mailbox password (argon2id).
passdb {{
  driver = sql
  args = {directory / APP_SQL_NAME}
}}
passdb {{
  driver = sql
  args = {directory / SQL_NAME}
}}
userdb {{
  driver = static
  args = uid={user.uid} gid={user.gid} home={home}
}}

service auth-worker {{
  user = {user.name}
}}
service imap-login {{
{_listener("imap", "imap", lst.imap, ssl=False)}{_listener("imap", "imaps", lst.imaps, ssl=True)}}}
service pop3-login {{
{_listener("pop3", "pop3", lst.pop3, ssl=False)}{_listener("pop3", "pop3s", lst.pop3s, ssl=True)}}}

protocol imap {{
  mail_max_userip_connections = {per_ip}
}}
protocol pop3 {{
  mail_max_userip_connections = {per_ip}
  # The UIDL pecd's own POP3 gives: UID then UIDVALIDITY, 8 hex digits each.
  pop3_uidl_format = %08Xu%08Xv
}}
"""
    return {CONF_NAME: conf, SQL_NAME: _sql_text(cfg), APP_SQL_NAME: _app_sql_text(cfg)}


def write_config(
    cfg: Config,
    directory: Path | None = None,
    *,
    mail_user: MailUser | None = None,
    internal_user: str = "dovecot",
    login_user: str = "dovenull",
) -> DovecotFiles:
    """Write ``dovecot.conf``, ``sql.conf.ext`` and ``sql-app-passwords.conf.ext`` into
    ``directory`` (default: ``dovecot/`` beside the config file) and make its run/ and state/
    directories."""
    if directory is None:
        if cfg.source is None:
            raise ValueError("no directory given and the config has no file")
        directory = cfg.source.parent / "dovecot"
    directory = directory.resolve()
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    for sub in ("run", "state"):
        (directory / sub).mkdir(mode=0o755, exist_ok=True)
    texts = render(
        cfg, directory, mail_user=mail_user, internal_user=internal_user, login_user=login_user
    )
    for name, text in texts.items():
        path = directory / name
        tmp = path.with_name(path.name + ".tmp")
        # sql.conf.ext may hold the PostgreSQL password: readable by its owner only (Dovecot
        # reads it as root before dropping privileges).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return DovecotFiles(
        directory,
        directory / CONF_NAME,
        directory / SQL_NAME,
        directory / "dovecot.log",
        directory / "run",
        directory / APP_SQL_NAME,
    )
