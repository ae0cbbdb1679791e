"""pecd's IMAP commands and connection state on top of pymap's.

pymap 0.36 has no QUOTA command (RFC 9208) and no SPECIAL-USE attributes (RFC 6154). pymap
dispatches a parsed command to ``ConnectionState.do_<name>``; ``PecdCommands`` registers the
QUOTA commands in pymap's parser and ``PecdConnectionState`` answers them, and adjusts what
pymap advertises:

* ``LITERAL-`` instead of ``LITERAL+`` (RFC 7888: non-synchronising literals up to 4096 bytes;
  the connection enforces it) and ``APPENDLIMIT=`` the largest message pecd accepts;
* ``QUOTA``, ``QUOTA=RES-STORAGE`` and ``SPECIAL-USE`` after login;
* LIST marks Sent, Drafts, Trash, Junk and Archive with their special-use attributes;
* SELECT's ``FLAGS`` leaves out the ``\\*`` of ``PERMANENTFLAGS`` (new keywords are allowed).

It also never offers a login before TLS, whoever connects (pymap does for loopback clients).
"""

from __future__ import annotations

from collections.abc import Iterable

from pymap.imap.state import ConnectionState
from pymap.interfaces.login import LoginInterface
from pymap.parsing import EndLine, Params, Space
from pymap.parsing.command import CommandAuth
from pymap.parsing.command.auth import ListCommand, SelectCommand
from pymap.parsing.commands import Commands
from pymap.parsing.response import (
    CommandResponse,
    ResponseCode,
    ResponseNo,
    ResponseOk,
    UntaggedResponse,
)
from pymap.parsing.response.code import Capability
from pymap.parsing.response.specials import FlagsResponse, ListResponse, LSubResponse
from pymap.parsing.specials import AString, Mailbox
from pymap.parsing.specials.flag import Wildcard
from pymap.selected import SelectedMailbox

from pecd.imap.backend import PecdImapConfig
from pecd.imap.modutf7 import install as install_modutf7

__all__ = [
    "SPECIAL_USE",
    "GetQuotaCommand",
    "GetQuotaRootCommand",
    "PecdCommands",
    "PecdConnectionState",
    "SetQuotaCommand",
]

install_modutf7()

#: Folder name -> RFC 6154 attribute (without the backslash, as pymap's LIST writes them).
SPECIAL_USE: dict[str, bytes] = {
    "Sent": b"Sent",
    "Drafts": b"Drafts",
    "Trash": b"Trash",
    "Junk": b"Junk",
    "Archive": b"Archive",
}

#: The one quota root: the whole mailbox (every folder counts against one quota).
QUOTA_ROOT = b'""'

_CommandRet = tuple[CommandResponse, SelectedMailbox | None]


class GetQuotaRootCommand(CommandAuth):
    """``GETQUOTAROOT mailbox`` (RFC 9208 4.3)."""

    command = b"GETQUOTAROOT"

    def __init__(self, tag: bytes, mailbox: Mailbox) -> None:
        super().__init__(tag)
        self.mailbox = mailbox.value

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[GetQuotaRootCommand, memoryview]:
        _, buf = Space.parse(buf, params)
        mailbox, buf = Mailbox.parse(buf, params)
        _, buf = EndLine.parse(buf, params)
        return cls(params.tag, mailbox), buf


class GetQuotaCommand(CommandAuth):
    """``GETQUOTA root`` (RFC 9208 4.2)."""

    command = b"GETQUOTA"

    def __init__(self, tag: bytes, root: bytes) -> None:
        super().__init__(tag)
        self.root = root

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[GetQuotaCommand, memoryview]:
        _, buf = Space.parse(buf, params)
        root, buf = AString.parse(buf, params)
        _, buf = EndLine.parse(buf, params)
        return cls(params.tag, root.value), buf


class SetQuotaCommand(CommandAuth):
    """``SETQUOTA``: quotas are set by the provider (``pecd mailbox``), never by the holder."""

    command = b"SETQUOTA"

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[SetQuotaCommand, memoryview]:
        return cls(params.tag), buf[0:0]


class PecdCommands(Commands):
    """pymap's commands plus GETQUOTAROOT, GETQUOTA and SETQUOTA."""

    __slots__: list[str] = []

    def _load_commands(self) -> None:
        super()._load_commands()
        for cmd in (GetQuotaRootCommand, GetQuotaCommand, SetQuotaCommand):
            self.register(cmd)


