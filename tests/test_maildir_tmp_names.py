"""The tmp/ names of a batch delivery: unique in the batch (the random part is drawn once for
the batch), in the shape the tmp/ cleanup knows as pecd's own, and gone once delivered."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pecd.mailbox import maildir
from pecd.mailbox.maildir import Delivered, MaildirStore, Parcel


def test_every_file_of_a_batch_gets_its_own_tmp_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MaildirStore(tmp_path / "not-made-yet")
    opened: list[str] = []
    real_open = os.open

    def spy(path: str | Path, flags: int, mode: int = 0o777, **kw: object) -> int:
        name = os.fspath(path)
        if os.path.basename(os.path.dirname(name)) == "tmp" and ",S=" in name:
            opened.append(name)
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    parcels = [Parcel(f"u{i % 3}@pec.test", f"k{i % 5}", b"x\r\n" * (i + 1)) for i in range(12)]
    results = store.deliver_many(parcels)
    assert all(isinstance(r, Delivered) for r in results)
    names = [os.path.basename(p) for p in opened]
    assert len(names) == 12 and len(set(names)) == 12
    for name in names:
        assert maildir._OWN_TMP_RE.match(name), name
        assert name.split(".")[1] == str(os.getpid())
    assert not any(os.path.exists(p) for p in opened)


def test_a_mailbox_removed_by_hand_is_made_again_with_a_new_tmp_name(tmp_path: Path) -> None:
    store = MaildirStore(tmp_path / "mail")
    first = store.deliver_many([Parcel("a@pec.test", "one", b"1\r\n")])
    assert isinstance(first[0], Delivered)
    for sub in ("cur", "new", "tmp"):
        d = store.folder_path("a@pec.test") / sub
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    again = store.deliver_many([Parcel("a@pec.test", "two", b"2\r\n")])
    assert isinstance(again[0], Delivered) and again[0].created
    assert again[0].path.read_bytes() == b"2\r\n"
    assert again[0].path.parent == store.folder_path("a@pec.test") / "new"
