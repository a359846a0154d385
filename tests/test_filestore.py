"""The file store: fsynced atomic writes, never outside the store, never overwriting."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from storage import FileStore, InvalidUID
from storage.filestore import _BLOCK, _CHUNK, ConflictingContent, StoreFull


def receive(store: FileStore, uid: str, *parts: bytes | memoryview) -> tuple[Path, str, bool]:
    """What the receiver does: pynetdicom writes the fragments into the store's receiving file,
    the handler makes it durable and stores it, pynetdicom closes and removes it."""
    file = store.receiving_file(delete=False, mode="wb", suffix=".dcm")
    try:
        for part in parts:
            file.write(part)
        digest = store.finish_receiving(Path(file.name))
        return store.store_received_file(uid, Path(file.name), digest)
    finally:
        file.close()
        Path(file.name).unlink()


@pytest.mark.parametrize(
    "uid", ["../../etc/passwd", "1.2/../../x", "/abs", "1.2\x003", "", "1" * 65, "1..2", "1.2."]
)
def test_uids_that_are_not_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    store = FileStore(tmp_path / "store")
    with pytest.raises(InvalidUID):
        receive(store, uid, b"x")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("direct_io", [True, False])
def test_files_hold_exactly_the_parts_written(tmp_path: Path, direct_io: bool) -> None:
    """Lengths around the O_DIRECT block (4 KiB) and staging chunk (1 MiB), parts split across
    both: each file is the parts concatenated, its digest theirs."""
    store = FileStore(tmp_path, direct_io=direct_io)
    data = random.Random(7).randbytes(3 * _CHUNK + 5)
    for i, length in enumerate([0, 1, _BLOCK - 1, _BLOCK + 1, _CHUNK, _CHUNK + 1, len(data)]):
        whole = data[:length]
        parts = [whole[:130], memoryview(whole)[130 : _CHUNK + 7], whole[_CHUNK + 7 :]]
        path, digest, _ = receive(store, f"1.2.{i}", *parts)
        assert path.read_bytes() == whole and digest == hashlib.sha256(whole).hexdigest()
    assert store.direct_io == direct_io  # this file system took O_DIRECT: no fallback


def _run(*command: str | Path) -> str:
    return subprocess.run(
        list(map(str, command)), capture_output=True, text=True, check=True
    ).stdout


def _cached_bytes(path: Path) -> int:
    return int(_run("fincore", "--bytes", "--noheadings", "-o", "RES", path))


def test_direct_writes_leave_the_page_cache_alone(tmp_path: Path) -> None:
    """Where the file system honours O_DIRECT, a received image does not pass through the page
    cache (the CPU that copy cost is in bench/README.md); written buffered, it does."""
    if _run("stat", "--file-system", "--format=%T", tmp_path).strip() == "tmpfs":
        pytest.skip("tmpfs keeps every file in the page cache")
    image = random.Random(8).randbytes(3 << 20)
    direct, _, _ = receive(FileStore(tmp_path / "direct"), "1.2.3", image)
    buffered, _, _ = receive(FileStore(tmp_path / "buffered", direct_io=False), "1.2.3", image)
    assert _cached_bytes(direct) < _BLOCK * 2 < len(image) <= _cached_bytes(buffered)


def test_same_bytes_twice_is_a_duplicate_and_different_bytes_conflict(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    path, digest, again = receive(store, "1.2.3", b"first")
    assert not again and path.read_bytes() == b"first" and path.is_relative_to(tmp_path)
    assert receive(store, "1.2.3", b"first") == (path, digest, True)
    with pytest.raises(ConflictingContent):
        receive(store, "1.2.3", b"second")
    assert path.read_bytes() == b"first"
    assert [p for p in store.tmp.rglob("*") if p.is_file()] == []


def test_a_data_set_past_the_reserve_stops_growing_and_is_refused(tmp_path: Path) -> None:
    """The reserve is checked as the data set arrives: past it, the file gives its bytes back
    and making it durable raises StoreFull (the handler's 0xA700); nothing reaches pynetdicom's
    reader, which would drop the association with no status."""
    store = FileStore(tmp_path, min_free_bytes=0)
    file = store.receiving_file(suffix=".dcm")
    file.write(b"x" * 1000)
    store.min_free_bytes = 1 << 62  # the disk fills meanwhile
    assert file.write(random.Random(9).randbytes(9 << 20)) == 9 << 20  # taken, not raised
    with pytest.raises(StoreFull):
        store.finish_receiving(Path(file.name))
    assert Path(file.name).stat().st_size == 0
    file.close()


_WRITER = """
import sys
from pathlib import Path
from storage import FileStore
store = FileStore(Path(sys.argv[1]))
(store.writing_dir() / "half.part").write_bytes(b"half")  # as if stopped mid-write
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
