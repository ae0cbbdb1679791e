"""pymap's maildir backend adapted to pecd: logins from pecd accounts, mailboxes at MaildirStore paths.

pymap (0.36) is used as a library. What is replaced and why:

* ``PecdLogin`` / ``PecdIdentity`` stand in for pymap's ``Login``/``Identity`` (which read
  pymap's own users and passwords files): the password goes to pecd's ``Authenticator`` and the
  mailbox directory is ``MaildirStore.path_for(address)``.
* ``ExactMaildir`` / ``ExactMailboxData`` / ``ExactMailboxSet`` keep message bytes exact. pymap
  reads a message through ``email`` parsing and re-serialisation (``bytes(MaildirMessage)``),
  which can refold headers and mix line endings, and its APPEND writes a re-generated copy;
  both would break S/MIME signatures, which PEC holders must be able to verify. Its COPY writes
  an empty message (it copies the metadata-only object). Here the file bytes are served as
  stored, APPEND stores the literal (bare LF made CRLF), and COPY copies the file.
* Folder names that could leave the user's directory (".", "..", names with ".") are refused:
  pymap's Maildir++ layout maps "." to the ``..`` directory.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import socket
import time
from argparse import Namespace
from collections.abc import AsyncIterator, Iterable, Sequence, Set
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from mailbox import MaildirMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import FilterSet, Session
from pymap.backend.maildir.flags import MaildirFlags
from pymap.backend.maildir.layout import MaildirLayout
from pymap.backend.maildir.mailbox import MailboxData, Maildir, Message
from pymap.concurrent import Subsystem
from pymap.context import socket_info
from pymap.exceptions import (
    AuthorizationFailure,
    InvalidAuth,
    NotAllowedError,
    ResponseError,
)
from pymap.interfaces.login import IdentityInterface, LoginInterface
from pymap.interfaces.token import TokenCredentials, TokensInterface
from pymap.parsing.message import AppendMessage
from pymap.parsing.response import ResponseCode, ResponseNo
from pymap.parsing.response.code import AppendUid, CopyUid
from pymap.parsing.specials import ObjectId, SequenceSet
from pymap.parsing.specials.flag import Flag, Wildcard
from pymap.selected import SelectedMailbox
from pymap.user import UserMetadata
from pysasl import SASLAuth
from pysasl.creds.server import ServerCredentials
from pysasl.exception import MechanismUnusable
from pysasl.hashing import BuiltinHash

from pecd.imap import structure
from pecd.imap.uids import UidListMailboxData, UidListMailboxSet, mailbox_id_of
from pecd.mailbox.maildir import MaildirStore, to_crlf, write_atomic
from pecd.pec.address import normalize_address

if TYPE_CHECKING:
    from pecd.guard import Guard

__all__ = [
    "Authenticator",
    "ExactMailboxData",
    "ExactMailboxSet",
    "ExactMaildir",
    "OverQuota",
    "PecdIdentity",
    "PecdImapConfig",
    "PecdLogin",
    "PecdMaildirFlags",
    "PecdSession",
    "QuotaLookup",
]

_log = logging.getLogger(__name__)


class Authenticator(Protocol):
    """Checks a login against pecd accounts (``pecd.store.accounts.Accounts`` fits)."""

    async def authenticate(self, address: str, password: str) -> str | None:
        """The canonical address of the mailbox, or None when the login is refused."""
        ...


class HasQuota(Protocol):
    """A mailbox record with its storage quota (``pecd.store.models.Mailbox`` fits)."""

    @property
    def quota_bytes(self) -> int | None: ...


@runtime_checkable
class QuotaLookup(Protocol):
    """An Authenticator that can also tell a mailbox's quota (``Accounts`` fits).

    When the Authenticator given to IMAP has this ``get``, APPEND and COPY are refused with
    ``NO [OVERQUOTA]`` past the quota and GETQUOTA answers it; otherwise mailboxes are unlimited.
    """

    async def get(self, address: str) -> HasQuota | None: ...


# -- exact message bytes ----------------------------------------------------------------------


class ExactMessage(MaildirMessage):
    """A MaildirMessage whose ``bytes()`` are the file's bytes, not a re-serialisation."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def __bytes__(self) -> bytes:
        return self._raw

    def as_bytes(self, unixfrom: bool = False, policy: Any = None) -> bytes:
        return self._raw


