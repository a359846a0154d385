"""C-STORE ingest side by side: DCMTK ``storescp +B``, Orthanc and the node, as JSON.

Sends ``--images`` copies of the 7 MB chest CR ``RG1_UNCR.dcm`` (each with fresh UIDs) with DCMTK
``/usr/bin/storescu`` (``TCP_NODELAY=1``, ``-pdu 131072``) over 1 and 4 associations at once
(``--associations``), to each receiver in turn on the same machine in the same run:

- ``storescp``: DCMTK ``storescp +B`` (bit-preserving: the received stream written straight to
  the file, no fsync), with ``--fork`` when more than one association runs at once;
- ``orthanc``: the Debian package's Orthanc, default storage (files and its SQLite index), with
  ``TCP_NODELAY=1`` like every DCMTK-based process here;
- ``pynetdicom``: ``bench/bare_scp.py``, pynetdicom's SCP answering Success at once and storing
  nothing: the ceiling of any receiver built on pynetdicom;
- ``node``: ``xrayage serve --role receive`` with SQLite and local storage, durable: every
  Success follows the file's fsync and the row's commit.

For each receiver and association count: images/s and MB/s from the first storescu start to the
last storescu exit, the peak resident memory of the receiver's process tree (sampled every
10 ms) and the CPU it used per image (user and system, ``/proc/PID/stat``, children it reaped
included). Ratios node/storescp and node/orthanc come last. Afterwards a ``--rss-associations``
run (default 10) of the node alone gives its peak RSS under that many concurrent associations.

    python bench/ingest.py --images 200 --associations 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path[0] = str(Path(__file__).resolve().parents[1])

from tests.conftest import node_config, pydicom_data_file  # noqa: E402
from tests.servers import NodeProcess, Orthanc, echo, free_port, wait_until  # noqa: E402

CALLING = "BENCH"
STORESCU = "/usr/bin/storescu"  # pynetdicom installs its own storescu earlier on PATH
STORESCP = "/usr/bin/storescp"


def make_copies(folder: Path, count: int, **attributes: str) -> list[Path]:
    """``count`` copies of RG1_UNCR, each its own study, series and instance; ``attributes``
    (keyword = value) are set on every copy."""
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    paths = []
    for i in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in kB (0 once gone)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(_rss_kb(int(c)) for c in children)


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, float]]:
    """Samples the tree's RSS while the block runs; ``result["peak_rss_mb"]`` afterwards."""
    result = {"peak_rss_mb": 0.0}
    done = threading.Event()

    def sample() -> None:
        peak = 0
        while not done.wait(0.01):
            peak = max(peak, _rss_kb(pid))
        result["peak_rss_mb"] = round(peak / 1024, 1)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of ``pid`` and the children it has waited for, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def send(port: int, called: str, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send ``files`` between
    them; fails unless every one exits 0."""
    env = os.environ | {"TCP_NODELAY": "1"}
    shares = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    command = [STORESCU, "-aet", CALLING, "-aec", called, "-pdu", "131072", "127.0.0.1", str(port)]
    procs = [
        subprocess.Popen(
            [*command, *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        for share in shares
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    seconds = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"storescu failed ({p.returncode}): {err.strip()[-500:]}")
    return seconds


def measure(
    name: str, start: Callable[[Path], tuple[int, str, Callable[[], None], int]],
    files: list[Path], associations: int, work: Path,
) -> dict[str, float | int | str]:  # fmt: skip
    """Start a fresh receiver in ``work``, send, stop it; one result row."""
    folder = Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))
    pid, called, stop, port = start(folder)
    try:
        cpu = _cpu_seconds(pid)
        with peak_rss(pid) as rss:
            seconds = send(port, called, files, associations)
        cpu = _cpu_seconds(pid) - cpu
    finally:
        stop()
        shutil.rmtree(folder, ignore_errors=True)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    return {
        "receiver": name,
        "associations": associations,
        "images": len(files),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(files) / seconds, 1),
        "mb_per_s": round(megabytes / seconds, 1),
        **rss,
        "cpu_ms_per_image": round(cpu * 1000 / len(files), 1),
    }


def _serving(
    proc: subprocess.Popen[bytes], called: str, port: int
) -> tuple[int, str, Callable[[], None], int]:
    """Wait for a receiver started as ``proc`` to answer C-ECHO; the row ``measure`` needs."""
    wait_until(lambda: echo(port, called), 30, called)

    def stop() -> None:
        proc.terminate()
        proc.wait()

    return proc.pid, called, stop, port


def start_storescp(associations: int) -> Callable[[Path], tuple[int, str, Callable[[], None], int]]:
    def start(folder: Path) -> tuple[int, str, Callable[[], None], int]:
        port = free_port()
        (folder / "out").mkdir()
        fork = ["--fork"] if associations > 1 else []
        proc = subprocess.Popen(
            [STORESCP, "+B", *fork, "-pdu", "131072", "-od", str(folder / "out"), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=os.environ | {"TCP_NODELAY": "1"},
        )  # fmt: skip
        return _serving(proc, "ANY-SCP", port)

    return start


def start_bare_pynetdicom(folder: Path) -> tuple[int, str, Callable[[], None], int]:
    port = free_port()
    script = Path(__file__).with_name("bare_scp.py")
    return _serving(subprocess.Popen([sys.executable, str(script), str(port)]), "BARE", port)


def start_orthanc(folder: Path) -> tuple[int, str, Callable[[], None], int]:
    pacs = Orthanc(folder, free_port(), free_port())
    pacs.start({CALLING: "bench"})
    assert pacs.proc is not None
    return pacs.proc.pid, pacs.aet, pacs.stop, pacs.dicom_port


def start_node(folder: Path) -> tuple[int, str, Callable[[], None], int]:
    port = free_port()
    node = NodeProcess(
        node_config(folder, port, None, None), port, folder / "node.log", role="receive"
    )
    node.start()
    assert node.proc is not None
    return node.proc.pid, "XRAYAGE", node.stop, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--rss-associations", type=int, default=10)
    parser.add_argument("--receivers", default="storescp,orthanc,pynetdicom,node")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"  # the DCMTK inside Orthanc too: no 40 ms Nagle stalls
    with tempfile.TemporaryDirectory(dir=args.work, prefix="xrayage-ingest-") as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        files = make_copies(work / "in", args.images)
        receivers = args.receivers.split(",")
        rows: list[dict[str, float | int | str]] = []
        for n in (int(a) for a in args.associations.split(",")):
            starts = {
                "storescp": start_storescp(n),
                "orthanc": start_orthanc,
                "pynetdicom": start_bare_pynetdicom,
                "node": start_node,
            }
            by_name = {r: measure(r, starts[r], files, n, work) for r in receivers}
            rows.extend(by_name.values())
            node = by_name.get("node")
            for peer in ("storescp", "orthanc", "pynetdicom"):
                if node and peer in by_name:
                    node[f"ratio_to_{peer}"] = round(
                        float(node["images_per_s"]) / float(by_name[peer]["images_per_s"]),
                        2,
                    )
        if "node" in receivers and args.rss_associations:
            rows.append(measure("node", start_node, files, args.rss_associations, work))
    print(json.dumps({"file": "RG1_UNCR.dcm", "cpus": os.cpu_count(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
