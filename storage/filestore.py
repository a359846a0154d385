"""DICOM files on local disk, written so that a Success response never outruns the disk.

Each write goes to a temporary file in the same file system, is fsynced, then moved to its final
name and the directory fsynced. Temporary files live in a directory of the writing process's
own, locked while it lives, so a starting process removes exactly what dead ones left. Files
are written with ``O_DIRECT`` where the file system allows it: an image is written once and
read once by the inference worker, and copying it into the page cache first cost more CPU than
anything else in the receive path (``bench/README.md``). Paths are built only from validated
UIDs, so a dataset cannot steer a write outside the store (pydicom's FileSet and pynetdicom's
qrscp have had such bugs).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

Buffer = bytes | memoryview  # collections.abc.Buffer arrives with Python 3.12

log = logging.getLogger("xrayage.storage")

# O_DIRECT wants the buffer address, file offset and length aligned to the logical block size:
# 4 KiB covers 512-byte and 4 KiB sectors. Writes are staged through one aligned buffer per
# thread (an anonymous mapping is page-aligned), so memory stays at 1 MiB per association.
_BLOCK = 4096
_CHUNK = 1 << 20

# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros in a component are
# non-conformant but common from older modalities; they are harmless for paths, so accepted.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUID(ValueError):
    pass


class StoreFull(OSError):
    """Writing would leave less free space than the store must keep."""


class ConflictingContent(Exception):
    """A different file is already stored under this SOP Instance UID."""


def validate_uid(uid: str) -> str:
    uid = uid.strip("\0 ") if uid else ""
    if len(uid) > 64 or not _UID.fullmatch(uid):
        raise InvalidUID(f"not a valid DICOM UID: {uid[:80]!r}")
    return uid


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Staging(threading.local):
    def __init__(self) -> None:
        self.buffer = mmap.mmap(-1, _CHUNK)


def _sha256(parts: Sequence[Buffer]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _write_all(fd: int, data: Buffer) -> None:
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view) :]


def _write_aligned(fd: int, parts: Sequence[Buffer], buf: mmap.mmap) -> None:
    """Write ``parts`` through the ``O_DIRECT`` descriptor ``fd`` in aligned chunks staged in
    ``buf``; the last chunk is padded to a block, then the file cut to its length."""
    filled = total = 0
    with memoryview(buf) as staged:
        for part in parts:
            with memoryview(part) as view:
                while view:
                    n = min(len(view), _CHUNK - filled)
                    staged[filled : filled + n] = view[:n]
                    filled, total, view = filled + n, total + n, view[n:]
                    if filled == _CHUNK:
                        _write_all(fd, staged)
                        filled = 0
        if filled:
            _write_all(fd, staged[: -(-filled // _BLOCK) * _BLOCK])
    os.ftruncate(fd, total)


class FileStore:
    """``incoming/`` holds received instances, ``reports/`` the SR and SC objects the node made."""

    def __init__(self, root: Path, min_free_bytes: int = 0, direct_io: bool = True) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._staging = _Staging()
        self._hashing = ThreadPoolExecutor(min(8, os.cpu_count() or 1), "xrayage-sha256")
        self.tmp = root / "tmp"
        for sub in (self.tmp, root / "incoming", root / "reports"):
            sub.mkdir(parents=True, exist_ok=True)
        self._own_tmp: Path | None = None
        self._own_fd = -1  # holds the flock on _own_tmp; closed by the kernel at exit
        self._own_lock = threading.Lock()

    def _writing_dir(self) -> Path:
        """This process's directory under ``tmp/``, made on first write and flocked for as long
        as the process lives (the kernel drops the lock at exit, ``kill -9`` included)."""
        with self._own_lock:
            while self._own_tmp is None:
                path = Path(tempfile.mkdtemp(dir=self.tmp))
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:  # a starting process removed it before we locked it
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # Or removed it between our open and our lock.
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        self._own_tmp, self._own_fd = path, fd
                except (FileNotFoundError, BlockingIOError):
                    pass
                if self._own_fd != fd:
                    os.close(fd)
            return self._own_tmp

    def path_for(self, area: str, sop_instance_uid: str) -> Path:
        uid = validate_uid(sop_instance_uid)
        shard = hashlib.sha1(uid.encode()).hexdigest()[:2]
        return self.root / area / shard / f"{uid}.dcm"

    def _wrote_direct(self, path: str, parts: Sequence[Buffer]) -> bool:
        """Write ``parts`` to ``path`` with ``O_DIRECT``; False, with nothing written, where the
        file system refuses it (some network and FUSE file systems, blocks over 4 KiB): writes
        go through the page cache from then on."""
        if not self.direct_io:
            return False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            try:
                _write_aligned(fd, parts, self._staging.buffer)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    os.ftruncate(fd, 0)
                raise
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.warning("%s refuses O_DIRECT writes (%s): writing through the page cache", path, e)
            self.direct_io = False
            return False
        return True

    def _write_tmp(self, parts: Sequence[Buffer]) -> tuple[Path, str]:
        """Write ``parts`` one after the other (no joined copy of a large image in memory) and
        fsync; returns the file and its SHA-256, hashed on another thread while the write waits
        for the disk (hashlib and the writes both release the GIL)."""
        fd, name = tempfile.mkstemp(dir=self._writing_dir(), suffix=".part")
        hashing = self._hashing.submit(_sha256, parts)
        try:
            if not self._wrote_direct(name, parts):
                for part in parts:
                    _write_all(fd, part)
            os.fsync(fd)  # the inode's data and size, whichever descriptor wrote them
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return Path(name), hashing.result()

    def free_bytes(self) -> int:
        """Free space where received files go, less the reserve (negative: below it)."""
        return shutil.disk_usage(self.root).free - self.min_free_bytes

    def store_received(self, sop_instance_uid: str, *parts: Buffer) -> tuple[Path, str, bool]:
        """Store received bytes unchanged, the file being ``parts`` concatenated. Returns
        (path, sha256, already_present).

        Refuses with :class:`StoreFull` when the write would eat into the reserve. Never
        overwrites: ``os.link`` fails if the final name exists, which makes two
        associations racing with the same UID safe. Same bytes again is a harmless duplicate;
        different bytes raise :class:`ConflictingContent` and leave the stored file untouched.
        """
        final = self.path_for("incoming", sop_instance_uid)
        above = self.free_bytes()
        if above - sum(len(memoryview(p)) for p in parts) < 0:
            raise StoreFull(
                errno.ENOSPC,
                f"{(above + self.min_free_bytes) >> 20} MB free, "
                f"{self.min_free_bytes >> 20} MB kept in reserve",
                str(self.root),
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp, digest = self._write_tmp(parts)
        try:
            os.link(tmp, final)
        except FileExistsError:
            if sha256_of(final) != digest:
                raise ConflictingContent(sop_instance_uid) from None
            return final, digest, True
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return final, digest, False

    def store_report(self, sop_instance_uid: str, data: bytes) -> Path:
        """Store an object the node made; its UID is deterministic, so a rewrite replaces."""
        final = self.path_for("reports", sop_instance_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp, _ = self._write_tmp([data])
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def clean_tmp(self) -> int:
        """Remove the partial writes of processes that died (none was ever acknowledged),
        leaving those of live processes sharing the store (receivers and workers on one volume).
        Returns how many files were removed."""
        removed = 0
        for path in self.tmp.iterdir():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive
                os.close(fd)
                continue
            try:
                removed += sum(1 for p in path.iterdir() if p.is_file())
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)
        return removed