# FETCH BODYSTRUCTURE, BODY, ENVELOPE, BODY[section] and RFC822.SIZE from these bytes (RFC 3501,
# Dovecot-compatible) instead of pymap's email-based parse: see pecd.imap.structure.
structure.install()


def _unique_name(size: int) -> str:
    """A Dovecot-style unique Maildir base name: ``<secs>.M<usecs>P<pid>R<rand>.<host>,S=<size>``."""
    now = time.time()
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")
    usecs = int(now % 1 * 1e6)
    return f"{int(now)}.M{usecs}P{os.getpid()}R{secrets.token_hex(4)}.{host},S={size}"


class ExactMaildir(Maildir):
    """pymap's Maildir, reading and writing message files byte for byte."""

    def get_message(self, key: str) -> ExactMessage:
        subpath = self._lookup(key)
        path = self._join(subpath)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below, after one retry
        except FileNotFoundError:
            # Another session moved it from new/ to cur/ (or renamed it with new flags) after
            # the lookup: look again. Without this pymap would serve it as expunged.
            self._refresh()  # type: ignore[attr-defined]
            subpath = self._lookup(key)
            path = self._join(subpath)
            fh = open(path, "rb")  # noqa: SIM115
        with fh:
            # CRLF on the wire (RFC 3501): files pecd wrote are CRLF already and served as
            # they are; a bare-LF file (Dovecot without mail_save_crlf, its LDA) is converted.
            msg = ExactMessage(to_crlf(fh.read()))
        subdir, name = self._split(subpath)
        msg.set_subdir(subdir)
        if self.colon in name:
            msg.set_info(name.rsplit(self.colon, 1)[-1])
        msg.set_date(os.path.getmtime(path))
        return msg

    def add_exact(self, data: bytes, meta: MaildirMessage) -> str:
        """Store ``data`` (bare LF made CRLF) with the subdir, flags and date of ``meta``.

        Returns the new message's key. Atomic: tmp/, fsync, link, fsync directory.
        """
        body = to_crlf(data)
        key = _unique_name(len(body))
        info = meta.get_info()
        name = key + (self.colon + info if info else "")
        dest = write_atomic(
            Path(self._path), name, body, subdir=meta.get_subdir(), mtime=meta.get_date()
        )
        if dest is None:  # pragma: no cover - a random 32-bit suffix plus pid and time collided
            raise FileExistsError(name)
        return key


# -- keywords ---------------------------------------------------------------------------------

_KEYWORD_CODES = "abcdefghijklmnopqrstuvwxyz"


class PecdMaildirFlags(MaildirFlags):
    """pymap's keyword table that also *adds* keywords, in Dovecot's ``dovecot-keywords`` file.

    pymap only reads the file, so a keyword a client sets is dropped. Here a keyword not in
    the table yet gets the next free letter (Dovecot's layout: line ``<n> <keyword>`` is letter
    ``a`` + n, at most 26), written under a lock and renamed into place; a letter another
    session added meanwhile is picked up by re-reading the file.
    """

    def _reload(self) -> None:
        try:
            with open(self.get_file(self.path)) as fp:
                self.read(fp)
        except FileNotFoundError:
            pass
        except ValueError as exc:
            _log.warning("IMAP: unreadable %s: %s", self.get_file(self.path), exc)

    def _allocate(self, keywords: Sequence[Flag]) -> None:
        lock_path = os.path.join(self.path, "dovecot-keywords.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._reload()
            table: dict[int, Flag] = {
                ord(code) - ord("a"): flag for code, flag in self._to_kwd.items()
            }
            changed = False
            for flag in keywords:
                if flag in self._from_kwd or flag in table.values():
                    continue
                free = [i for i in range(len(_KEYWORD_CODES)) if i not in table]
                if not free:
                    _log.info("IMAP: no free keyword letter in %s for %r", self.path, flag)
                    break
                table[free[0]] = flag
                changed = True
            if changed:
                text = "".join(f"{i} {table[i].value.decode('ascii')}\n" for i in sorted(table))
                tmp = self.get_file(self.path) + f".{os.getpid()}.tmp"
                with open(tmp, "w") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.get_file(self.path))
                self._reload()
        finally:
            os.close(fd)

    def to_maildir(self, flags: Iterable[bytes | Flag]) -> str:
        wanted = [flag if isinstance(flag, Flag) else Flag(flag) for flag in flags]
        missing = [
            flag
            for flag in wanted
            if not flag.is_system and flag != Wildcard and flag not in self._from_kwd
        ]
        if missing:
            self._allocate(missing)
        return super().to_maildir(wanted)

    def from_maildir(self, codes: str) -> frozenset[Flag]:
        head = codes.split(",", 1)[0]
        if any(c in _KEYWORD_CODES and c not in self._to_kwd for c in head):
            self._reload()
        return super().from_maildir(codes)


