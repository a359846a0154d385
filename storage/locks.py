"""Single writer where it must be single: one ``serve`` per SQLite data folder (an exclusive
``flock`` on ``serve.lock`` in it, released by the kernel when the process dies, however it
dies), one scheduler per PostgreSQL database (a session-level advisory lock).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, text

from xrayage.errors import UserError

# pg_advisory_lock's key for the scheduler: any constant, the same in every process.
SCHEDULER_LOCK_KEY = 0x78726179  # "xray"


class FolderInUse(UserError, RuntimeError):
    """Another process holds the data folder."""


def lock_folder(folder: Path) -> IO[str]:
    """Hold ``folder`` for this process until the returned file is closed (or the process
    ends); :class:`FolderInUse`, naming the folder and the holder's PID, if another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / "serve.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderInUse(
            f"data folder {folder} is in use by another xrayage serve (PID {holder}); "
            "stop it first, or give this one its own [storage] path"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def try_scheduler_lock(conn: Connection) -> bool:
    """Take the scheduler's advisory lock on ``conn`` (held while it stays open) if free."""
    return bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": SCHEDULER_LOCK_KEY}))


def wait_scheduler_lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEDULER_LOCK_KEY})


def release_scheduler_lock(conn: Connection) -> None:
    """Unlock and close: a pooled connection would otherwise keep the lock while it idles."""
    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEDULER_LOCK_KEY})
    conn.close()


def cancel_wait(conn: Connection) -> None:
    """Cancel a :func:`wait_scheduler_lock` running on ``conn`` in another thread (psycopg's
    ``cancel()`` is safe to call from any thread)."""
    conn.connection.driver_connection.cancel()  # type: ignore[union-attr]
