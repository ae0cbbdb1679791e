"""Maildir deliveries made durable a batch at a time (MaildirStore.deliver_many): every file's
contents durable before it is linked, every link durable before success is reported, a flush that
fails fails the whole batch, and a retry never makes a second copy."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pecd.engine.effects import Delivery
from pecd.engine.vocab import Stored
from pecd.mailbox import maildir
from pecd.mailbox.maildir import Delivered, MailboxFull, MaildirStore, Parcel
from pecd.runtime.delivering import deliver_each
from pecd.runtime.diskspace import StorageUnavailable

ALICE = "alice@pec.example.it"
BOB = "bob@pec.example.it"
SERVICE = "posta-certificata@pec.example.it"


def msg(n: int) -> bytes:
    return f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode()


def parcels(n: int) -> list[Parcel]:
    boxes = (ALICE, BOB, SERVICE)
    return [Parcel(boxes[i % 3], f"key-{i}", msg(i)) for i in range(n)]


def files(store: MaildirStore, address: str, sub: str) -> list[str]:
    return sorted(os.listdir(store.folder_path(address) / sub))


def all_messages(store: MaildirStore) -> list[str]:
    return sorted(p.name for a in (ALICE, BOB, SERVICE) for p in store.list_folder(a))


_REAL_SYNCFS = maildir._load_syncfs()


class FakeSyncfs:
    """Stands for syncfs(2): counts calls, fails those whose number is in ``fail`` with
    ``error``, and otherwise makes everything durable (the real syncfs, or sync(2))."""

    def __init__(self, fail: set[int] | None = None, error: int = errno.EIO) -> None:
        self.calls = 0
        self.fail = fail or set()
        self.error = error

    def __call__(self, fd: int) -> int:
        self.calls += 1
        if self.calls in self.fail:
            ctypes.set_errno(self.error)
            return -1
        if _REAL_SYNCFS is not None:
            return _REAL_SYNCFS(fd)
        os.sync()
        return 0


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    s = MaildirStore(tmp_path / "mail")
    for a in (ALICE, BOB, SERVICE):
        s.ensure(a)
    return s


@pytest.fixture
def syncfs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeSyncfs]]:
    def install(fail: set[int] | None = None, error: int = errno.EIO) -> FakeSyncfs:
        fake = FakeSyncfs(fail, error)
        monkeypatch.setattr(maildir, "_SYNCFS", fake)
        return fake

    yield install


def test_a_batch_is_delivered_in_order_with_two_flushes(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    fake = syncfs()
    results = store.deliver_many(parcels(9))
    assert all(isinstance(r, Delivered) and r.created for r in results)
    assert fake.calls == 2  # contents, then links: not two fsyncs per file
    for p, r in zip(parcels(9), results, strict=True):
        assert isinstance(r, Delivered)
        assert r.path.read_bytes() == p.data
        assert r.path.parent == store.folder_path(p.address) / "new"
        assert r.path.name.startswith(MaildirStore.name_for(p.key))
    assert not any(files(store, a, "tmp") for a in (ALICE, BOB, SERVICE))
    # Again: found, not written again, and still flushed before it is reported.
    again = store.deliver_many(parcels(9))
    assert [r.path for r in again if isinstance(r, Delivered)] == [
        r.path for r in results if isinstance(r, Delivered)
    ]
    assert not any(isinstance(r, Delivered) and r.created for r in again)
    assert fake.calls == 4
    assert len(all_messages(store)) == 9


def test_a_failed_contents_flush_fails_every_parcel_and_leaves_nothing_visible(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs(fail={1})
    results = store.deliver_many(parcels(6))
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    assert all_messages(store) == []
    assert not any(files(store, a, "tmp") for a in (ALICE, BOB, SERVICE))
    # The retry delivers each once.
    syncfs()
    retry = store.deliver_many(parcels(6))
    assert all(isinstance(r, Delivered) and r.created for r in retry)
    assert len(all_messages(store)) == 6


def test_a_failed_links_flush_fails_every_parcel_and_a_retry_makes_no_second_copy(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs(fail={2})
    results = store.deliver_many(parcels(6))
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
    # The links stay (their contents were durable before they were made), unreported.
    linked = all_messages(store)
    assert len(linked) == 6
    # An IMAP server claims one meanwhile: it is still found.
    first = store.folder_path(ALICE) / "new" / files(store, ALICE, "new")[0]
    os.rename(first, store.folder_path(ALICE) / "cur" / (first.name + ":2,S"))
    fake = syncfs()
    retry = store.deliver_many(parcels(6))
    assert all(isinstance(r, Delivered) and not r.created for r in retry)
    assert fake.calls >= 1  # found files are reported only after a flush of their own
    assert len(all_messages(store)) == 6
    assert not any(files(store, a, "tmp") for a in (ALICE, BOB, SERVICE))


def test_a_failed_flush_is_a_transient_fault_for_every_delivery(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs(fail={2}, error=errno.EIO)
    items = [Delivery(p.address, p.key, p.data, None) for p in parcels(4)]
    with pytest.raises(StorageUnavailable, match="EIO"):
        deliver_each(store, items)
    syncfs()
    assert [o.stored for o in deliver_each(store, items)] == [Stored.DELIVERED] * 4
    assert len(all_messages(store)) == 4


def test_one_parcel_failing_does_not_stop_the_others(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs()
    batch = [
        Parcel(ALICE, "a", msg(1)),
        Parcel(BOB, "big", msg(2) * 100, quota_bytes=10),
        Parcel("not an address", "x", msg(3)),
        Parcel(BOB, "b", msg(4)),
    ]
    results = store.deliver_many(batch)
    assert isinstance(results[0], Delivered) and results[0].created
    assert isinstance(results[1], MailboxFull)
    assert isinstance(results[2], ValueError)
    assert isinstance(results[3], Delivered) and results[3].created
    assert len(all_messages(store)) == 2
    outcomes = deliver_each(
        store, [Delivery(p.address, p.key, p.data, p.quota_bytes) for p in batch]
    )
    assert [o.stored for o in outcomes] == [
        Stored.DELIVERED,
        Stored.FULL,
        Stored.FAILED,
        Stored.DELIVERED,
    ]


def test_a_quota_counts_the_parcels_of_the_same_batch(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs()
    one = len(msg(1))
    batch = [Parcel(BOB, f"q{i}", msg(1), quota_bytes=2 * one) for i in range(3)]
    results = store.deliver_many(batch)
    assert [type(r) for r in results] == [Delivered, Delivered, MailboxFull]


def test_the_same_key_twice_in_a_batch_makes_one_file(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs()
    for fresh in (False, True):
        key = f"twice-{fresh}"
        results = store.deliver_many([Parcel(ALICE, key, msg(1))] * 2, fresh=fresh)
        assert [isinstance(r, Delivered) and r.created for r in results] == [True, False]
        assert isinstance(results[0], Delivered) and isinstance(results[1], Delivered)
        assert results[0].path == results[1].path
    assert len(all_messages(store)) == 2


@pytest.mark.parametrize(
    "fresh", [(True, True), (True, False), (False, True), (False, False)], ids=str
)
def test_a_key_twice_in_a_batch_is_one_file_even_fresh_and_of_other_sizes(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs], fresh: tuple[bool, bool]
) -> None:
    """Fresh skips the search for an earlier copy; within one batch the key's first parcel is
    still seen, whatever the sizes (the file name holds the size, so a link would not clash)
    and whichever parcels are fresh: one file, the later parcel gets the first one's file."""
    syncfs()
    batch = [
        Parcel(ALICE, "twice", msg(1), fresh=fresh[0]),
        Parcel(ALICE, "twice", msg(1) + b"a longer second copy\r\n", fresh=fresh[1]),
    ]
    results = store.deliver_many(batch)
    assert [isinstance(r, Delivered) and r.created for r in results] == [True, False]
    first, second = results
    assert isinstance(first, Delivered) and isinstance(second, Delivered)
    assert first.path == second.path and first.path.read_bytes() == msg(1)
    assert len(store.list_folder(ALICE)) == 1
    # The same with fresh for the whole batch.
    results = store.deliver_many([Parcel(BOB, "k", msg(2)), Parcel(BOB, "k", msg(22))], fresh=True)
    assert all(isinstance(r, Delivered) for r in results)
    assert len(store.list_folder(BOB)) == 1