class ExactMailboxData(UidListMailboxData):
    """pymap's MailboxData with APPEND and COPY that keep the message bytes."""

    def __init__(self, mailbox_id: ObjectId, maildir: ExactMaildir, path: str) -> None:
        super().__init__(mailbox_id, maildir, path)
        self._exact = maildir
        self._dir = path

    @property
    def maildir_flags(self) -> MaildirFlags:
        if self._flags is None:
            self._flags = PecdMaildirFlags.file_read(self._dir)
        return self._flags

    @property
    def permanent_flags(self) -> frozenset[Flag]:
        # "\\*": clients may create keywords (PecdMaildirFlags stores them).
        return self.maildir_flags.permanent_flags | {Wildcard}

    async def sizes(self, uids: Iterable[int]) -> int:
        """The total size in bytes of the messages with these UIDs (missing ones count 0)."""
        by_uid = (await self._sync()).by_uid()
        return sum(by_uid[uid].size for uid in uids if uid in by_uid)

    @staticmethod
    def _meta(flags: str, *, recent: bool, when: float) -> MaildirMessage:
        meta = MaildirMessage()
        meta.set_flags(flags)
        meta.set_subdir("new" if recent else "cur")
        meta.set_date(when)
        return meta

    async def append(self, append_msg: AppendMessage, *, recent: bool = False) -> Message:
        email_id = ObjectId.random_email_id()
        thread_id = ObjectId.random_thread_id()
        when = (append_msg.when or datetime.now(UTC)).timestamp()
        flags = self.maildir_flags.to_maildir(append_msg.flag_set)
        meta = self._meta(flags, recent=recent, when=when)
        async with self.messages_lock.write_lock():
            key = await asyncio.to_thread(self._exact.add_exact, append_msg.literal, meta)
        fields = {"E": str(email_id), "T": str(thread_id)}
        record = await self._add_record(key, meta.get_info(), fields)
        return Message.from_maildir(
            record.uid, meta, self._exact, key, email_id, thread_id, self.maildir_flags
        )

    async def copy(self, uid: int, destination: MailboxData, *, recent: bool = False) -> int | None:
        if not isinstance(destination, ExactMailboxData):  # pragma: no cover - one backend
            raise TypeError(destination)
        try:
            record, meta = await self._get_maildir_msg(uid)
            async with self.messages_lock.read_lock():
                data = bytes(self._exact.get_message(record.key))
        except (KeyError, FileNotFoundError):
            return None
        copy_meta = self._meta(meta.get_flags(), recent=recent, when=meta.get_date())
        async with destination.messages_lock.write_lock():
            key = await asyncio.to_thread(destination._exact.add_exact, data, copy_meta)
        new_record = await destination._add_record(key, copy_meta.get_info(), dict(record.fields))
        return new_record.uid


# -- folder names -----------------------------------------------------------------------------


