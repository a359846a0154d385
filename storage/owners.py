"""Who holds a claimed row: ``host:pid`` of the process that claimed it (jobs, deliveries and
retro-scans), built and read here only.

A process starting on a host takes back at once what dead processes of the same host held;
other hosts' claims come back when their leases expire.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """The owner a column holds; None for a value that is not ``host:pid``."""
        host, _, pid = text.rpartition(":")
        return cls(host, int(pid)) if host and pid.isdigit() else None


def this_process(pid: int | None = None) -> Owner:
    """This process (or the child ``pid`` of it) as an owner."""
    return Owner(socket.gethostname(), os.getpid() if pid is None else pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid != os.getpid()  # our own PID before we claimed anything: a previous life's


def dead_here(
    owners: Iterable[str | None], host: str, alive: Callable[[int], bool] = pid_alive
) -> set[str]:
    """The owners among ``owners`` that are dead processes of ``host``."""
    found = set()
    for text in owners:
        owner = Owner.parse(text) if text else None
        if owner is not None and owner.host == host and not alive(owner.pid):
            found.add(text)
    return found  # type: ignore[return-value]
