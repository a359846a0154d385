"""The engine's processes keep the memory they free (ai.processes.keep_freed_memory): an
image's tensors come from memory already touched, not from fresh pages each time. And they end
with the process that started them (ai.processes.fork_server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.servers import running, wait_until

PROBE = """
import sys
import numpy as np
from ai.processes import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = resident_mb()
block = np.ones(64 * 2**20, dtype=np.uint8)  # touched, as a tensor's pages are
del block
print(resident_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_image_sized_blocks_stay_with_the_process() -> None:
    def kept_mb(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert kept_mb("plain") < 8  # glibc gives a 64 MB block back to the kernel at once
    assert kept_mb("keep") > 56  # kept, to be reused by the next image without page faults


FORK_SERVER = """
import os, sys, time
from ai.processes import fork_server
fork_server()
child = os.fork()
if child == 0:  # a decoding process still starting: no initializer of the pool has run yet
    grandchild = os.fork()  # a fork of a decoding process is not bound to the fork server
    if grandchild == 0:
        time.sleep(60)
        os._exit(0)
    print(grandchild, flush=True)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_process_forked_by_the_fork_server_dies_with_it_from_the_fork_on() -> None:
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdout=subprocess.PIPE)
    assert server.stdout is not None
    forked, grandchild = (int(server.stdout.readline()) for _ in range(2))
    try:
        server.kill()
        server.wait()
        wait_until(lambda: not running(forked), 10, "the forked process to die")
        assert running(grandchild)  # its own children are its affair, not the fork server's
    finally:
        server.kill()
        for pid in (forked, grandchild):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