def _check_name(name: str, delimiter: str) -> None:
    """Refuse names the Maildir++ layout would map outside the user's directory or misread."""
    if name == "INBOX":
        return
    for part in name.split(delimiter):
        if not part or "." in part or any(c in part for c in "\\\x00\r\n"):
            raise NotAllowedError("Invalid mailbox name: '.' and empty levels are not allowed.")


class ExactMailboxSet(UidListMailboxSet):
    """pymap's MailboxSet handing out ExactMailboxData, with folder names checked."""

    def __init__(self, maildir: ExactMaildir, layout: MaildirLayout[Any]) -> None:
        super().__init__(maildir, layout)
        self._inbox = maildir
        self._folders = layout
        self._mailboxes: dict[str, ExactMailboxData] = {}

    async def get_mailbox(self, name: str) -> ExactMailboxData:
        try:
            _check_name(name, self.delimiter)
        except NotAllowedError as exc:
            raise KeyError(name) from exc
        mbx = self._mailboxes.get(name)
        if mbx is None:
            maildir: Maildir
            if name == "INBOX":
                maildir = self._inbox
            else:
                try:
                    maildir = self._folders.get_folder(name, self.delimiter)
                except FileNotFoundError as exc:
                    raise KeyError(name) from exc
            assert isinstance(maildir, ExactMaildir)
            path = self._folders.get_path(name, self.delimiter)
            mailbox_id = await mailbox_id_of(path)  # the list's GUID (pecd.mailbox.uidlist)
            mbx = ExactMailboxData(mailbox_id, maildir, path)
            self._mailboxes[name] = mbx
        elif name != "INBOX" and not os.path.isdir(self._folders.get_path(name, self.delimiter)):
            del self._mailboxes[name]  # deleted or renamed since we cached it
            raise KeyError(name)
        await mbx.reset()
        return mbx

    async def add_mailbox(self, name: str) -> ObjectId:
        _check_name(name, self.delimiter)
        return await super().add_mailbox(name)

    async def delete_mailbox(self, name: str) -> None:
        _check_name(name, self.delimiter)
        self._mailboxes.pop(name, None)
        await super().delete_mailbox(name)

    async def rename_mailbox(self, before: str, after: str) -> None:
        _check_name(before, self.delimiter)
        _check_name(after, self.delimiter)
        prefix = before + self.delimiter
        for cached in [n for n in self._mailboxes if n == before or n.startswith(prefix)]:
            del self._mailboxes[cached]
        await super().rename_mailbox(before, after)


# -- logins -----------------------------------------------------------------------------------


class PecdImapConfig(MaildirConfig):
    """pymap's maildir config for one pecd listener.

    ``tls_enabled`` is pymap's "offer STARTTLS" switch: False on the implicit-TLS listener (the
    socket is already encrypted, so login mechanisms are offered at once), True on the plain
    listener (STARTTLS offered, LOGINDISABLED until it has run).
    """

    def __init__(
        self,
        *,
        store: MaildirStore,
        ssl_context: Any,
        tls_enabled: bool,
        host: str,
        port: int,
        hostname: str,
        failed_login_delay: float,
    ) -> None:
        args = Namespace(passlib_cfg=None, proxy_protocol=None, debug=False)
        super().__init__(
            args,
            host=host,
            port=port,
            base_dir=str(store.root),
            layout="++",
            colon=None,
            ssl_context=ssl_context,
            tls_enabled=tls_enabled,
            subsystem=Subsystem.for_asyncio(),
            cpu_subsystem=Subsystem.for_asyncio(),
            hash_context=BuiltinHash(),
            invalid_user_sleep=failed_login_delay,
            reject_dnsbl=False,
        )
        self.store = store
        self._hostname = hostname

    @property
    def tls_auth(self) -> SASLAuth:
        # Only mechanisms that carry the password itself: pecd stores password hashes.
        return SASLAuth.named([b"PLAIN", b"LOGIN"])

    @property
    def greeting(self) -> bytes:
        # pymap's default calls socket.getfqdn() on every connection (a DNS lookup).
        return b"pecd IMAP ready " + self._hostname.encode("ascii", "replace")


