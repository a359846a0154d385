"""A chest radiograph goes in with DCMTK storescu; an SR (and SC) comes out in a real Orthanc."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from storage import Database, Instance, InstanceState
from tests.conftest import dciodvfy_errors, storescu
from tests.servers import XRAYAGE, NodeProcess, Orthanc, wait_until


def _nums(sr: pydicom.Dataset) -> dict[str, tuple[float, str, str]]:
    """Concept meaning -> (value, unit code, scheme designator) for every NUM item."""
    found: dict[str, tuple[float, str, str]] = {}

    def walk(items):  # type: ignore[no-untyped-def]
        for item in items:
            if item.ValueType == "NUM":
                name = item.ConceptNameCodeSequence[0]
                mv = item.MeasuredValueSequence[0]
                found[name.CodeMeaning] = (
                    float(mv.NumericValue),
                    mv.MeasurementUnitsCodeSequence[0].CodeValue,
                    name.CodingSchemeDesignator,
                )
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def _texts(sr: pydicom.Dataset) -> list[str]:
    out: list[str] = []

    def walk(items):  # type: ignore[no-untyped-def]
        for item in items:
            if item.ValueType == "TEXT":
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def _state(node: NodeProcess, sop_uid: str) -> Instance | None:
    db = Database(f"sqlite:///{node.config.parent / 'data' / 'xrayage.db'}")
    try:
        with db.session() as s:
            return s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
    finally:
        db.dispose()


def test_chest_pa_gets_exactly_one_valid_sr_with_the_models_age(
    node: NodeProcess, orthanc: Orthanc, chest_pa: Path, weights: Path, tmp_path: Path
) -> None:
    src = pydicom.dcmread(chest_pa, stop_before_pixels=True)
    sent = storescu(node.port, chest_pa)
    assert sent.returncode == 0, sent.stderr

    study = {"StudyInstanceUID": src.StudyInstanceUID}
    srs = wait_until(lambda: orthanc.find({**study, "Modality": "SR"}), 180, "the SR in Orthanc")
    scs = wait_until(lambda: orthanc.find({**study, "Modality": "OT"}), 60, "the SC in Orthanc")
    time.sleep(2)  # nothing more may follow
    srs = orthanc.find({**study, "Modality": "SR"})
    assert len(srs) == 1 and len(scs) == 1

    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.file(srs[0]["ID"]))
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)

    infer = subprocess.run(
        [
            str(XRAYAGE),
            "infer",
            str(chest_pa),
            "--weights",
            str(weights),
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = json.loads(infer.stdout)[0]
    nums = _nums(sr)
    age, unit, scheme = nums["X-ray age"]
    assert age == expected["xray_age"]
    assert unit == "a" and scheme.startswith("99")
    assert nums["Age"][0] == expected["chronological_age"] == 64.48  # 1940-03-05 to 2004-08-26
    assert nums["X-ray age minus chronological age"][0] == round(age - 64.48, 2)
    assert f"weights-sha256={expected['model_sha256']}" in _texts(sr)
    assert any("UNTRAINED" in t for t in _texts(sr))  # the stand-in says what it is

    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (
        src.PatientID,
        src.PatientName,
        src.StudyInstanceUID,
    )
    assert sr.SpecificCharacterSet == src.SpecificCharacterSet
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED"
    assert "AI" in sr.SeriesDescription
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    sc_path = tmp_path / "sc.dcm"
    sc_path.write_bytes(orthanc.file(scs[0]["ID"]))
    assert dciodvfy_errors(sc_path) == []
    sc = pydicom.dcmread(sc_path)
    assert sc.SeriesInstanceUID not in (sr.SeriesInstanceUID, src.SeriesInstanceUID)
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.pixel_array.max() == 255

    inst = wait_until(
        lambda: (
            (i := _state(node, src.SOPInstanceUID)) and i.state == InstanceState.DELIVERED and i
        ),
        30,
        "state delivered",
    )
    assert inst.reason is None


def test_extremity_is_skipped_with_its_reason_and_gets_no_sr(
    node: NodeProcess, orthanc: Orthanc, extremity: Path
) -> None:
    src = pydicom.dcmread(extremity, stop_before_pixels=True)
    sent = storescu(node.port, extremity)
    assert sent.returncode == 0, sent.stderr  # accepted, so the PACS does not retry
    inst = _state(node, src.SOPInstanceUID)  # the gate decides before Success goes back
    assert inst is not None and inst.state == InstanceState.SKIPPED
    assert inst.reason == "body part EXTREMITY is not CHEST"
    time.sleep(3)
    assert orthanc.find({"StudyInstanceUID": src.StudyInstanceUID, "Modality": "SR"}) == []
