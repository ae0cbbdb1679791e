"""Unit tests of the Guard: connection limits, login delays, bounded memory, the rate-limited log."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from helpers import wait_for_async
from pecd.config import SecurityConfig
from pecd.guard import Guard, client_key


class FakeTime:
    """A clock and a sleep that advances it, so no test waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def make(**kw: object) -> tuple[Guard, FakeTime]:
    t = FakeTime()
    defaults: dict[str, object] = dict(
        delay_after_failures=3,
        delay_base_seconds=0.5,
        delay_max_seconds=15.0,
        disconnect_after_failures=5,
        failure_window_seconds=900.0,
        max_hash_checks=2,
        max_connections_per_address=3,
        max_connections=5,
    )
    defaults.update(kw)
    return Guard(SecurityConfig(**defaults), clock=t, sleep=t.sleep), t  # type: ignore[arg-type]


def test_client_key() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("/run/sock") == "/run/sock"


def test_connection_limit_per_address_and_total() -> None:
    g, _ = make()
    a = [g.admit("smtp", "192.0.2.1") for _ in range(3)]
    assert all(x is not None for x in a)
    assert g.admit("smtp", "192.0.2.1") is None  # per address
    assert g.admit("imap", "192.0.2.1") is not None  # another listener counts apart
    # IPv6: one /64 is one client.
    assert g.admit("smtp", "2001:db8::1") is not None
    assert g.admit("smtp", "2001:db8::2") is not None
    assert g.admit("smtp", "192.0.2.9") is None  # 5 in total on "smtp"
    assert g.refused == 2
    assert g.connections("smtp") == 5
    first = a[0]
    assert first is not None
    first.release()
    first.release()  # idempotent
    assert g.connections("smtp") == 4
    assert g.connections("smtp", "192.0.2.1") == 2
    with g.admit("smtp", "192.0.2.1") as adm:  # type: ignore[union-attr]
        assert adm is not None
        assert g.admit("smtp", "192.0.2.1") is None
    assert g.connections("smtp", "192.0.2.1") == 2
    for x in a[1:]:
        assert x is not None
        x.release()
    assert g.connections("smtp", "192.0.2.1") == 0
    assert ("smtp", "192.0.2.1") not in g._conns  # no empty entries left behind


def test_delay_grows_and_is_capped() -> None:
    g, _ = make()
    assert [g.delay_for(n) for n in range(3)] == [0.0, 0.0, 0.0]
    assert [g.delay_for(n) for n in range(3, 10)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert g.delay_for(10_000) == 15.0


def test_before_login_waits_after_failures() -> None:
    g, t = make()

    async def run() -> list[float]:
        waits = []
        for _ in range(8):
            before = t.now
            await g.before_login("192.0.2.1", "alice@x.it")
            waits.append(t.now - before)
            g.failed("smtp", "192.0.2.1", "alice@x.it")
        return waits

    waits = asyncio.run(run())
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert list(g.owed) == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert g.failures("192.0.2.1") == 8
    assert g.failures(account="ALICE@x.it") == 8
    assert not g.clean("192.0.2.1")
    # Success forgets both.
    g.succeeded("192.0.2.1", "alice@x.it")
    assert g.clean("192.0.2.1") and g.failures(account="alice@x.it") == 0


def test_parallel_attempts_from_one_address_are_serialised() -> None:
    g, t = make(delay_after_failures=0, delay_base_seconds=1.0, delay_max_seconds=1.0)
    g.failed("smtp", "192.0.2.1", "x@x.it")
    start = t.now
    passed: list[float] = []

    async def one(i: int) -> None:
        await g.before_login("192.0.2.1", f"user{i}@x.it")
        passed.append(t.now - start)

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(5)))

    asyncio.run(run())
    # One attempt per delay, not five at once.
    assert sorted(passed) == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])


def test_account_delay_is_bounded_and_skipped_for_known_addresses() -> None:
    g, t = make()
    for i in range(50):  # a distributed attack on one account: one failure per address
        g.failed("smtp", f"198.51.100.{i}", "alice@x.it")

    async def attempt(peer: str) -> float:
        before = t.now
        await g.before_login(peer, "alice@x.it")
        return t.now - before

    # A new address waits the account's delay, at most delay_max_seconds.
    assert asyncio.run(attempt("203.0.113.5")) == 15.0
    # An address the holder logged in from before does not wait.
    g.succeeded("203.0.113.9", "alice@x.it")
    for i in range(50):
        g.failed("smtp", f"198.51.100.{i}", "alice@x.it")
    assert asyncio.run(attempt("203.0.113.9")) == 0.0


def test_failures_expire_after_the_window() -> None:
    g, t = make(failure_window_seconds=60.0)
    for _ in range(5):
        g.failed("smtp", "192.0.2.1", "a@x.it")
    assert g.failures("192.0.2.1") == 5
    t.now += 61
    assert g.failures("192.0.2.1") == 0
    assert g.clean("192.0.2.1")


