"""dovecot-uidlist: reading and writing it as Dovecot does, UIDs that never change."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pecd.mailbox import uidlist
from pecd.mailbox.uidlist import FILE_NAME, LOCK_NAME, UidListLocked, sync


def make_folder(path: Path, *, sub: bool = False) -> Path:
    for d in ("cur", "new", "tmp"):
        (path / d).mkdir(parents=True, exist_ok=True)
    if sub:
        (path / "maildirfolder").touch()
    return path


def put(
    folder: Path, name: str, data: bytes = b"x\r\n", *, sub: str = "new", mtime: float = 0
) -> Path:
    path = folder / sub / name
    path.write_bytes(data)
    if mtime:
        os.utime(path, (mtime, mtime))
    return path


def test_new_list_numbers_files_in_arrival_order(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    put(folder, "zzz,S=3", mtime=1000)
    put(folder, "aaa,S=3", mtime=3000)
    put(folder, "mmm,S=3:2,S", sub="cur", mtime=2000)
    put(folder, "bbb,S=3", mtime=2000)  # same mtime as mmm: name decides
    listing = sync(folder)
    assert [(e.uid, e.name) for e in listing.entries] == [
        (1, "zzz,S=3"),
        (2, "bbb,S=3"),
        (3, "mmm,S=3"),
        (4, "aaa,S=3"),
    ]
    assert listing.next_uid == 5
    assert listing.uid_validity >= int(time.time()) - 5
    assert len(listing.guid) == 32
    assert listing.entries[2].path == folder / "cur" / "mmm,S=3:2,S"
    assert listing.entries[0].size == 3
    text = (folder / FILE_NAME).read_text()
    assert text.splitlines()[0] == f"3 V{listing.uid_validity} N5 G{listing.guid}"
    assert text.splitlines()[1] == "1 :zzz,S=3"
    assert not (folder / LOCK_NAME).exists()


def test_dovecot_list_is_kept_byte_for_byte_when_nothing_changes(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    put(folder, "1700000000.M1P1.host,S=10,W=12:2,S", b"0123456789", sub="cur")
    put(folder, "1700000001.M1P1.host,S=10,W=12", b"0123456789")
    text = (
        "3 V1700000000 N9 G5c0a1c2b3d4e5f60718293a4b5c6d7e8 X77\n"
        "3 W12 S10 :1700000000.M1P1.host,S=10,W=12\n"
        "7 W12 :1700000001.M1P1.host,S=10,W=12\n"
    )
    (folder / FILE_NAME).write_text(text)
    listing = sync(folder)
    assert [e.uid for e in listing.entries] == [3, 7]
    assert listing.uid_validity == 1700000000
    assert listing.next_uid == 9
    assert listing.guid == "5c0a1c2b3d4e5f60718293a4b5c6d7e8"
    assert listing.entries[0].fields == {"W": "12", "S": "10"}
    assert listing.entries[0].size == 10
    assert (folder / FILE_NAME).read_text() == text


def test_stale_next_uid_header_never_reuses_listed_uids(tmp_path: Path) -> None:
    # Dovecot appends records without rewriting the header: N can be below the UIDs listed.
    folder = make_folder(tmp_path / "m")
    for name in ("a", "b", "c"):
        put(folder, name)
    (folder / FILE_NAME).write_text("3 V42 N2 Gabc\n1 :a\n2 :b\n5 :c\n")
    put(folder, "d")
    listing = sync(folder)
    assert [(e.uid, e.name) for e in listing.entries] == [(1, "a"), (2, "b"), (5, "c"), (6, "d")]
    assert listing.next_uid == 7
    assert (folder / FILE_NAME).read_text().splitlines()[0] == "3 V42 N7 Gabc"


def test_next_uid_above_listed_uids_is_kept(tmp_path: Path) -> None:
    # The known pymap defect: N (after expunges) above every UID listed; nothing renumbered.
    folder = make_folder(tmp_path / "m")
    put(folder, "a", sub="cur")
    put(folder, "b")
    (folder / FILE_NAME).write_text("3 V42 N151 G00\n3 :a\n4 :b\n")
    listing = sync(folder)
    assert [(e.uid, e.name) for e in listing.entries] == [(3, "a"), (4, "b")]
    assert listing.next_uid == 151
    put(folder, "c")
    listing = sync(folder)
    assert [(e.uid, e.name) for e in listing.entries] == [(3, "a"), (4, "b"), (151, "c")]
    assert listing.uid_validity == 42


def test_expunged_records_dropped_and_uid_not_reused(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    a = put(folder, "a", mtime=1)
    put(folder, "b", mtime=2)
    first = sync(folder)
    a.unlink()
    put(folder, "c", mtime=3)
    second = sync(folder)
    assert [(e.uid, e.name) for e in second.entries] == [(2, "b"), (3, "c")]
    assert ":a" not in (folder / FILE_NAME).read_text().split()
    assert second.uid_validity == first.uid_validity
    # The highest one gone too: N still past it.
    for e in second.entries:
        e.path.unlink()
    third = sync(folder)
    assert third.entries == [] and third.next_uid == 4


def test_file_moved_to_cur_with_flags_keeps_uid(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    p = put(folder, "a,S=3")
    uid = sync(folder).entries[0].uid
    os.rename(p, folder / "cur" / "a,S=3:2,RS")
    listing = sync(folder)
    assert [(e.uid, e.path.name) for e in listing.entries] == [(uid, "a,S=3:2,RS")]


def test_version_1_list_is_read_and_upgraded(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    put(folder, "a")
    put(folder, "b:2,S", sub="cur")
    (folder / FILE_NAME).write_text("1 1234 10\n4 a\n8 b:2,S\n")
    listing = sync(folder)
    assert [(e.uid, e.name) for e in listing.entries] == [(4, "a"), (8, "b")]
    assert listing.uid_validity == 1234 and listing.next_uid == 10
    assert (folder / FILE_NAME).read_text().startswith("3 V1234 N10 G")


def test_new_uidvalidity_differs_from_a_previous_one(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "m")
    sent = make_folder(root / ".Sent", sub=True)
    first = sync(sent).uid_validity
    # The folder is deleted and made again within the same second: a new UIDVALIDITY.
    (sent / FILE_NAME).unlink()
    second = sync(sent).uid_validity
    assert second > first
    # An unreadable list whose V can still be read: above it.
    (sent / FILE_NAME).write_text(f"3 V{second + 1000} Nbad\n")
    assert sync(sent).uid_validity > second + 1000
    assert (root / "dovecot-uidvalidity").read_text() == f"{sync(sent).uid_validity:08x}"


def test_fields_for_new_files(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    put(folder, "a")
    listing = sync(folder, fields={"a": {"E": "e1", "T": "t1"}})
    assert listing.entries[0].fields == {"E": "e1", "T": "t1"}
    assert "1 Ee1 Tt1 :a" in (folder / FILE_NAME).read_text()


def test_live_lock_times_out_and_stale_lock_is_broken(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    put(folder, "a")
    lock = folder / LOCK_NAME
    lock.write_text("")
    with pytest.raises(UidListLocked):
        sync(folder, timeout=0.05)
    old = time.time() - uidlist.STALE_SECONDS - 10
    os.utime(lock, (old, old))
    assert [e.uid for e in sync(folder, timeout=0.05).entries] == [1]
    assert not lock.exists()


def test_read_only_listing(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m")
    assert uidlist.read(folder) is None
    put(folder, "a")
    sync(folder)
    put(folder, "b")
    got = uidlist.read(folder)
    assert got is not None and [e.name for e in got.entries] == ["a"]


# -- the property ------------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 5)),
        st.tuples(st.just("expunge"), st.integers(0, 20)),
        st.tuples(st.just("flag"), st.integers(0, 20)),
        st.tuples(st.just("sync"), st.just(0)),
        st.tuples(st.just("dovecot_append"), st.integers(0, 20)),
    ),
    max_size=25,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_ops)
def test_uids_never_change_and_next_uid_never_falls(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    folder = make_folder(tmp_path_factory.mktemp("p") / "m")
    seen: dict[str, int] = {}  # name -> uid, for every name ever listed
    validity = 0
    next_uid = 0
    counter = 0
    for op, arg in ops:
        current = sorted(p for sub in ("new", "cur") for p in (folder / sub).iterdir())
        if op == "add":
            for _ in range(arg):
                counter += 1
                put(folder, f"m{counter:04d},S=3", mtime=1_000_000 + (counter * 7919) % 97)
        elif op == "expunge" and current:
            current[arg % len(current)].unlink()
        elif op == "flag" and current:
            p = current[arg % len(current)]
            os.rename(p, folder / "cur" / (p.name.split(":")[0] + f":2,{'S' if arg % 2 else 'RS'}"))
        elif op == "dovecot_append" and (folder / FILE_NAME).exists():
            # Dovecot appends a record for a file it found, header untouched.
            listing = sync(folder)
            counter += 1
            name = f"d{counter:04d}"
            put(folder, name)
            with open(folder / FILE_NAME, "a") as fh:
                fh.write(f"{listing.next_uid + arg} W3 :{name}\n")
        listing = sync(folder)
        if validity:
            assert listing.uid_validity == validity
        validity = listing.uid_validity
        assert listing.next_uid >= next_uid
        next_uid = listing.next_uid
        uids = [e.uid for e in listing.entries]
        assert uids == sorted(set(uids))
        assert all(u < listing.next_uid for u in uids)
        for e in listing.entries:
            if e.name in seen:
                assert seen[e.name] == e.uid
            else:
                # A new UID is never one an earlier file had.
                assert e.uid not in seen.values()
            seen[e.name] = e.uid
        present = {p.name.split(":")[0] for sub in ("new", "cur") for p in (folder / sub).iterdir()}
        assert {e.name for e in listing.entries} == present
