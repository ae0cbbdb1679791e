"""The POP3 protocol core, without I/O: command lines in, replies and effects out.

RFC 1939 (POP3), RFC 2449 (CAPA, response codes, the 255-octet command line), RFC 2595 (STLS),
RFC 5034 (AUTH, here only PLAIN, RFC 4616), RFC 3206 ([SYS/TEMP], [AUTH]).

A :class:`Pop3Session` is fed one line at a time (:meth:`Pop3Session.receive`) and answers with a
list of effects for the I/O adapter (``pecd.pop3.service``): bytes to send, a login to check, a
message to stream, TLS to start, deletions to apply, the connection to close. The adapter reports
what happened through the ``*_result`` methods, which return further effects. Nothing here
touches a socket, a file or the clock, so every transcript can be tested directly.

States (RFC 1939 section 3): AUTHORIZATION until a login succeeds, then TRANSACTION; QUIT in
TRANSACTION enters UPDATE, the only place where messages marked with DELE are removed. A
connection that ends any other way (dropped, timed out, closed for errors) removes nothing.

Passwords are accepted only inside TLS: on the STLS listener, before STLS, USER, PASS and AUTH
answer ``-ERR`` and CAPA lists STLS but neither USER nor SASL.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pecd.pec.address import normalize_address

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_SASL_LINE",
    "Close",
    "Login",
    "LoginFailure",
    "Message",
    "Pop3Session",
    "Retrieve",
    "Send",
    "StartTls",
    "State",
    "Update",
    "uidl_of",
]

#: RFC 2449 section 4: a command line is at most 255 octets, the CRLF included.
MAX_COMMAND_LINE = 255
#: A SASL client response line (RFC 5034 sets no limit; PLAIN needs little).
MAX_SASL_LINE = 4096
#: Bad lines (unknown commands, syntax errors, over-long lines) after which the session closes.
MAX_BAD_LINES = 5
#: RFC 1939: an argument is at most 40 characters; here numbers are bounded by that too.
_MAX_ARG = 40

IMPLEMENTATION = "pecd"


def uidl_of(uid: int, uid_validity: int) -> str:
    """The unique-id listing of a message: Dovecot's default ``%08Xu%08Xv`` format, whose hex
    digits Dovecot writes in lower case, so that pecd and Dovecot serving the same Maildir give
    every message the same UIDL."""
    return f"{uid:08x}{uid_validity:08x}"


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


class LoginFailure(enum.Enum):
    """Why a login checked by the adapter did not open the maildrop."""

    BAD_CREDENTIALS = "bad-credentials"
    TEMPORARY = "temporary"  # the account store is unavailable
    IN_USE = "in-use"  # another session holds the maildrop


@dataclass(frozen=True, slots=True)
class Message:
    """One message of the maildrop as listed at login (numbers are 1-based)."""

    number: int
    uidl: str
    size: int
    name: str  # Maildir base name (before ':'), the message's identity
    path: Path  # the file when listed (it may move from new/ to cur/ afterwards)


# -- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (after writing what came before)."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """The ``+OK`` before it has been queued: start TLS now, then call ``tls_started``.

    The adapter must refuse (close) if the client sent anything after the STLS line before
    the handshake: such bytes came in plaintext and must never be read as commands inside TLS.
    """


@dataclass(frozen=True, slots=True)
class Login:
    """Check the credentials, take the maildrop lock and list the maildrop; then call
    ``login_succeeded`` or ``login_failed``."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Retrieve:
    """Send message ``message``: ``+OK``, its bytes dot-stuffed, then ``.``. ``lines`` is the
    number of body lines after the header (TOP), or None for the whole message (RETR)."""

    message: Message
    lines: int | None


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION: remove ``deleted``, then call ``update_done``."""

    deleted: tuple[Message, ...]


Effect = Send | Close | StartTls | Login | Retrieve | Update
_Handler = Callable[[str], list[Effect]]


def _line(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


def ok(text: str = "") -> bytes:
    return _line(f"+OK {text}" if text else "+OK")


def err(text: str, code: str | None = None) -> bytes:
    return _line(f"-ERR [{code}] {text}" if code else f"-ERR {text}")


def multiline(first: bytes, lines: Sequence[str]) -> bytes:
    """A multi-line response: the status line, the lines dot-stuffed, then ``.``."""
    body = b"".join(_line("." + s if s.startswith(".") else s) for s in lines)
    return first + body + b".\r\n"


def _number(arg: str) -> int | None:
    if not arg or len(arg) > _MAX_ARG or not (arg.isascii() and arg.isdigit()):
        return None
    return int(arg)


class Pop3Session:
    """The state of one POP3 connection.

    ``tls``: the connection is encrypted already (implicit TLS, port 995). ``stls``: STLS may
    be offered (the plaintext listener). ``disconnect_after``: failed logins after which the
    connection is closed.
    """

    def __init__(
        self,
        *,
        hostname: str,
        tls: bool,
        stls: bool,
        disconnect_after: int = 5,
    ) -> None:
        self.hostname = hostname
        self.tls = tls
        self.stls = stls and not tls
        self.disconnect_after = disconnect_after
        self.state = State.AUTHORIZATION
        self.address: str | None = None
        self.messages: list[Message] = []
        self.deleted: set[int] = set()
        self.failed_logins = 0
        self.bad_lines = 0
        self._user: str | None = None
        self._sasl_pending = False
        self._login_pending = False
        self._table = self._handlers()

    # -- adapter entry points -------------------------------------------------------------

    def greeting(self) -> bytes:
        return ok(f"{self.hostname} POP3 server ready")

    def receive(self, line: bytes, *, too_long: bool = False) -> list[Effect]:
        """One line from the client (with or without its CRLF). ``too_long``: the line was cut
        because it exceeded the reader's limit (its text is not meaningful)."""
        if self.state is State.CLOSED or self._login_pending:
            return []
        if line.endswith(b"\n"):
            line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
        limit = MAX_SASL_LINE if self._sasl_pending else MAX_COMMAND_LINE - 2
        if too_long or len(line) > limit:
            self._sasl_pending = False
            return self._bad("line too long")
        if self._sasl_pending:
            self._sasl_pending = False
            return self._sasl_response(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad("invalid characters in command")
        if any((c < " " and c != "\t") or c == "\x7f" for c in text):
            return self._bad("invalid characters in command")
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        handler = self._table.get(keyword)
        if handler is None:
            return self._bad("unknown command")
        states, fn = handler
        if self.state not in states:
            return self._bad(f"{keyword} not allowed now")
        return fn(rest)

    def login_succeeded(self, address: str, messages: Sequence[Message]) -> list[Effect]:
        self._login_pending = False
        self.state = State.TRANSACTION
        self.address = address
        self.messages = list(messages)
        self.deleted = set()
        count, size = self._stat()
        return [Send(ok(f"maildrop locked and ready, {count} messages ({size} octets)"))]

    def login_failed(self, failure: LoginFailure) -> list[Effect]:
        self._login_pending = False
        self._user = None
        if failure is LoginFailure.TEMPORARY:
            return [Send(err("authentication service unavailable, try later", "SYS/TEMP"))]
        if failure is LoginFailure.IN_USE:
            return [Send(err("maildrop already locked by another session", "IN-USE"))]
        self.failed_logins += 1
        if self.failed_logins >= self.disconnect_after:
            self.state = State.CLOSED
            return [
                Send(err("authentication failed, too many attempts", "AUTH")),
                Close("too many failed logins"),
            ]
        return [Send(err("authentication failed", "AUTH"))]

    def tls_started(self) -> None:
        self.tls = True
        self.stls = False
        # RFC 2595 section 4: forget what the client said before TLS.
        self._user = None

    def update_done(self, failures: int) -> list[Effect]:
        self.state = State.CLOSED
        if failures:
            return [
                Send(err(f"{failures} deleted messages not removed", "SYS/TEMP")),
                Close("quit"),
            ]
        return [Send(ok(f"{self.hostname} POP3 server signing off")), Close("quit")]

    def timed_out(self) -> list[Effect]:
        self.state = State.CLOSED
        return [Send(err("autologout; idle for too long")), Close("idle timeout")]

    def closing(self) -> list[Effect]:
        """The server shuts down."""
        self.state = State.CLOSED
        return [Send(err("server shutting down", "SYS/TEMP")), Close("shutdown")]

    @property
    def authenticated(self) -> bool:
        return self.state is State.TRANSACTION

    # -- helpers --------------------------------------------------------------------------

    def _bad(self, text: str) -> list[Effect]:
        self.bad_lines += 1
        if self.bad_lines >= MAX_BAD_LINES:
            self.state = State.CLOSED
            return [Send(err(f"{text}; too many bad commands")), Close("too many bad commands")]
        return [Send(err(text))]

    def _stat(self) -> tuple[int, int]:
        live = [m for m in self.messages if m.number not in self.deleted]
        return len(live), sum(m.size for m in live)

    def _message(self, arg: str) -> Message | list[Effect]:
        n = _number(arg)
        if n is None:
            return self._bad("invalid message number")
        if not 1 <= n <= len(self.messages):
            return [Send(err("no such message"))]
        if n in self.deleted:
            return [Send(err("message is deleted"))]
        return self.messages[n - 1]

    def _handlers(self) -> dict[str, tuple[frozenset[State], _Handler]]:
        auth = frozenset({State.AUTHORIZATION})
        trans = frozenset({State.TRANSACTION})
        both = auth | trans
        return {
            "CAPA": (both, self._capa),
            "QUIT": (both, self._quit),
            "NOOP": (trans, self._noop),
            "STLS": (auth, self._stls),
            "USER": (auth, self._user_cmd),
            "PASS": (auth, self._pass),
            "AUTH": (auth, self._auth),
            "APOP": (auth, self._apop),
            "STAT": (trans, self._stat_cmd),
            "LIST": (trans, self._list),
            "UIDL": (trans, self._uidl),
            "RETR": (trans, self._retr),
            "TOP": (trans, self._top),
            "DELE": (trans, self._dele),
            "RSET": (trans, self._rset),
        }

    # -- commands -------------------------------------------------------------------------

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        if self.state is State.AUTHORIZATION:
            if self.tls:
                caps += ["USER", "SASL PLAIN"]
            elif self.stls:
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        return caps

    def _capa(self, rest: str) -> list[Effect]:
        if rest:
            return self._bad("CAPA takes no argument")
        return [Send(multiline(ok("capability list follows"), self.capabilities()))]

    def _quit(self, rest: str) -> list[Effect]:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE
            return [Update(tuple(self.messages[n - 1] for n in sorted(self.deleted)))]
        self.state = State.CLOSED
        return [Send(ok(f"{self.hostname} POP3 server signing off")), Close("quit")]

    def _noop(self, rest: str) -> list[Effect]:
        return [Send(ok())]

    def _stls(self, rest: str) -> list[Effect]:
        if rest:
            return self._bad("STLS takes no argument")
        if self.tls:
            return [Send(err("TLS is already active"))]
        if not self.stls:
            return [Send(err("STLS is not offered here"))]
        return [Send(ok("begin TLS negotiation")), StartTls()]

    def _need_tls(self) -> list[Effect] | None:
        if self.tls:
            return None
        return [Send(err("TLS is required before login: use STLS first"))]

    def _user_cmd(self, rest: str) -> list[Effect]:
        refused = self._need_tls()
        if refused is not None:
            return refused
        if not rest.strip():
            return self._bad("USER needs a mailbox name")
        self._user = rest.strip()
        return [Send(ok("send your password"))]

    def _pass(self, rest: str) -> list[Effect]:
        refused = self._need_tls()
        if refused is not None:
            return refused
        if self._user is None:
            return [Send(err("USER first"))]
        if not rest:
            return self._bad("PASS needs a password")
        user, self._user = self._user, None
        self._login_pending = True
        return [Login(user, rest)]

    def _apop(self, rest: str) -> list[Effect]:
        return [Send(err("APOP is not supported; use USER/PASS or AUTH PLAIN inside TLS"))]

    def _auth(self, rest: str) -> list[Effect]:
        refused = self._need_tls()
        if refused is not None:
            return refused
        mechanism, _, initial = rest.partition(" ")
        if not mechanism:
            # The pre-RFC 5034 form some clients still try: list the mechanisms.
            return [Send(multiline(ok("SASL mechanisms follow"), ["PLAIN"]))]
        if mechanism.upper() != "PLAIN":
            return [Send(err("unsupported authentication mechanism"))]
        if not initial:
            self._sasl_pending = True
            return [Send(b"+ \r\n")]
        return self._sasl_response(initial.encode("ascii", "replace"))

    def _sasl_response(self, line: bytes) -> list[Effect]:
        if line.strip() == b"*":
            return [Send(err("authentication cancelled"))]
        try:
            decoded = base64.b64decode(line.strip(), validate=True)
            authzid, authcid, password = decoded.decode("utf-8").split("\x00")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self._bad("malformed SASL PLAIN response")
        if not authcid or not password:
            return self._bad("malformed SASL PLAIN response")
        if authzid and normalize_address(authzid) != normalize_address(authcid):
            return [Send(err("authorization identity must be the login name", "AUTH"))]
        self._login_pending = True
        return [Login(authcid, password)]

    def _stat_cmd(self, rest: str) -> list[Effect]:
        if rest:
            return self._bad("STAT takes no argument")
        count, size = self._stat()
        return [Send(ok(f"{count} {size}"))]

    def _listing(self, rest: str, column: str) -> list[Effect]:
        def value(m: Message) -> str:
            return str(m.size) if column == "size" else m.uidl

        if rest:
            found = self._message(rest)
            if not isinstance(found, Message):
                return found
            return [Send(ok(f"{found.number} {value(found)}"))]
        live = [m for m in self.messages if m.number not in self.deleted]
        if column == "size":
            count, size = self._stat()
            first = ok(f"{count} messages ({size} octets)")
        else:
            first = ok("unique-id listing follows")
        return [Send(multiline(first, [f"{m.number} {value(m)}" for m in live]))]

    def _list(self, rest: str) -> list[Effect]:
        return self._listing(rest, "size")

    def _uidl(self, rest: str) -> list[Effect]:
        return self._listing(rest, "uidl")

    def _retr(self, rest: str) -> list[Effect]:
        found = self._message(rest)
        if not isinstance(found, Message):
            return found
        return [Retrieve(found, None)]

    def _top(self, rest: str) -> list[Effect]:
        which, _, lines = rest.partition(" ")
        count = _number(lines)
        if count is None:
            return self._bad("usage: TOP msg n")
        found = self._message(which)
        if not isinstance(found, Message):
            return found
        return [Retrieve(found, count)]

    def _dele(self, rest: str) -> list[Effect]:
        found = self._message(rest)
        if not isinstance(found, Message):
            return found
        self.deleted.add(found.number)
        return [Send(ok(f"message {found.number} deleted"))]

    def _rset(self, rest: str) -> list[Effect]:
        if rest:
            return self._bad("RSET takes no argument")
        self.deleted.clear()
        count, size = self._stat()
        return [Send(ok(f"maildrop has {count} messages ({size} octets)"))]