def test_tables_stay_bounded_under_many_addresses() -> None:
    g, t = make(failure_window_seconds=60.0)
    g.max_tracked = 500
    for i in range(4000):
        g.failed("smtp", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"u{i}@x.it")
        g.succeeded(f"11.0.{i >> 8 & 255}.{i & 255}", f"v{i}@x.it")
    assert len(g._by_client) <= 500
    assert len(g._by_account) <= 500
    assert len(g._known) <= 500
    # The most recent are the ones kept.
    assert g.failures("10.0.15.159") == 1  # i = 3999
    # Expired entries go as new failures come in.
    t.now += 120
    g.failed("smtp", "192.0.2.1", "a@x.it")
    assert len(g._by_client) == 1 and len(g._by_account) == 1


def test_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    g, t = make()
    g.log_lines_per_second = 10
    caplog.set_level(logging.INFO, logger="pecd.guard")
    for i in range(500):
        g.failed("imap", f"192.0.2.{i % 200}", "bob@x.it")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert "protocol=imap" in lines[0] and "client=192.0.2.0" in lines[0]
    assert "account='bob@x.it'" in lines[0]
    t.now += 1.5
    g.failed("imap", "192.0.2.1", "evil\r\nfake line@x.it")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[10] == "failed login: 490 more lines suppressed"
    assert "\n" not in lines[11]  # the account is quoted, control characters escaped
    g.flush_log()
    assert len(caplog.records) == 12


def test_disconnect_after_comes_from_config() -> None:
    g, _ = make(disconnect_after_failures=7)
    assert g.disconnect_after == 7


def test_hash_slots_bound_and_let_clean_clients_first() -> None:
    import threading

    from pecd.store.accounts import HashSlots

    slots = HashSlots(2)
    running = 0
    most = 0
    started: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()  # holds the two checks that took the slots first
    then = threading.Event()  # holds the next two, so that who got the slots is plain to see

    def work(name: str) -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            started.append(name)
            first_two = len(started) <= 2
        (gate if first_two else then).wait(5)
        with lock:
            running -= 1
        return name

    async def run() -> list[str]:
        # Two guesses take both slots; eight more wait; then a clean client's check arrives.
        busy = [asyncio.create_task(slots.run(False, work, f"guess{i}")) for i in range(10)]
        await wait_for_async(lambda: slots.waiting() == 8 and running == 2, what="guesses queued")
        clean = asyncio.create_task(slots.run(True, work, "clean"))
        await wait_for_async(lambda: slots.waiting() == 9, what="the clean check queued")
        assert slots.waiting() == 9
        gate.set()
        # The two slots freed go to the next two checks; the clean one must be one of them.
        await wait_for_async(lambda: len(started) == 4, what="the next two checks started")
        then.set()
        return await asyncio.gather(*busy, clean)

    results = asyncio.run(run())
    assert results[-1] == "clean"
    assert most == 2
    # The clean client's check was among the first to start after the two that held the slots
    # (started is in the order the slots were taken: nothing else ran meanwhile).
    assert "clean" in started[2:4]
    assert slots.free == 2


def test_hash_slots_cancelled_waiter_gives_nothing_away() -> None:
    from pecd.store.accounts import HashSlots

    slots = HashSlots(1)

    async def run() -> None:
        import threading

        ev = threading.Event()
        first = asyncio.create_task(slots.run(False, ev.wait, 5))
        await wait_for_async(lambda: slots.free == 0, what="the first takes the slot")
        second = asyncio.create_task(slots.run(False, ev.wait, 5))
        await wait_for_async(lambda: slots.waiting() == 1, what="the second waits")
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        assert slots.waiting() == 0
        ev.set()
        await first
        await wait_for_async(lambda: slots.free == 1, what="the slot given back")
        assert slots.free == 1

    asyncio.run(run())


def test_logging_into_ones_own_account_does_not_reset_the_gate_for_guesses_at_another() -> None:
    g, t = make()

    async def attempt(account: str) -> float:
        before = t.now
        await g.before_login("192.0.2.7", account)
        return t.now - before

    for _ in range(6):  # guesses at the victim's password
        g.failed("imap", "192.0.2.7", "victim@x.it")
    g.succeeded("192.0.2.7", "mallory@x.it")  # the guesser's own account, from the same address
    # The guesses at the victim are still held at the gate ...
    assert not g.clean("192.0.2.7")
    assert asyncio.run(attempt("victim@x.it")) > 0
    # ... while the account that logged in from this address is not held by them.
    assert asyncio.run(attempt("mallory@x.it")) == 0.0


# --- attempts in flight (the race between before_login and failed) ----------------------------


