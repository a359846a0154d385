"""Retro-scan throughput: ``--images`` instances in Orthanc to SRs delivered back to it, as JSON.

Orthanc holds ``--images`` copies of the 7 MB chest CR ``RG1_UNCR.dcm``, each its own study
(fresh UIDs, one study date), stored there with DCMTK storescu. The node (``xrayage serve``, every
role in one process, SQLite, local storage, the model on the CPU) has Orthanc as its retro-scan
peer and its delivery destination. ``xrayage rescan --from D --to D`` finds the studies with
C-FIND and fetches them with C-MOVE (``[retro] max_concurrent_moves``: ``--moves``, default 2,
the node's default); each image
then takes the routed path: durable receive, gate, queue, model, SR, C-STORE to Orthanc.

Measured from the rescan's start: ``fetched_s`` when the rescan command returns (every C-MOVE
complete, every instance stored and queued) and ``delivered_s`` when the node's
``xrayage_instances{state="delivered"}`` reaches the count fetched, polled every 0.5 s.
``missed`` counts the instances in Orthanc that the scan did not fetch (it should be 0).

The peer in the same run is DCMTK ``movescu +B`` retrieving the same instances from the same
Orthanc into a folder with one patient-level C-MOVE: the bare cost of the retrieval. It runs
twice, after the upload's writes are flushed and before the node starts; the faster run is the
peer (``runs_s`` has both).
DCMTK (storescu, movescu, and inside Orthanc) runs with ``TCP_NODELAY=1``.

``--arch`` picks an untrained timm network of the node's architectures (default seresnet18, so
that the retrieval and the data path, not a CPU running SENet-154, set the pace; senet154 gives
the published model's cost).

    python bench/retro.py --images 500
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from ai.untrained import build_untrained_timm  # noqa: E402
from bench.ingest import CALLING, make_copies, send  # noqa: E402
from tests.conftest import node_config  # noqa: E402
from tests.servers import XRAYAGE, NodeProcess, Orthanc, free_port, wait_until  # noqa: E402

MOVESCU = "/usr/bin/movescu"


def movescu(pacs: Orthanc, port: int, patient_id: str, folder: Path, count: int) -> float:
    """Seconds for DCMTK movescu to fetch every instance of ``patient_id`` into ``folder``."""
    folder.mkdir()
    start = time.perf_counter()
    subprocess.run(
        [MOVESCU, "-P", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", pacs.aet, "+P", str(port),
         "+B", "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={patient_id}", "127.0.0.1",
         str(pacs.dicom_port)],
        check=True, capture_output=True, cwd=folder,  # this movescu ignores -od
    )  # fmt: skip
    stored = len(list(folder.iterdir()))
    if stored != count:
        raise SystemExit(f"movescu stored {stored} of {count} instances")
    return time.perf_counter() - start


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    weights = work / f"{args.arch}.safetensors"
    build_untrained_timm(weights, args.arch, args.input_size)
    (work / "in").mkdir()
    date = dt.date.today().strftime("%Y%m%d")
    patient = "RETRO-BENCH"
    files = make_copies(work / "in", args.images, StudyDate=date, PatientID=patient)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    pacs = Orthanc(work / "orthanc", free_port(), free_port())
    (work / "orthanc").mkdir()
    node_port, move_port, http = free_port(), free_port(), free_port()
    pacs.start(
        {CALLING: "bench", "XRAYAGE": "xrayage", "MOVESCU": "movescu"},
        ports={"XRAYAGE": node_port, "MOVESCU": move_port},
    )
    peer = f'{{ ae_title = "{pacs.aet}", host = "127.0.0.1", port = {pacs.dicom_port} }}'
    config = node_config(
        work, node_port, weights, pacs, retro=f"peer = {peer}\nmax_concurrent_moves = {args.moves}",
        report="secondary_capture = false",
    )
    node = NodeProcess(config, node_port, work / "node.log", http_port=http)
    rows: dict[str, dict[str, float]] = {}
    try:
        send(pacs.dicom_port, pacs.aet, files, 4)
        for f in files:  # Orthanc has the images; ours need not stay on disk
            f.unlink()
        os.sync()  # the upload's writes are flushed before anyone fetches
        # Twice, the faster run being the peer: its time varies run to run on a shared disk.
        runs = []
        for _ in range(2):
            runs.append(movescu(pacs, move_port, patient, work / "movescu", args.images))
            shutil.rmtree(work / "movescu")
            os.sync()  # nor do its writes slow the next run
        rows["movescu"] = {
            "fetched_s": round(min(runs), 2),
            "images_per_s": args.images / min(runs),
            "runs_s": [round(r, 2) for r in runs],
        }
        node.start()
        iso = dt.date.today().isoformat()
        start = time.perf_counter()
        rescan = subprocess.run(
            [str(XRAYAGE), "rescan", "--from", iso, "--to", iso, "--config", str(config)],
            capture_output=True, text=True,
        )  # fmt: skip
        fetched = time.perf_counter() - start
        said = (rescan.stdout + rescan.stderr).strip().splitlines() or ["(nothing)"]
        got = re.search(r"finished \(done\): fetched (\d+),", said[-1])
        if rescan.returncode != 0 or got is None:
            raise SystemExit(f"xrayage rescan (exit {rescan.returncode}): {said[-1]}")
        count = int(got[1])  # fewer than --images is a finding: reported as "missed"

        def delivered() -> bool:
            return node.metrics().get('xrayage_instances{state="delivered"}', 0) >= count

        wait_until(delivered, 3600, "every SR delivered", interval=0.5)
        done = time.perf_counter() - start
        rows["node"] = {
            "fetched_s": round(fetched, 2),
            "delivered_s": round(done, 2),
            "fetched": count,
            "missed": args.images - count,
            "fetch_images_per_s": count / fetched,
            "images_per_s": count / done,
        }
    finally:
        node.stop()
        pacs.stop()
    for row in rows.values():
        for key in [k for k in row if k.endswith("per_s")]:
            row[key] = round(row[key], 1)
    return {
        "file": "RG1_UNCR.dcm",
        "images": args.images,
        "megabytes": round(megabytes),
        "cpus": os.cpu_count(),
        "model": {"architecture": args.arch, "input_size": args.input_size, "device": "cpu"},
        "max_concurrent_moves": args.moves,
        "runs": rows,
        "ratio_node_fetch_to_movescu": round(
            rows["node"]["fetch_images_per_s"] / rows["movescu"]["images_per_s"], 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--arch", default="seresnet18")
    parser.add_argument("--moves", type=int, default=2, help="[retro] max_concurrent_moves")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: /tmp)")
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"  # for the DCMTK inside storescu, movescu and Orthanc
    with tempfile.TemporaryDirectory(dir=args.work, prefix="xrayage-retro-") as tmp:
        print(json.dumps(run(args, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
