"""Login throttling and connection limits, shared by every listener that takes a password.

One ``Guard`` per process. A listener asks ``admit()`` when a connection arrives and releases
the admission when it closes; a login first awaits ``before_login()``, then reports
``failed()`` or ``succeeded()`` (or ``release()``: neither, e.g. a right password that still owes
a second factor). The Guard keeps only counters in memory, bounded in size.

The metrics count each login under its protocol (``pecd_logins_failed_total`` and
``pecd_logins_succeeded_total``, label ``protocol``): ``failed()`` names it, ``succeeded()`` takes
the Guard's ``protocol``. A process that serves two protocols (IMAP and POP3) gives each its own
view, ``guard.speaking("pop3")``: the same counts, connections and log, another label.

Choices:

- **Client address.** IPv4 addresses count one by one; IPv6 addresses count per /64 (one
  subscriber usually gets a whole /64, so counting single addresses would let one client use
  2^64 of them). An IPv4-mapped IPv6 address counts as its IPv4 address. Anything else (a
  Unix socket peer) counts as itself.
- **Delay.** After ``delay_after_failures`` failures within ``failure_window_seconds``, the
  n-th failure makes the next attempt wait ``delay_base_seconds * 2**(n - delay_after_failures)``,
  at most ``delay_max_seconds``. For a client address the attempts are also *serialised*: one
  attempt passes the gate per delay, however many connections the address opens in parallel
  (so 20 parallel guessers do not get 20 guesses per delay). For an account the delay is
  waited once, at most ``delay_max_seconds``, and not serialised, so that a guessing attack
  spread over many addresses cannot lock the holder out for longer than that; a client address
  from which the account logged in successfully in the last ``known_seconds`` skips the
  account's delay altogether.
- **Attempts in flight count.** ``before_login()`` reserves the attempt: until its outcome is
  reported it counts as a failure of the client address and of the account, so that attempts
  made in parallel (many requests at once, before any of them has failed) are delayed as if
  they had already failed, instead of all passing the check made before the first failure was
  recorded. ``failed()`` turns the reservation into the failure; ``succeeded()`` and
  ``release()`` give it back. A reservation whose outcome never comes (the store failed, the
  client went away) stops counting after ``reserve_seconds``. ``clean()`` looks only at real
  failures, so a login in flight does not lose its place in the hash queue.
- **Success** from an address forgets the failures of that address and of that account.
- **Memory.** Each table holds at most ``max_tracked`` entries (least recently failed dropped
  first) and entries older than the window are dropped as new failures come in.
- **Log.** One line per failed login (protocol, client address, account), at most
  ``log_lines_per_second``; past that the lines are counted and one summary line says how many
  were suppressed.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from pecd.config import SecurityConfig
from pecd.pec.address import normalize_address
from pecd.runtime import metrics

log = logging.getLogger(__name__)

ACCOUNT_MAX_LENGTH = 320  # longer names are cut: an attacker chooses them


def client_key(peer: str) -> str:
    """The key a client address is counted under (IPv6 per /64, see the module docstring)."""
    text = peer.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # zone index of a link-local address
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def account_key(account: str) -> str:
    return normalize_address(account)[:ACCOUNT_MAX_LENGTH]


@dataclass(slots=True)
class _Failures:
    count: int = 0  # failures reported
    last: float = 0.0  # time of the last failure or reservation
    gate: float = float("-inf")  # time the last attempt passed the gate (addresses only)
    # Accounts the failures of an address were against (at most _MAX_NAMED; None: more).
    accounts: set[str] | None = field(default_factory=set)
    # Times of the attempts in flight (reserved, outcome not reported yet), oldest first.
    pending: deque[float] = field(default_factory=deque)

    def total(self) -> int:
        """Failures and attempts in flight: what the delay is computed from."""
        return self.count + len(self.pending)


_MAX_NAMED = 16


@dataclass(slots=True)
class _Shared:
    """What a Guard's views (:meth:`Guard.speaking`) share besides its tables."""

    log_second: float = 0.0  # the second the log's lines are being counted in
    log_lines: int = 0
    suppressed: int = 0
    refused: int = 0  # connections refused


