"""MaildirStore: layout, atomic idempotent delivery, line endings, quota, address safety."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pecd.mailbox.maildir import MailboxFull, MaildirStore, folder_dir, to_crlf

ADDR = "Alice@Example.ORG"


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "mail")


def test_path_for_is_domain_then_localpart_lowercased(store: MaildirStore) -> None:
    assert store.path_for(ADDR) == store.root / "example.org" / "alice"


@pytest.mark.parametrize(
    "address",
    [
        "../x@example.org",
        "..@example.org",
        ".@example.org",
        ".hidden@example.org",
        "a/b@example.org",
        "a\\b@example.org",
        "a\x00b@example.org",
        "a\nb@example.org",
        "a@..",
        "a@../etc",
        "a@example.org/..",
        "a@.",
        "a..b@example.org",
        "noat",
        "@example.org",
        "a@",
        "",
        "x" * 300 + "@example.org",
    ],
)
def test_path_for_rejects_escaping_addresses(store: MaildirStore, address: str) -> None:
    with pytest.raises(ValueError):
        store.path_for(address)
    with pytest.raises(ValueError):
        store.deliver(address, "k", b"Subject: x\r\n\r\nx\r\n")
    assert not store.root.exists() or not any(store.root.rglob("*"))


def test_ensure_creates_maildirpp_layout_idempotently(store: MaildirStore) -> None:
    base = store.ensure(ADDR)
    assert store.ensure(ADDR) == base
    for sub in ("cur", "new", "tmp"):
        assert (base / sub).is_dir()
        for folder in (".Sent", ".Drafts", ".Trash"):
            assert (base / folder / sub).is_dir()
    for folder in (".Sent", ".Drafts", ".Trash"):
        assert (base / folder / "maildirfolder").is_file()


def test_folder_dir_names() -> None:
    assert folder_dir("INBOX") == ""
    assert folder_dir("inbox") == ""
    assert folder_dir("Sent") == ".Sent"
    assert folder_dir("Archive/2026") == ".Archive.2026"
    for bad in ("", "a.b", "../x", "a//b", "a\x00"):
        with pytest.raises(ValueError):
            folder_dir(bad)


def test_to_crlf() -> None:
    assert to_crlf(b"a\nb\n") == b"a\r\nb\r\n"
    assert to_crlf(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert to_crlf(b"a\r\nb\nc") == b"a\r\nb\r\nc"
    assert to_crlf(b"lone\rcr\n") == b"lone\rcr\r\n"
    assert to_crlf(b"") == b""


def test_deliver_writes_new_file_named_from_key(store: MaildirStore) -> None:
    data = b"Subject: hi\r\n\r\nhello\r\n"
    result = store.deliver(ADDR, "msg-1", data)
    assert result.created
    stem = hashlib.sha256(b"msg-1").hexdigest()[:40]
    assert result.path == store.path_for(ADDR) / "new" / f"{stem},S={len(data)}"
    assert result.path.read_bytes() == data
    assert not any((store.path_for(ADDR) / "tmp").iterdir())
    assert store.list_folder(ADDR) == [result.path]


def test_deliver_turns_bare_lf_into_crlf(store: MaildirStore) -> None:
    result = store.deliver(ADDR, "lf", "Subject: è\n\nciao è\n".encode())
    expected = "Subject: è\r\n\r\nciao è\r\n".encode()
    assert result.path.read_bytes() == expected
    assert result.path.name.endswith(f",S={len(expected)}")


def test_deliver_is_idempotent(store: MaildirStore) -> None:
    first = store.deliver(ADDR, "same-key", b"Subject: a\r\n\r\na\r\n")
    again = store.deliver(ADDR, "same-key", b"Subject: a\r\n\r\na\r\n")
    assert first.created and not again.created
    assert again.path == first.path
    assert len(store.list_folder(ADDR)) == 1


def test_deliver_is_idempotent_after_imap_claimed_and_flagged(store: MaildirStore) -> None:
    first = store.deliver(ADDR, "k", b"Subject: a\r\n\r\na\r\n")
    # An IMAP server moves new/ -> cur/ and appends ":2,<flags>" when the holder reads it.
    claimed = first.path.parent.parent / "cur" / (first.path.name + ":2,S")
    os.rename(first.path, claimed)
    again = store.deliver(ADDR, "k", b"Subject: a\r\n\r\na\r\n")
    assert not again.created
    assert again.path == claimed
    assert store.list_folder(ADDR) == [claimed]


def test_a_fresh_delivery_does_not_read_the_folder(
    store: MaildirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fresh=True (the key was never delivered) skips the search for an earlier copy, which
    reads the whole folder; a second delivery of the key is still caught in new/."""
    store.deliver(ADDR, "older", b"Subject: o\r\n\r\no\r\n")

    def no_search(*_: object) -> None:
        raise AssertionError("searched the folder")

    monkeypatch.setattr(MaildirStore, "_existing", staticmethod(no_search))
    first = store.deliver(ADDR, "k", b"Subject: a\r\n\r\na\r\n", fresh=True)
    again = store.deliver(ADDR, "k", b"Subject: a\r\n\r\na\r\n", fresh=True)
    assert first.created and not again.created
    assert len(store.list_folder(ADDR)) == 2


