"""The node's peak memory for the worst input it accepts, with the default limits, as JSON.

``xrayage serve`` (every role in one process, SQLite, local storage, an untrained SENet-154 at
320 px on the CPU, as the published model) receives, over ``node.max_associations`` (10)
associations at once, the largest data sets it takes: ``--images`` of 8000 x 8000 pixels of
2 bytes (122 MiB, within ``max_dataset_bytes`` = 128 MiB and the pixel budget of 64 Mi
samples), sent with DCMTK ``storescu``, and ``--bombs`` deflated data sets that inflate to
1 GiB (refused at receipt); then it decodes, analyses and reports the images.

The proportional resident memory (PSS: shared pages counted a share each) of every process of
the node (``serve``, its inference process, its fork server and decoding processes) is sampled
every 20 ms from ``/proc``; the peak of their sum, and of each kind, are printed. The peer in
the same run is the node idle after start.

    python bench/memory.py --images 6 --bombs 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

sys.path[0] = str(Path(__file__).resolve().parents[1])

from ai.untrained import build_untrained_timm  # noqa: E402
from bench.ingest import CALLING, STORESCU  # noqa: E402
from tests.conftest import node_config  # noqa: E402
from tests.servers import NodeProcess, free_port  # noqa: E402

CHEST = Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm") or "")  # type: ignore[attr-defined]


# The node's processes by their depth below ``serve``.
KINDS = ("serve (receive, deliver, HTTP)", "inference process", "fork server",
         "decoding processes")  # fmt: skip


def tree(pid: int) -> list[tuple[int, str]]:
    """``pid`` and all its descendants, each with its kind."""
    found, todo = [], [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        found.append((p, KINDS[min(depth, len(KINDS) - 1)]))
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [(int(c), depth + 1) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def pss_kb(pid: int) -> int:
    """The process's proportional resident memory (PSS, kB): pages it shares with others
    (torch, loaded once by the fork server) count a share each, so that the sum over processes
    is what the node holds."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.peak, self.by_kind = pid, threading.Event(), 0, {}

    def run(self) -> None:
        while not self.stop.is_set():
            now: dict[str, int] = {}
            for p, kind in tree(self.pid):
                now[kind] = now.get(kind, 0) + pss_kb(p)
            self.peak = max(self.peak, sum(now.values()))
            for name, kb in now.items():
                self.by_kind[name] = max(self.by_kind.get(name, 0), kb)
            time.sleep(0.02)


def largest(folder: Path, n: int) -> list[Path]:
    ds = pydicom.dcmread(CHEST)
    pixels = np.random.default_rng(1).integers(0, 4096, (8000, 8000), dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"large{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def bomb(folder: Path) -> Path:
    ds = pydicom.dcmread(CHEST, stop_before_pixels=True)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new(0x00091010, "LO", "BENCH")
    ds.add_new(0x00091011, "OB", bytes(1 << 30))
    path = folder / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def send(port: int, path: Path, *options: str) -> int:
    return subprocess.run(
        [STORESCU, *options, "-aet", CALLING, "-aec", "XRAYAGE", "127.0.0.1", str(port),
         str(path)],
        capture_output=True, env=os.environ | {"TCP_NODELAY": "1"}, timeout=600,
    ).returncode  # fmt: skip


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    weights = work / "senet154.safetensors"
    build_untrained_timm(weights, "senet154", 320)
    (work / "in").mkdir()
    files, deflated = largest(work / "in", args.images), bomb(work / "in")
    port, http = free_port(), free_port()
    node = NodeProcess(node_config(work, port, weights, None), port, work / "node.log",
                       http_port=http)  # fmt: skip
    node.start()
    try:
        assert node.proc is not None
        time.sleep(5)  # the inference process and its decoding processes up
        idle = sum(pss_kb(p) for p, _ in tree(node.proc.pid))
        sampler = Sampler(node.proc.pid)
        sampler.start()
        with ThreadPoolExecutor(args.images + args.bombs) as pool:
            bombs = [pool.submit(send, port, deflated, "-xd") for _ in range(args.bombs)]
            sent = list(pool.map(lambda f: send(port, f), files))
        started = time.monotonic()
        while time.monotonic() - started < 900:
            metrics = node.metrics()
            done = metrics.get('xrayage_instances_inferred_total{outcome="reported"}', 0.0)
            failed = metrics.get('xrayage_instances_inferred_total{outcome="failed"}', 0.0)
            if done + failed >= sent.count(0):
                break
            print(f"{time.monotonic() - started:.0f} s: {done:.0f} reported, {failed:.0f} failed",
                  file=sys.stderr)  # fmt: skip
            time.sleep(5)
        sampler.stop.set()
        sampler.join()
    finally:
        node.stop()
    return {
        "images": args.images,
        "image_bytes": files[0].stat().st_size,
        "bombs": args.bombs,
        "stored": sent.count(0),
        "bombs_refused": sum(1 for b in bombs if b.result() != 0),
        "reported": done,
        "failed": failed,
        "cpus": os.cpu_count(),
        "idle_pss_mb": round(idle / 1024),
        "peak_pss_mb": round(sampler.peak / 1024),
        "peak_pss_mb_by_process": {k: round(v / 1024) for k, v in sorted(sampler.by_kind.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)  # with the bombs: 10 associations
    parser.add_argument("--bombs", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        print(json.dumps(run(args, Path(folder)), indent=2))


if __name__ == "__main__":
    main()
