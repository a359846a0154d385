"""How the library's helper processes end, and how their end is told: no torch imported here,
so that the node's receiving process and the decoding processes stay small."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def die_with_parent(parent: int | None) -> None:
    """Be killed with the process that started this one (Linux ``PR_SET_PDEATHSIG``): a child
    must not outlive a ``kill -9`` of its parent, holding work (the node's inference process
    holds jobs) or memory (a decoding process). Elsewhere, a child notices through its pipes.
    ``parent``: the pid this process was started by, when known; if it is not the parent any
    more, it died before the call (too early for the signal), and this process exits now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def spawned_child() -> None:
    """The start of a child that multiprocessing spawned: it dies with its parent."""
    parent = multiprocessing.parent_process()
    die_with_parent(parent.pid if parent is not None else None)


def fork_server() -> None:
    """The start of the engine's fork server (:mod:`ai.decoding_server`). It dies with the
    engine's process (whose pid it is not told: had that one died already, the fork server's
    alive pipe would be closed, and it would exit on reading it). Each process forked from it
    dies with it from the fork on: were that left to the pool's initializer, a fork server
    killed while a new decoding process is still starting would leave that process waiting
    forever on its queue (a CI run caught one)."""
    die_with_parent(None)
    server = os.getpid()
    forked_here = True  # a child's copy is set False, so that its own forks are left alone

    def forked() -> None:
        nonlocal forked_here
        if forked_here:
            forked_here = False
            die_with_parent(server)

    os.register_at_fork(after_in_child=forked)


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


def limit_memory(budget_mb: int | None) -> None:
    """Let this process map at most ``budget_mb`` more than it has mapped now (``RLIMIT_AS``):
    an allocation past it fails in this process (``MemoryError``, a decoder's failed
    ``malloc``), which is the image's error, instead of the kernel's OOM killer choosing a
    victim on the host (the database, on a shared one). None: no limit."""
    if budget_mb is None or not sys.platform.startswith("linux"):
        return
    with open("/proc/self/status") as status:
        mapped_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = (mapped_kb << 10) + (budget_mb << 20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def decoding_process(memory_mb: int | None = None) -> None:
    """The start of each of the engine's decoding processes (they die with the fork server
    from the fork on: :func:`fork_server`), each allowed ``memory_mb`` (:func:`limit_memory`)."""
    keep_freed_memory()
    limit_memory(memory_mb)


def cause_of(exitcode: int | None) -> str:
    """``killed by SIGABRT`` or ``exited with status 1``, from ``Process.exitcode``."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