def test_parallel_attempts_count_before_any_has_failed() -> None:
    """Twenty guesses sent at once from one address, each checked for a while (the password
    hash) before its failure is reported: without reservations all twenty passed the check made
    before the first failure was recorded; now each one in flight counts."""
    g, t = make()
    start = t.now
    passed: list[float] = []

    async def one(i: int) -> None:
        await g.before_login("192.0.2.1", "alice@x.it")
        passed.append(t.now - start)
        await asyncio.sleep(0)  # the check, in another thread
        g.failed("smtp", "192.0.2.1", "alice@x.it")

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(20)))

    asyncio.run(run())
    # Three go at once (delay_after_failures), then one per delay as if the others had failed.
    assert passed[:3] == [0.0, 0.0, 0.0]
    assert all(b > a for a, b in itertools.pairwise(passed[2:]))
    assert list(g.owed)[:4] == [0.0, 0.0, 0.0, g.delay_for(3)]
    # The reservations became the failures (not failures on top of them).
    assert g.failures("192.0.2.1") == 20 and g.failures(account="alice@x.it") == 20


def test_parallel_attempts_from_many_addresses_on_one_account() -> None:
    g, _t = make()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # no time passes: the waits owed are plain
        slept.append(seconds)
        await asyncio.sleep(0)

    g.sleep = sleep

    async def run() -> None:
        await asyncio.gather(*(g.before_login(f"198.51.100.{i}", "alice@x.it") for i in range(10)))

    asyncio.run(run())
    # The account's delay grows with the attempts in flight, each waited once, capped.
    assert slept == [g.delay_for(n) for n in range(3, 10)]
    assert max(slept) == g.cfg.delay_max_seconds


def test_success_and_release_give_the_reservation_back() -> None:
    g, _t = make()

    async def run() -> None:
        # A right password: the reservation goes with the rest.
        await g.before_login("192.0.2.1", "alice@x.it")
        assert g.failures(account="alice@x.it") == 1
        assert g.clean("192.0.2.1")  # an attempt in flight is no failure of the address
        g.succeeded("192.0.2.1", "alice@x.it")
        assert g.failures("192.0.2.1") == 0 and g.failures(account="alice@x.it") == 0
        # Two real failures, then an attempt that ends with no verdict (a second factor owed):
        # it stops counting, the failures stay.
        for _ in range(2):
            await g.before_login("192.0.2.1", "alice@x.it")
            g.failed("web", "192.0.2.1", "alice@x.it")
        await g.before_login("192.0.2.1", "alice@x.it")
        assert g.failures(account="alice@x.it") == 3
        g.release("192.0.2.1", "alice@x.it")
        assert g.failures(account="alice@x.it") == 2 and g.failures("192.0.2.1") == 2
        assert not g.clean("192.0.2.1")
        # A release with nothing reserved changes nothing.
        g.release("192.0.2.1", "alice@x.it")
        assert g.failures(account="alice@x.it") == 2
        # A success from an address that also guessed at another account gives back only its
        # own reservation there.
        await g.before_login("192.0.2.9", "mallory@x.it")
        g.failed("imap", "192.0.2.9", "mallory@x.it")
        await g.before_login("192.0.2.9", "eve@x.it")
        g.succeeded("192.0.2.9", "eve@x.it")
        assert g.failures("192.0.2.9") == 1

    asyncio.run(run())


def test_a_reservation_without_an_outcome_expires() -> None:
    g, t = make()
    g.reserve_seconds = 60.0

    async def run() -> None:
        for _ in range(5):  # the store failed: nobody reports these
            await g.before_login("192.0.2.1", "alice@x.it")
        assert g.failures(account="alice@x.it") == 5
        t.now += 61
        assert g.failures(account="alice@x.it") == 0 and g.failures("192.0.2.1") == 0
        before = t.now
        await g.before_login("192.0.2.1", "alice@x.it")
        assert t.now == before
        # A failure reported after its reservation expired still counts, once.
        g.failed("imap", "192.0.2.1", "alice@x.it")
        assert g.failures(account="alice@x.it") == 1

    asyncio.run(run())


def test_a_login_cancelled_while_waiting_gives_its_reservation_back() -> None:
    g, _t = make()
    for i in range(4):
        g.failed("smtp", f"198.51.100.{i}", "alice@x.it")

    async def never(seconds: float) -> None:
        await asyncio.Event().wait()

    g.sleep = never

    async def run() -> None:
        waiting = asyncio.create_task(g.before_login("203.0.113.1", "alice@x.it"))
        await wait_for_async(lambda: g.failures(account="alice@x.it") == 5, what="reserved")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert g.failures(account="alice@x.it") == 4
        assert g.failures("203.0.113.1") == 0

    asyncio.run(run())


def test_hash_slots_run_in_their_own_threads_not_the_default_executor() -> None:
    """A busy default executor (the webmail parses messages there) does not hold a password
    check back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pecd.store.accounts import HashSlots

    slots = HashSlots(2)
    busy = threading.Event()

    async def run() -> str:
        loop = asyncio.get_running_loop()
        default = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(default)
        hog = loop.run_in_executor(None, busy.wait, 10)  # the one default thread, held
        try:
            return await asyncio.wait_for(
                slots.run(True, lambda: threading.current_thread().name), timeout=5
            )
        finally:
            busy.set()
            await hog

    name = asyncio.run(run())
    assert name.startswith("pecd-hash")
    slots.close()
