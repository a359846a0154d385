"""How the library's helper processes end, and how their end is told: no torch imported here,
so that the node's receiving process and the decoding processes stay small."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(check: bool = True) -> None:
    """Be killed with the process that started this one (Linux ``PR_SET_PDEATHSIG``): a child
    must not outlive a ``kill -9`` of its parent, holding work (the node's inference process
    holds jobs) or memory (a decoding process). Elsewhere, a child notices through its pipes.
    ``check``: exit now if the parent that started this process is gone already (not for a
    forkserver's children, whose parent is the fork server, not the process that asked)."""
    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if check and parent is not None and os.getppid() != parent.pid:  # it died before the call
        os._exit(1)


def cause_of(exitcode: int | None) -> str:
    """``killed by SIGABRT`` or ``exited with status 1``, from ``Process.exitcode``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
