"""What the EHR forms of a result cost: building the reports of one result with the FHIR
Observation and the HL7 ORU^R01 beside the SR and SC (``build_reports`` with both EHR kinds),
against the SR and SC alone (the peer, in the same run), per result; and delivering them to real
receivers on 127.0.0.1 — sekmet-fhir (conditional create) and hl7apy's MLLP listener (one
connection per message, ACK awaited) — against C-STORE of the SR to Orthanc, when the servers
are installed (the test setup). Best of ``--repeats``, printed as JSON.

    python bench/ehr.py --results 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ai.card import ModelCard
from node.config import Destination, ReportSection
from node.delivery.cstore import CStoreSender
from node.delivery.fhir import FhirSender
from node.delivery.mllp import MllpSender
from node.report.build import build_reports
from node.report.findings import Findings
from storage.tables import DeliveryKind
from tests.servers import FhirServer, MllpListener, Orthanc, free_port

EHR = frozenset({DeliveryKind.OBSERVATION, DeliveryKind.ORU})
CARD = ModelCard(name="bench", version="1", sha256="ab" * 32, gap_correction=(0.1, -3.0))


def _headers(n: int) -> list[pydicom.Dataset]:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.PatientAge = "061Y"
    out = []
    for _ in range(n):
        copy = ds.copy()
        copy.SOPInstanceUID = generate_uid()
        out.append(copy)
    return out


def _best(repeats: int, run) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    headers = _headers(args.results)
    section = ReportSection()
    built: dict[str, list] = {}

    def build(kinds: frozenset[DeliveryKind]) -> None:
        built[str(sorted(kinds))] = [
            build_reports(h, Findings(55.3, 61.0, CARD), section, "XRAYAGE", kinds) for h in headers
        ]

    dicom_only = _best(args.repeats, lambda: build(frozenset()))
    with_ehr = _best(args.repeats, lambda: build(EHR))
    out: dict[str, object] = {
        "results": args.results,
        "build_ms_per_result": {
            "sr_sc": round(1000 * dicom_only / args.results, 2),
            "sr_sc_observation_oru": round(1000 * with_ehr / args.results, 2),
            "ratio": round(with_ehr / dicom_only, 3),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files: dict[DeliveryKind, list[Path]] = {k: [] for k in DeliveryKind}
        for i, reports in enumerate(built[str(sorted(EHR))]):
            for obj in reports.objects:
                path = folder / f"{i}-{obj.kind}{obj.suffix}"
                path.write_bytes(obj.data)
                files[obj.kind].append(path)
        fhir = FhirServer(folder / "fhir", free_port())
        listener = MllpListener("AA").start()
        pacs = Orthanc(folder / "pacs", free_port(), free_port())
        fhir.start()
        pacs.start({"XRAYAGE": "node"})
        try:
            token = folder / "token"
            token.write_text(fhir.token)
            senders = {
                "fhir_observation": (
                    FhirSender(Destination(name="f", fhir_url=fhir.url, token_file=token), 30),
                    files[DeliveryKind.OBSERVATION],
                ),
                "hl7_oru": (
                    MllpSender(
                        Destination(name="h", hl7_host="127.0.0.1", hl7_port=listener.port), 30
                    ),
                    files[DeliveryKind.ORU],
                ),
                "cstore_sr": (
                    CStoreSender(
                        Destination(
                            name="p", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port
                        ),
                        "XRAYAGE",
                        30,
                    ),
                    files[DeliveryKind.SR],
                ),
            }
            sent = {}
            for name, (sender, paths) in senders.items():
                # The first round creates; the later ones are resends (found, not created).
                seconds = _best(args.repeats, lambda s=sender, p=paths: s.send(p))
                assert all(e is None for e in sender.send(paths[:1])), name
                sent[name] = round(len(paths) / seconds, 1)
            out["send_per_second"] = sent
        finally:
            fhir.stop()
            listener.stop()
            pacs.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
