"""What a header may claim before anything is decoded: the pixel budget.

A header is the sender's word; a 7 KB JPEG 2000 whose header and codestream both say 60000 x
60000 would make a decoder allocate 7 GB. The largest chest detectors are about 4300 x 4300
(18.5 megapixels); the budget allows several times that, and nothing that would exhaust a
node's memory. Imports nothing heavy: the receiver checks it at the gate.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

MAX_PIXELS = 64 * 1024 * 1024  # samples over all frames: 8192 x 8192 x 1
# What one decoding process may map beyond what it starts with (ai.processes.limit_memory):
# the largest image max_dataset_bytes and MAX_PIXELS let through (8000 x 8000 pixels of 2
# bytes) was decoded to its tensor within 768 MB more (peak RSS 1.48 GB from 0.75 GB).
DECODE_MEMORY_MB = 2048


def over_budget(ds: Dataset) -> str | None:
    """Why decoding ``ds`` would exceed :data:`MAX_PIXELS`, from its header alone; None if not.
    Values that are not numbers are the caller's to name (the gate's ``Unreadable``)."""
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    total = rows * columns * samples * frames
    if total <= MAX_PIXELS:
        return None
    return (
        f"{rows} x {columns} pixels (x {samples * frames} samples and frames) exceed the "
        f"pixel budget of {MAX_PIXELS:,} before decoding"
    )
