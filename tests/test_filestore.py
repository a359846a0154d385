"""The file store: fsynced atomic writes, never outside the store, never overwriting."""

from __future__ import annotations

import subprocess
import sys
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
    assert list(store.tmp.rglob("*.part")) == []


_WRITER = """
import sys
from pathlib import Path
from storage import FileStore
store = FileStore(Path(sys.argv[1]))
(store._writing_dir() / "half.part").write_bytes(b"half")  # as if stopped mid-write
print("ready", flush=True)
sys.stdin.read()
"""


def _writer(root: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_reports_are_replaced_and_only_dead_writers_partial_files_cleaned(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.store_report("2.25.1", b"old")
    assert store.store_report("2.25.1", b"new").read_bytes() == b"new"
    crashed, alive = _writer(tmp_path), _writer(tmp_path)
    try:
        crashed.kill()  # SIGKILL: its lock goes with it, its partial file stays
        crashed.wait()
        assert len(list(store.tmp.rglob("*.part"))) == 2
        assert store.clean_tmp() == 1
        # The live writer's file and this process's own directory are kept.
        [kept] = store.tmp.rglob("*.part")
        assert len(list(store.tmp.iterdir())) == 2
        assert store.clean_tmp() == 0
    finally:
        alive.kill()
        alive.wait()
    assert store.clean_tmp() == 1 and not kept.exists()