def test_a_key_twice_in_a_batch_shares_the_first_ones_refusal(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    """The first parcel of a key refused (over quota): a later, smaller one of the same key in
    the same batch is refused as well, not stored in its place."""
    syncfs()
    small = msg(1)
    big = small + b"x" * 100
    batch = [
        Parcel(ALICE, "q", big, quota_bytes=len(small) + 10, fresh=True),
        Parcel(ALICE, "q", small, quota_bytes=len(small) + 10, fresh=True),
    ]
    results = store.deliver_many(batch)
    assert [type(r) for r in results] == [MailboxFull, MailboxFull]
    assert store.list_folder(ALICE) == []


def test_a_new_mailbox_is_made_inside_the_batch(
    tmp_path: Path, syncfs: Callable[..., FakeSyncfs]
) -> None:
    fake = syncfs()
    store = MaildirStore(tmp_path / "mail")
    results = store.deliver_many([Parcel(ALICE, "n1", msg(1)), Parcel(BOB, "n2", msg(2), "Sent")])
    assert all(isinstance(r, Delivered) and r.created for r in results)
    assert fake.calls == 2
    assert (store.folder_path(BOB, "Sent") / "maildirfolder").exists()
    assert all((store.folder_path(ALICE, f) / "cur").is_dir() for f in maildir.FOLDERS)


def test_without_syncfs_each_file_is_fsynced_before_its_link_and_each_directory_once(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback (another system, an old kernel, sync="fsync"): no syncfs at all."""
    monkeypatch.setattr(maildir, "_SYNCFS", None)
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: str | Path, dst: str | Path) -> None:
        events.append(("link", str(src)))
        real_link(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a descriptor's file")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    results = store.deliver_many(parcels(6))
    assert all(isinstance(r, Delivered) and r.created for r in results)
    links = [path for kind, path in events if kind == "link"]
    assert len(links) == 6
    for path in links:  # the contents durable before the file is visible
        assert events.index(("fsync", os.path.realpath(path))) < events.index(("link", path))
    new_dirs = {os.path.realpath(store.folder_path(a) / "new") for a in (ALICE, BOB, SERVICE)}
    dir_syncs = [path for kind, path in events if kind == "fsync" and path in new_dirs]
    assert sorted(dir_syncs) == sorted(new_dirs)  # each directory once, after every link
    last_link = max(i for i, (kind, _) in enumerate(events) if kind == "link")
    assert all(events.index(("fsync", d)) > last_link for d in new_dirs)


def test_sync_fsync_mode_never_calls_syncfs(
    tmp_path: Path, syncfs: Callable[..., FakeSyncfs]
) -> None:
    fake = syncfs()
    store = MaildirStore(tmp_path / "mail", sync="fsync")
    results = store.deliver_many(parcels(4))
    assert all(isinstance(r, Delivered) and r.created for r in results)
    assert fake.calls == 0


def test_a_fsync_failing_in_the_fallback_fails_its_parcel_only(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maildir, "_SYNCFS", None)
    real_fsync = os.fsync
    bob = os.path.realpath(store.folder_path(BOB))

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(bob + "/tmp/"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a descriptor's file")
    monkeypatch.setattr(os, "fsync", fsync)
    results = store.deliver_many(parcels(6))
    for p, r in zip(parcels(6), results, strict=True):
        if p.address == BOB:
            assert isinstance(r, OSError) and r.errno == errno.EIO
        else:
            assert isinstance(r, Delivered) and r.created
    assert files(store, BOB, "new") == [] and files(store, BOB, "tmp") == []


def test_syncfs_refused_by_the_system_falls_back_to_fsync(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    fake = syncfs(fail={1}, error=errno.ENOSYS)
    results = store.deliver_many(parcels(3))
    assert all(isinstance(r, Delivered) and r.created for r in results)
    assert fake.calls == 1
    assert maildir._SYNCFS is None  # not asked again
    assert store.deliver_many([Parcel(ALICE, "later", msg(9))])[0]


def test_deliver_raises_what_its_batch_of_one_met(
    store: MaildirStore, syncfs: Callable[..., FakeSyncfs]
) -> None:
    syncfs(fail={1})
    with pytest.raises(OSError) as info:
        store.deliver(ALICE, "k", msg(1))
    assert info.value.errno == errno.EIO
    syncfs()
    assert store.deliver(ALICE, "k", msg(1)).created