class _SecretCapture:
    """A pysasl Identity that accepts anything and keeps the secret it was shown.

    pysasl credentials only reveal their password to ``verify(identity)``; pecd checks the
    password itself (argon2 hashes in the account store), so this captures it for that check.
    """

    def __init__(self) -> None:
        self.secret: str | None = None

    @property
    def authcid(self) -> str:
        return ""

    def compare_authcid(self, authcid: str) -> bool:
        return True

    def compare_secret(self, secret: str) -> bool:
        self.secret = secret
        return True

    def get_clear_secret(self) -> str | None:
        return None


class AuthUnavailable(ResponseError):
    """The account store could not be asked (``NO [UNAVAILABLE]``): the client should retry."""

    def get_response(self, tag: bytes) -> ResponseNo:
        return ResponseNo(
            tag, b"Login temporarily unavailable, try again later.", ResponseCode.of(b"UNAVAILABLE")
        )


class OverQuota(ResponseError):
    """APPEND or COPY would take the mailbox past its quota (``NO [OVERQUOTA]``, RFC 9208)."""

    def get_response(self, tag: bytes) -> ResponseNo:
        return ResponseNo(tag, b"Mailbox quota exceeded.", ResponseCode.of(b"OVERQUOTA"))


class PecdSession(Session):
    """pymap's maildir session with the mailbox quota enforced on APPEND and COPY.

    Every folder counts against one quota (``MaildirStore.usage``). MOVE is not checked: it
    renames within the mailbox, so it never adds to the usage, and refusing it would keep an
    over-quota holder from moving mail to Trash.
    """

    def __init__(
        self,
        owner: str,
        config: PecdImapConfig,
        mailbox_set: ExactMailboxSet,
        filter_set: FilterSet,
        *,
        quotas: QuotaLookup | None,
    ) -> None:
        super().__init__(owner, config, mailbox_set, filter_set)
        self._store = config.store
        self._quotas = quotas

    async def quota(self) -> tuple[int, int | None]:
        """(bytes used by every folder, quota in bytes or None for unlimited)."""
        limit: int | None = None
        if self._quotas is not None:
            record = await self._quotas.get(self.owner)
            limit = record.quota_bytes if record is not None else None
        used = await asyncio.to_thread(self._store.usage, self.owner)
        return used, limit

    async def _check_quota(self, adding: int) -> None:
        if self._quotas is None:
            return
        used, limit = await self.quota()
        if limit is not None and used + adding > limit:
            raise OverQuota()

    async def append_messages(
        self,
        name: str,
        messages: Sequence[AppendMessage],
        selected: SelectedMailbox | None = None,
    ) -> tuple[AppendUid, SelectedMailbox | None]:
        await self._check_quota(sum(len(msg.literal) for msg in messages))
        return await super().append_messages(name, messages, selected)

    async def copy_messages(
        self, selected: SelectedMailbox, sequence_set: SequenceSet, mailbox: str
    ) -> tuple[CopyUid | None, SelectedMailbox]:
        if self._quotas is not None:
            source = await self._get_selected(selected)
            uids = [uid for _, uid in selected.messages.get_uids(sequence_set)]
            size = await source.sizes(uids) if isinstance(source, ExactMailboxData) else 0
            await self._check_quota(size)
        return await super().copy_messages(selected, sequence_set, mailbox)


def _peer_address() -> str:
    """The client's IP address on the current connection (pymap's socket_info)."""
    try:
        info = socket_info.get()
    except LookupError:
        return "?"
    ip = info.peername_ip
    return str(ip) if ip is not None else str(info.peername_str or "?")


class _NoTokens(TokensInterface):
    """pecd issues no pymap bearer tokens."""

    def get_login_token(
        self,
        identifier: str,
        authcid: str,
        key: bytes,
        *,
        authzid: str | None = None,
        location: str | None = None,
        expiration: datetime | None = None,
    ) -> str | None:
        return None

    def get_admin_token(
        self,
        admin_key: bytes | None,
        *,
        authzid: str | None = None,
        location: str | None = None,
        expiration: datetime | None = None,
    ) -> str | None:
        return None

    def parse(
        self, authzid: str, token: str, *, admin_keys: Set[bytes] = frozenset()
    ) -> TokenCredentials:
        raise ValueError("tokens are not supported")


