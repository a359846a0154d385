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

import contextlib
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


class _AlignedWriter:
    """Writes through the ``O_DIRECT`` descriptor ``fd`` in aligned chunks staged in ``buf``;
    :meth:`finish` pads the last chunk to a block, then cuts the file to its length. A file
    system that refuses ``O_DIRECT`` (EINVAL) is written through the page cache from then on."""

    def __init__(self, fd: int, buf: mmap.mmap, on_refused: Callable[[OSError], None]) -> None:
        self.fd, self.buf, self.on_refused = fd, buf, on_refused
        self.filled = self.total = 0

    def write(self, part: Buffer) -> None:
        with memoryview(self.buf) as staged, memoryview(part) as view:
            while view:
                n = min(len(view), _CHUNK - self.filled)
                staged[self.filled : self.filled + n] = view[:n]
                self.filled, self.total, view = self.filled + n, self.total + n, view[n:]
                if self.filled == _CHUNK:
                    self._out(staged)
                    self.filled = 0

    def finish(self) -> None:
        if self.filled:
            with memoryview(self.buf) as staged:
                self._out(staged[: -(-self.filled // _BLOCK) * _BLOCK])
            self.filled = 0
        os.ftruncate(self.fd, self.total)

    def _out(self, data: memoryview) -> None:
        try:
            _write_all(self.fd, data)
        except OSError as e:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if e.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise
            self.on_refused(e)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            _write_all(self.fd, data)


# How often a data set being received checks the store's reserve of free space.
_ROOM_EVERY = 8 << 20


class ReceivingFile:
    """A received data set, written into the store by pynetdicom as its fragments arrive
    (``node.compat.receive_datasets_to_files``), with the interface of the
    ``NamedTemporaryFile`` it replaces there: ``name``, ``write``, ``file.flush``, ``close``.

    Written as the store writes (``O_DIRECT`` in aligned 1 MiB chunks, past the page cache, where
    the file system allows it) and hashed as it arrives, so that holding it costs 1 MiB whatever
    its size. A write the kernel refuses (a full disk, EFBIG) or one that would eat into the
    store's reserve is not raised into pynetdicom's reader, which would drop the association
    with no status: the file stops growing, keeps the reason (``error``) and gives its bytes
    back, and the C-STORE handler answers Out of Resources.
    """

    def __init__(self, store: FileStore, suffix: str = ".dcm", **_: Any) -> None:
        self.fd, self.name = store.open_tmp(suffix)
        self.file = self  # pynetdicom flushes ``.file``
        self.error: OSError | None = None
        self._writer = _AlignedWriter(self.fd, mmap.mmap(-1, _CHUNK), store.refused_direct)
        # Hashed in the reading thread: handing fragments to the hashing threads was measured
        # slower over 1, 4 and 10 associations (bench/README.md).
        self._digest = hashlib.sha256()
        self._store = store
        self._unchecked = _ROOM_EVERY  # the first write checks
        store.receiving[self.name] = self

    def write(self, data: Buffer) -> int:
        size = len(memoryview(data))
        if self.error is None:
            try:
                self._unchecked += size
                if self._unchecked >= _ROOM_EVERY:
                    self._unchecked = 0
                    self._store.check_room(0)
                self._digest.update(data)
                self._writer.write(data)
            except OSError as e:
                self._fail(e)
        return size

    def flush(self) -> None:
        """Nothing: the data set is made durable whole, by :meth:`finish`."""

    def finish(self) -> str:
        """The whole data set on disk (fsynced); its SHA-256. Raises what a write ran into."""
        if self.error is None:
            try:
                self._writer.finish()
                os.fsync(self.fd)
            except OSError as e:
                self._fail(e)
        if self.error is not None:
            raise self.error
        return self._digest.hexdigest()

    def _fail(self, error: OSError) -> None:
        self.error = error
        with contextlib.suppress(OSError):  # its space is given back to the store
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        self._store.receiving.pop(self.name, None)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._writer.buf.close()


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
        # Data sets being received, by file name: what a write of theirs ran into.
        self.receiving: dict[str, ReceivingFile] = {}

    def receiving_file(self, **options: Any) -> ReceivingFile:
        """A file in the store for a data set as it arrives (:class:`ReceivingFile`)."""
        return ReceivingFile(self, **options)

    def finish_receiving(self, path: Path) -> str:
        """The data set received into ``path`` (:class:`ReceivingFile`) made durable; its
        SHA-256. Raises OSError for what writing it ran into (a full disk, the reserve)."""
        receiving = self.receiving.get(str(path))
        if receiving is None:
            raise FileNotFoundError(errno.ENOENT, "not a data set being received", str(path))
        return receiving.finish()

    def writing_dir(self) -> Path:
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

    def path_for(self, area: str, sop_instance_uid: str, suffix: str = ".dcm") -> Path:
        uid = validate_uid(sop_instance_uid)
        shard = hashlib.sha1(uid.encode()).hexdigest()[:2]
        return self.root / area / shard / f"{uid}{suffix}"

    def open_tmp(self, suffix: str) -> tuple[int, str]:
        """A new file in :meth:`writing_dir`, opened for ``O_DIRECT`` writes where the file
        system allows it (some network and FUSE file systems, tmpfs, refuse: their files are
        written through the page cache from then on)."""
        fd, name = tempfile.mkstemp(dir=self.writing_dir(), suffix=suffix)
        if self.direct_io:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    os.close(fd)
                    raise
                self.refused_direct(e)
        return fd, name

    def refused_direct(self, error: OSError) -> None:
        log.warning("%s refuses O_DIRECT writes (%s): writing through the page cache",
                    self.root, error)  # fmt: skip
        self.direct_io = False

    def _write_tmp(self, parts: Sequence[Buffer]) -> tuple[Path, str]:
        """Write ``parts`` one after the other (no joined copy of a large image in memory) and
        fsync; returns the file and its SHA-256, hashed on another thread while the write waits
        for the disk (hashlib and the writes both release the GIL)."""
        fd, name = self.open_tmp(".part")
        hashing = self._hashing.submit(_sha256, parts)
        try:
            writer = _AlignedWriter(fd, self._staging.buffer, self.refused_direct)
            for part in parts:
                writer.write(part)
            writer.finish()
            os.fsync(fd)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return Path(name), hashing.result()

    def free_bytes(self) -> int:
        """Free space where received files go, less the reserve (negative: below it)."""
        return shutil.disk_usage(self.root).free - self.min_free_bytes

    def check_room(self, size: int) -> None:
        """StoreFull unless ``size`` more bytes leave the reserve free."""
        above = self.free_bytes()
        if above - size < 0:
            raise StoreFull(
                errno.ENOSPC,
                f"{(above + self.min_free_bytes) >> 20} MB free, "
                f"{self.min_free_bytes >> 20} MB kept in reserve",
                str(self.root),
            )

    def store_received_file(
        self, sop_instance_uid: str, path: Path, digest: str
    ) -> tuple[Path, str, bool]:
        """Store a data set received into ``path`` (made durable by :meth:`finish_receiving`,
        which gave ``digest``) unchanged under its final name; returns (path, sha256,
        already_present). The file at ``path`` is left for its writer to remove.

        Never overwrites: ``os.link`` fails if the final name exists, which makes two
        associations racing with the same UID safe. Same bytes again is a harmless duplicate;
        different bytes raise :class:`ConflictingContent` and leave the stored file untouched.
        """
        final = self.path_for("incoming", sop_instance_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        return self._link(sop_instance_uid, path, final, digest)

    def _link(self, uid: str, tmp: Path, final: Path, digest: str) -> tuple[Path, str, bool]:
        try:
            os.link(tmp, final)
        except FileExistsError:
            if sha256_of(final) != digest:
                raise ConflictingContent(uid) from None
            return final, digest, True
        _fsync_dir(final.parent)
        return final, digest, False

    def store_report(self, sop_instance_uid: str, data: bytes, suffix: str = ".dcm") -> Path:
        """Store an object the node made (a DICOM file, or a FHIR ``.json`` or HL7 ``.hl7``
        message); its UID is deterministic, so a rewrite replaces."""
        final = self.path_for("reports", sop_instance_uid, suffix)
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
