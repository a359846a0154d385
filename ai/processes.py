"""How the library's helper processes end, and how their end is told: no torch imported here,
so that the node's receiving process and the decoding processes stay small."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


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


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse rather than hand each large block back to the
    kernel. An image's tensors (tens of MB each) would otherwise come from fresh ``mmap`` pages
    every time, and the first touch of each page faults: on the 2-core development VM a
    decoding process's tensor steps took 24-28 ms an image without this and 12 ms with it, and a
    batch of 8 of the test network 298-327 ms against 234-243 ms (bench/README.md). The reason
    PyTorch's performance tuning guide points CPU inference to jemalloc or TCMalloc; this is the
    same effect with the allocator already there. The process keeps its peak memory."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl has none
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 512 << 20)
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def decoding_process() -> None:
    """The start of each of the engine's decoding processes."""
    die_with_parent(check=False)
    keep_freed_memory()


def cause_of(exitcode: int | None) -> str:
    """``killed by SIGABRT`` or ``exited with status 1``, from ``Process.exitcode``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