class Admission:
    """One admitted connection; ``release()`` (idempotent) when it closes."""

    __slots__ = ("_guard", "_key", "_listener", "_released")

    def __init__(self, guard: Guard, listener: str, key: str) -> None:
        self._guard = guard
        self._listener = listener
        self._key = key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._guard._release(self._listener, self._key)

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Guard:
    """Connection limits and login throttling for one process (see the module docstring)."""

    def __init__(
        self,
        cfg: SecurityConfig,
        *,
        protocol: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_tracked: int = 100_000,
        known_seconds: float = 30 * 86400.0,
        log_lines_per_second: int = 20,
        reserve_seconds: float = 120.0,
    ) -> None:
        self.cfg = cfg
        # What succeeded() counts its logins under in the metrics (None: not counted).
        self.protocol = protocol
        self.clock = clock
        self.sleep = sleep
        self.max_tracked = max_tracked
        self.known_seconds = known_seconds
        self.reserve_seconds = reserve_seconds
        self.log_lines_per_second = log_lines_per_second
        self.disconnect_after: int = cfg.disconnect_after_failures
        # (listener, client key) -> open connections; listener -> open connections.
        self._conns: dict[tuple[str, str], int] = {}
        self._totals: dict[str, int] = {}
        # Ordered by the time of the last failure, oldest first.
        self._by_client: OrderedDict[str, _Failures] = OrderedDict()
        self._by_account: OrderedDict[str, _Failures] = OrderedDict()
        # (account, client key) -> time of the last successful login, oldest first.
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._shared = _Shared()
        # What the throttle did, for tests and benchmarks (the most recent attempts): the delay
        # each login attempt owed by the counts (0 for none), the time it actually waited, and
        # how many connections were refused (:attr:`refused`).
        self.owed: deque[float] = deque(maxlen=1000)
        self.waits: deque[float] = deque(maxlen=1000)
        if protocol is not None:
            metrics.logins_counted(protocol)

    def speaking(self, protocol: str) -> Guard:
        """This Guard as the listeners of ``protocol`` use it: every count, connection, delay and
        log line shared with this one; its successful logins counted under ``protocol``."""
        view = copy.copy(self)  # a shallow copy: the tables and the shared state are the same
        view.protocol = protocol
        metrics.logins_counted(protocol)
        return view

    @property
    def refused(self) -> int:
        """Connections refused by :meth:`admit` (every view's)."""
        return self._shared.refused

    # --- connections -------------------------------------------------------------------------

    def admit(self, listener: str, peer: str) -> Admission | None:
        """An admission for a new connection, or None when the client address or the listener
        already has as many connections as allowed (the caller replies "too many connections"
        in its protocol and closes)."""
        key = client_key(peer)
        per = self._conns.get((listener, key), 0)
        total = self._totals.get(listener, 0)
        if per >= self.cfg.max_connections_per_address or total >= self.cfg.max_connections:
            self._shared.refused += 1
            return None
        self._conns[(listener, key)] = per + 1
        self._totals[listener] = total + 1
        return Admission(self, listener, key)

    def connections(self, listener: str, peer: str | None = None) -> int:
        """Open connections on ``listener``, from ``peer``'s address key or in total."""
        if peer is None:
            return self._totals.get(listener, 0)
        return self._conns.get((listener, client_key(peer)), 0)

    def _release(self, listener: str, key: str) -> None:
        per = self._conns.get((listener, key), 0) - 1
        if per > 0:
            self._conns[(listener, key)] = per
        else:
            self._conns.pop((listener, key), None)
        total = self._totals.get(listener, 0) - 1
        if total > 0:
            self._totals[listener] = total
        else:
            self._totals.pop(listener, None)

    # --- logins ------------------------------------------------------------------------------

    def delay_for(self, failures: int) -> float:
        """The delay owed after ``failures`` recent failures."""
        extra = failures - self.cfg.delay_after_failures
        if extra < 0 or failures <= 0:
            return 0.0
        # Capped exponent: 2**64 would only overflow into the cap anyway.
        return min(self.cfg.delay_base_seconds * 2.0 ** min(extra, 64), self.cfg.delay_max_seconds)

    def failures(self, peer: str | None = None, account: str | None = None) -> int:
        """Recent failures of a client address (or of an account), the attempts in flight
        included."""
        now = self.clock()
        if peer is not None:
            rec = self._live(self._by_client, client_key(peer), now)
        else:
            rec = self._live(self._by_account, account_key(account or ""), now)
        return 0 if rec is None else rec.total()

    def clean(self, peer: str) -> bool:
        """True when the client address has no recent failure: its logins may go first. The
        attempts in flight do not count here (the caller's own is one of them)."""
        rec = self._live(self._by_client, client_key(peer), self.clock())
        return rec is None or rec.count == 0

    def _live(self, table: OrderedDict[str, _Failures], key: str, now: float) -> _Failures | None:
        rec = table.get(key)
        if rec is None:
            return None
        if now - rec.last > self.cfg.failure_window_seconds:
            del table[key]
            return None
        while rec.pending and now - rec.pending[0] > self.reserve_seconds:
            rec.pending.popleft()  # an outcome that never came
        return rec

    async def before_login(self, peer: str, account: str) -> None:
        """Wait the delay owed for the earlier failures of this client address or account and
        for the attempts in flight, then reserve this attempt (see the module docstring): the
        caller reports its outcome with ``failed()``, ``succeeded()`` or ``release()``."""
        ckey, akey = client_key(peer), account_key(account)
        start = self.clock()
        known = self._is_known(akey, ckey, start)
        # The account's delay: once, never more than delay_max_seconds (see the docstring).
        arec = self._live(self._by_account, akey, start)
        crec = self._live(self._by_client, ckey, start)
        self.owed.append(
            max(
                0.0 if crec is None else self.delay_for(crec.total()),
                0.0 if arec is None or known else self.delay_for(arec.total()),
            )
        )
        account_owed = 0.0
        if arec is not None and not known:
            account_owed = arec.last + self.delay_for(arec.total()) - start
        # The account's reservation is made now, before any wait: the next attempt on it,
        # from wherever, counts this one.
        self._reserve(self._by_account, akey, start)
        try:
            if account_owed > 0:
                await self.sleep(min(account_owed, self.cfg.delay_max_seconds))
            # The client address's gate: one attempt per delay. An account that logged in from
            # this address before is not held by failures against other accounts (a shared NAT,
            # or a guesser who also holds an account of their own).
            while not known:
                now = self.clock()
                crec = self._live(self._by_client, ckey, now)
                if crec is None:
                    break
                delay = self.delay_for(crec.total())
                if delay <= 0:
                    break
                owed = max(crec.last, crec.gate) + delay - now
                if owed <= 0:
                    crec.gate = now
                    break
                await self.sleep(owed)
        except BaseException:
            self._unreserve(self._by_account, akey)  # cancelled while waiting: no attempt
            raise
        # The address's reservation, with no await since the gate was passed: the next
        # attempt from the address sees it.
        crec = self._reserve(self._by_client, ckey, self.clock())
        if crec.accounts is not None:
            crec.accounts.add(akey)
            if len(crec.accounts) > _MAX_NAMED:
                crec.accounts = None
        waited = self.clock() - start
        if waited > 0:
            self.waits.append(waited)

    def _reserve(self, table: OrderedDict[str, _Failures], key: str, now: float) -> _Failures:
        rec = self._touch(table, key, now)
        rec.pending.append(now)
        return rec

    def _unreserve(self, table: OrderedDict[str, _Failures], key: str) -> bool:
        """Give back the oldest reservation under ``key``; False if it had none (expired, or
        the record was dropped). A record left with nothing in it goes."""
        rec = table.get(key)
        if rec is None or not rec.pending:
            return False
        rec.pending.popleft()
        if rec.count == 0 and not rec.pending:
            del table[key]
        return True

    def release(self, peer: str, account: str) -> None:
        """The attempt reserved by ``before_login()`` neither failed nor succeeded (a right
        password that still owes a second factor, a form refused before the password was
        checked): it stops counting, and nothing is forgiven."""
        self._unreserve(self._by_client, client_key(peer))
        self._unreserve(self._by_account, account_key(account))

    def _is_known(self, akey: str, ckey: str, now: float) -> bool:
        seen = self._known.get((akey, ckey))
        return seen is not None and now - seen <= self.known_seconds

    def failed(self, protocol: str, peer: str, account: str) -> None:
        """Record a failed login (the attempt ``before_login()`` reserved, or one made without
        it); logs one line (rate-limited)."""
        now = self.clock()
        ckey, akey = client_key(peer), account_key(account)
        crec = self._bump(self._by_client, ckey, now)
        if crec.accounts is not None:
            crec.accounts.add(akey)
            if len(crec.accounts) > _MAX_NAMED:
                crec.accounts = None
        arec = self._bump(self._by_account, akey, now)
        metrics.login_failed(protocol)
        self._log(
            now,
            "failed login: protocol=%s client=%s account=%r failures: client %d, account %d",
            protocol,
            peer,
            akey,
            crec.count,
            arec.count,
        )

    def _bump(self, table: OrderedDict[str, _Failures], key: str, now: float) -> _Failures:
        rec = self._touch(table, key, now)
        if rec.pending:
            rec.pending.popleft()  # the reservation becomes the failure
        rec.count += 1
        return rec

    def _touch(self, table: OrderedDict[str, _Failures], key: str, now: float) -> _Failures:
        """The live record under ``key`` (made if need be), moved to the end as the most
        recent, its time set to ``now``; the table pruned."""
        rec = self._live(table, key, now)
        if rec is None:
            rec = table[key] = _Failures()
        else:
            table.move_to_end(key)
        rec.last = now
        window = self.cfg.failure_window_seconds
        # Oldest first: drop what expired, then what is over the cap.
        while table:
            first_key, first = next(iter(table.items()))
            if now - first.last > window or len(table) > self.max_tracked:
                del table[first_key]
            else:
                break
        return rec

    def succeeded(self, peer: str, account: str) -> None:
        """Record a successful login: forget the failures of this address and this account."""
        if self.protocol is not None:
            metrics.login_succeeded(self.protocol)
        now = self.clock()
        ckey, akey = client_key(peer), account_key(account)
        crec = self._by_client.get(ckey)
        if crec is not None and crec.accounts is not None and crec.accounts <= {akey}:
            # Every failure of the address was against this account: all is forgiven. Failures
            # against other accounts stay (logging into one's own account between guesses at
            # another's must not reset the gate); this account is exempt from them as known.
            del self._by_client[ckey]
        else:
            self._unreserve(self._by_client, ckey)  # this attempt's reservation only
        self._by_account.pop(akey, None)
        self._known.pop((akey, ckey), None)
        self._known[(akey, ckey)] = now
        while self._known:
            first_key, seen = next(iter(self._known.items()))
            if now - seen > self.known_seconds or len(self._known) > self.max_tracked:
                del self._known[first_key]
            else:
                break

    # --- the log -----------------------------------------------------------------------------

    def _log(self, now: float, msg: str, *args: object) -> None:
        sh = self._shared
        if now - sh.log_second >= 1.0:
            if sh.suppressed:
                log.info("failed login: %d more lines suppressed", sh.suppressed)
            sh.log_second = now
            sh.log_lines = 0
            sh.suppressed = 0
        if sh.log_lines < self.log_lines_per_second:
            sh.log_lines += 1
            log.info(msg, *args)
        else:
            sh.suppressed += 1

    def flush_log(self) -> None:
        """Write the summary of suppressed lines now (at shutdown)."""
        sh = self._shared
        if sh.suppressed:
            log.info("failed login: %d more lines suppressed", sh.suppressed)
            sh.suppressed = 0
