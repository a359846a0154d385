"""The file store: fsynced atomic writes, never outside the store, never overwriting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from storage import FileStore, InvalidUID
from storage.filestore import ConflictingContent


@pytest.mark.parametrize(
    "uid", ["../../etc/passwd", "1.2/../../x", "/abs", "1.2\x003", "", "1" * 65, "1..2", "1.2."]
)
def test_uids_that_are_not_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    store = FileStore(tmp_path / "store")
    with pytest.raises(InvalidUID):
        store.store_received(uid, b"x")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_same_bytes_twice_is_a_duplicate_and_different_bytes_conflict(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    path, digest, again = store.store_received("1.2.3", b"first")
    assert not again and path.read_bytes() == b"first" and path.is_relative_to(tmp_path)
    assert store.store_received("1.2.3", b"first") == (path, digest, True)
    with pytest.raises(ConflictingContent):
        store.store_received("1.2.3", b"second")
    assert path.read_bytes() == b"first"
    assert list(store.tmp.iterdir()) == []


def test_reports_are_replaced_and_partial_files_cleaned(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.store_report("2.25.1", b"old")
    assert store.store_report("2.25.1", b"new").read_bytes() == b"new"
    crashed, writing = store.tmp / "crash.part", store.tmp / "another-process.part"
    crashed.write_bytes(b"half")
    hours_ago = time.time() - 7200
    os.utime(crashed, (hours_ago, hours_ago))
    writing.write_bytes(b"in flight")  # a receiver sharing the store, writing now
    assert store.clean_tmp() == 1 and list(store.tmp.iterdir()) == [writing]