class PecdLogin(LoginInterface):
    """Checks LOGIN/AUTHENTICATE credentials through pecd's Authenticator."""

    def __init__(
        self, auth: Authenticator, config: PecdImapConfig, *, guard: Guard | None = None
    ) -> None:
        self._auth = auth
        self._config = config
        self._tokens = _NoTokens()
        self._guard = guard
        self._quotas = auth if isinstance(auth, QuotaLookup) else None

    @property
    def tokens(self) -> TokensInterface:
        return self._tokens

    async def _refuse(self) -> InvalidAuth:
        # Slows password guessing; pymap's own login does the same for unknown users.
        await asyncio.sleep(self._config.invalid_user_sleep)
        return InvalidAuth()

    async def authenticate(self, credentials: ServerCredentials) -> PecdIdentity:
        if isinstance(credentials, TokenCredentials):
            raise await self._refuse()
        capture = _SecretCapture()
        try:
            credentials.verify(capture)
        except MechanismUnusable:
            raise await self._refuse() from None
        if capture.secret is None:
            raise await self._refuse()
        peer = _peer_address()
        if self._guard is not None:
            await self._guard.before_login(peer, credentials.authcid)
        try:
            canonical = await self._auth.authenticate(credentials.authcid, capture.secret)
        except Exception as exc:
            _log.warning(
                "IMAP login for %r: account store unavailable: %s", credentials.authcid, exc
            )
            _log.debug("account store failure", exc_info=True)
            if self._guard is not None:  # no outcome: the reserved attempt stops counting
                self._guard.release(peer, credentials.authcid)
            raise AuthUnavailable() from exc
        if canonical is None:
            if self._guard is not None:
                self._guard.failed("imap", peer, credentials.authcid)
            else:
                _log.info("IMAP login refused for %r", credentials.authcid)
            raise await self._refuse()
        if self._guard is not None:
            self._guard.succeeded(peer, credentials.authcid)
        return PecdIdentity(canonical, credentials.authcid, self._config, quotas=self._quotas)

    async def authorize(self, authenticated: IdentityInterface, authzid: str) -> PecdIdentity:
        if not isinstance(authenticated, PecdIdentity):  # pragma: no cover - one backend
            raise AuthorizationFailure()
        wanted = normalize_address(authzid)
        own = (normalize_address(authenticated.name), normalize_address(authenticated.authcid))
        if wanted and wanted not in own:
            raise AuthorizationFailure()  # no proxy logins: every holder reads only their own mail
        return authenticated


class PecdIdentity(IdentityInterface):
    """A logged-in mailbox holder; the session serves ``store.path_for(name)``."""

    def __init__(
        self,
        name: str,
        authcid: str,
        config: PecdImapConfig,
        *,
        quotas: QuotaLookup | None = None,
    ) -> None:
        self._name = name
        self.authcid = authcid
        self._config = config
        self._quotas = quotas

    @property
    def name(self) -> str:
        return self._name

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    async def new_token(self, *, expiration: datetime | None = None) -> str | None:
        return None

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[Session]:
        config = self._config
        path = await asyncio.to_thread(config.store.ensure, self._name)
        inbox = ExactMaildir(str(path), create=False)
        layout = MaildirLayout.get(str(path), "++", ExactMaildir)
        mailbox_set = ExactMailboxSet(inbox, layout)
        yield PecdSession(
            self._name, config, mailbox_set, FilterSet(str(path)), quotas=self._quotas
        )

    async def get(self) -> UserMetadata:
        return UserMetadata(self._config, self._name)

    async def set(self, metadata: UserMetadata) -> int | None:
        raise NotAllowedError("Accounts are managed with the pecd command.")

    async def delete(self) -> None:
        raise NotAllowedError("Accounts are managed with the pecd command.")
