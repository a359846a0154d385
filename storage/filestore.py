"""DICOM files on local disk, written so that a Success response never outruns the disk.

Each write goes to a temporary file in the same file system, is fsynced, then moved to its final
name and the directory fsynced. Paths are built only from validated UIDs, so a dataset cannot
steer a write outside the store (pydicom's FileSet and pynetdicom's qrscp have had such bugs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

Buffer = bytes | memoryview  # collections.abc.Buffer arrives with Python 3.12

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


class FileStore:
    """``incoming/`` holds received instances, ``reports/`` the SR and SC objects the node made."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.tmp = root / "tmp"
        for sub in (self.tmp, root / "incoming", root / "reports"):
            sub.mkdir(parents=True, exist_ok=True)

    def path_for(self, area: str, sop_instance_uid: str) -> Path:
        uid = validate_uid(sop_instance_uid)
        shard = hashlib.sha1(uid.encode()).hexdigest()[:2]
        return self.root / area / shard / f"{uid}.dcm"

    def _write_tmp(self, parts: Sequence[Buffer]) -> tuple[Path, str]:
        """Write ``parts`` one after the other, hashing as they go (no joined copy of a large
        image in memory), and fsync."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                    digest.update(part)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name), digest.hexdigest()

    def store_received(self, sop_instance_uid: str, *parts: Buffer) -> tuple[Path, str, bool]:
        """Store received bytes unchanged, the file being ``parts`` concatenated. Returns
        (path, sha256, already_present).

        Refuses with :class:`StoreFull` when the write would eat into the reserve. Never
        overwrites: ``os.link`` fails if the final name exists, which makes two
        associations racing with the same UID safe. Same bytes again is a harmless duplicate;
        different bytes raise :class:`ConflictingContent` and leave the stored file untouched.
        """
        final = self.path_for("incoming", sop_instance_uid)
        free = shutil.disk_usage(self.root).free
        if free - sum(len(memoryview(p)) for p in parts) < self.min_free_bytes:
            raise StoreFull(
                errno.ENOSPC,
                f"{free >> 20} MB free, {self.min_free_bytes >> 20} MB kept in reserve",
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

    def clean_tmp(self, idle_seconds: float = 3600) -> int:
        """Remove partial writes left by a crash; none of them was ever acknowledged. Only those
        untouched for ``idle_seconds``: other processes sharing the store (receivers and
        workers on one volume) may be writing theirs right now."""
        removed = 0
        before = time.time() - idle_seconds
        for p in self.tmp.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):  # its writer finished meanwhile
                if p.stat().st_mtime < before:
                    p.unlink()
                    removed += 1
        return removed
