"""The engine's processes keep the memory they free (ai.processes.keep_freed_memory): an
image's tensors come from memory already touched, not from fresh pages each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