def test_concurrent_deliveries_of_one_key_create_one_file(store: MaildirStore) -> None:
    data = b"Subject: race\r\n\r\nx\r\n"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.deliver(ADDR, "race", data), range(16)))
    assert sum(r.created for r in results) == 1
    assert len(store.list_folder(ADDR)) == 1
    assert not any((store.path_for(ADDR) / "tmp").iterdir())


def test_distinct_keys_make_distinct_files(store: MaildirStore) -> None:
    for i in range(3):
        assert store.deliver(ADDR, f"k{i}", b"Subject: s\r\n\r\nsame body\r\n").created
    assert len(store.list_folder(ADDR)) == 3


def test_deliver_to_subfolder(store: MaildirStore) -> None:
    result = store.deliver(ADDR, "s", b"Subject: s\r\n\r\ns\r\n", folder="Sent")
    assert result.path.parent == store.path_for(ADDR) / ".Sent" / "new"
    assert store.list_folder(ADDR, "Sent") == [result.path]
    assert store.list_folder(ADDR) == []
    with pytest.raises(ValueError):
        store.deliver(ADDR, "s2", b"x", folder="../../etc")


def test_usage_counts_all_folders(store: MaildirStore) -> None:
    assert store.usage(ADDR) == 0
    store.deliver(ADDR, "a", b"x" * 100)
    store.deliver(ADDR, "b", b"y" * 50, folder="Trash")
    # A file written by another program, without S= in its name, is measured with stat.
    (store.path_for(ADDR) / "cur" / "123.M1P2.host:2,S").write_bytes(b"z" * 25)
    assert store.usage(ADDR) == 175


def test_quota_refuses_before_writing(store: MaildirStore) -> None:
    store.deliver(ADDR, "a", b"x" * 600, quota_bytes=1000)
    with pytest.raises(MailboxFull) as info:
        store.deliver(ADDR, "b", b"y" * 500, quota_bytes=1000)
    assert info.value.address == ADDR.lower()
    assert info.value.usage == 600
    assert info.value.quota == 1000
    assert len(store.list_folder(ADDR)) == 1
    assert not any((store.path_for(ADDR) / "tmp").iterdir())
    # Exactly at the quota is allowed; a re-delivery of a stored key is never refused.
    assert store.deliver(ADDR, "c", b"z" * 400, quota_bytes=1000).created
    assert not store.deliver(ADDR, "a", b"x" * 600, quota_bytes=1000).created


def test_users_have_separate_directories(store: MaildirStore) -> None:
    store.deliver("alice@example.org", "k", b"Subject: a\r\n\r\na\r\n")
    store.deliver("bob@example.org", "k", b"Subject: b\r\n\r\nb\r\n")
    assert store.path_for("alice@example.org") != store.path_for("bob@example.org")
    (alice,) = store.list_folder("alice@example.org")
    (bob,) = store.list_folder("bob@example.org")
    assert alice.read_bytes().endswith(b"a\r\n")
    assert bob.read_bytes().endswith(b"b\r\n")
