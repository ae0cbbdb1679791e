"""Unit tests of the Guard: connection limits, login delays, bounded memory, the rate-limited log."""

from __future__ import annotations

import asyncio
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
