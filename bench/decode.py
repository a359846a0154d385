"""Decoding cost per transfer syntax and decoder, printed as JSON.

Encodes the pydicom-data chest CR (1955 x 1841, 15-bit, 7 MB) with DCMTK into each common
transfer syntax (JPEG 2000 comes from pydicom-data), then times, per file and per decoder plugin
that pydicom has installed (pylibjpeg, pyjpegls, gdcm, pydicom's own), the pixel decode. The
median of ``--iters`` runs, one CPU thread of work each. The rest of preprocessing is measured
by bench/preprocess.py, on the same files.

    python bench/decode.py --iters 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

ENCODINGS = {  # name: DCMTK command (source and target appended)
    "explicit-le": None,
    "explicit-be": ["dcmconv", "+tb"],
    "deflated": ["dcmconv", "+td"],
    "rle": ["dcmcrle"],
    "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
    "jpeg-ls-lossless": ["dcmcjpls", "+el"],
}
PLUGINS = ("pylibjpeg", "pyjpegls", "gdcm", "pydicom")


def _median_ms(fn: Callable[[], object], iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def encoded_files(folder: Path) -> dict[str, Path]:
    """The chest CR in each encoding, encoded into ``folder`` (JPEG 2000: pydicom-data's)."""
    source = Path(get_testdata_file("RG1_UNCR.dcm"))  # type: ignore[arg-type]
    files = {}
    for name, command in ENCODINGS.items():
        target = folder / f"{name}.dcm"
        if command is None:
            target = source
        else:
            subprocess.run([f"/usr/bin/{command[0]}", *command[1:], str(source), str(target)],
                           check=True)  # fmt: skip
        files[name] = target
    files["jpeg2000-lossless"] = Path(get_testdata_file("RG1_J2KR.dcm"))  # type: ignore[arg-type]
    files["jpeg2000-lossy"] = Path(get_testdata_file("RG1_J2KI.dcm"))  # type: ignore[arg-type]
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = encoded_files(Path(tmp))
        for name, path in files.items():
            ds = pydicom.dcmread(path)
            row: dict[str, object] = {
                "encoding": name,
                "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                "bytes": path.stat().st_size,
            }
            for plugin in PLUGINS:
                try:
                    pixel_array(ds, decoding_plugin=plugin)
                except Exception:  # plugin not installed or not for this syntax
                    continue
                row[f"decode_ms_{plugin}"] = _median_ms(
                    lambda ds=ds, plugin=plugin: pixel_array(ds, decoding_plugin=plugin),
                    args.iters,
                )
            row["default_decode_ms"] = _median_ms(lambda ds=ds: pixel_array(ds), args.iters)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "decode", "pydicom": pydicom.__version__, "results": rows},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