def _kib(size: int) -> int:
    """Bytes in the RFC 9208 STORAGE unit (1024 octets), rounded up."""
    return (size + 1023) // 1024


class PecdConnectionState(ConnectionState):
    """pymap's connection state with pecd's capabilities and commands (see the module)."""

    def __init__(
        self,
        login: LoginInterface,
        config: PecdImapConfig,
        *,
        max_message: int,
    ) -> None:
        super().__init__(login, config)
        self.max_message = max_message

    @property
    def authenticated(self) -> bool:
        return self._session is not None

    @property
    def capability(self) -> Capability:
        caps: list[bytes] = []
        for cap in super().capability.capabilities:
            if cap == b"LITERAL+":
                cap = b"LITERAL-"
            elif cap.startswith(b"APPENDLIMIT="):
                cap = b"APPENDLIMIT=%d" % self.max_message
            caps.append(cap)
        if self._session is not None:
            caps.extend((b"QUOTA", b"QUOTA=RES-STORAGE", b"SPECIAL-USE"))
        return Capability(caps)

    async def do_greeting(self) -> CommandResponse:
        # pymap offers login mechanisms before TLS to clients connecting from localhost; pecd
        # never accepts a password on an unencrypted connection, whoever connects.
        return ResponseOk(b"*", self.config.greeting, self.capability)

    async def do_select(self, cmd: SelectCommand) -> _CommandRet:
        resp, updates = await super().do_select(cmd)
        for untagged in getattr(resp, "_untagged", ()):
            if isinstance(untagged, FlagsResponse):
                untagged.flags = [f for f in untagged.flags if f != Wildcard]
        return resp, updates

    async def do_list(self, cmd: ListCommand) -> _CommandRet:
        mailboxes, updates = await self.session.list_mailboxes(
            cmd.ref_name, cmd.filter, subscribed=cmd.only_subscribed, selected=self._selected
        )
        resp = ResponseOk(cmd.tag, cmd.command + b" completed.")
        resp_type = LSubResponse if cmd.only_subscribed else ListResponse
        for name, sep, attrs in mailboxes:
            resp.add_untagged(resp_type(name, sep, _with_special_use(name, attrs)))
        return resp, updates

    async def _quota(self) -> tuple[int, int | None]:
        """(bytes used, limit in bytes or None) of the logged-in mailbox."""
        get = getattr(self.session, "quota", None)
        if get is None:  # pragma: no cover - always a PecdSession
            return 0, None
        used, limit = await get()
        return int(used), limit

    def _quota_response(self, used: int, limit: int) -> UntaggedResponse:
        return UntaggedResponse(
            b"QUOTA %b (STORAGE %d %d)" % (QUOTA_ROOT, _kib(used), limit // 1024)
        )

    async def do_getquotaroot(self, cmd: GetQuotaRootCommand) -> _CommandRet:
        _, updates = await self.session.get_mailbox(cmd.mailbox, selected=self._selected)
        used, limit = await self._quota()
        resp = ResponseOk(cmd.tag, cmd.command + b" completed.")
        name = bytes(Mailbox(cmd.mailbox))
        if limit is None:
            resp.add_untagged(UntaggedResponse(b"QUOTAROOT " + name))
        else:
            resp.add_untagged(UntaggedResponse(b"QUOTAROOT " + name + b" " + QUOTA_ROOT))
            resp.add_untagged(self._quota_response(used, limit))
        return resp, updates

    async def do_getquota(self, cmd: GetQuotaCommand) -> _CommandRet:
        used, limit = await self._quota()
        if cmd.root != b"" or limit is None:
            return ResponseNo(
                cmd.tag, b"No such quota root.", ResponseCode.of(b"NONEXISTENT")
            ), None
        resp = ResponseOk(cmd.tag, cmd.command + b" completed.")
        resp.add_untagged(self._quota_response(used, limit))
        return resp, None

    async def do_setquota(self, cmd: SetQuotaCommand) -> _CommandRet:
        return ResponseNo(
            cmd.tag, b"Quotas are set by the provider.", ResponseCode.of(b"NOPERM")
        ), None


def _with_special_use(name: str, attrs: Iterable[bytes]) -> list[bytes]:
    out = list(attrs)
    special = SPECIAL_USE.get(name)
    if special is not None and special not in out:
        out.append(special)
    return out
