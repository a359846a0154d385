"""From an age to the report objects: the SR (TID 1500) and, when configured, the Secondary
Capture summary, encoded as DICOM Part 10 files; for destinations that take them, the FHIR
Observation (JSON) and the HL7 ORU^R01 (ER7) of the same result. Pure: nothing is stored or
recorded here (storing is the file store's, recording storage/results.py's)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from io import BytesIO

import pydicom
from hl7apy.exceptions import HL7apyException
from pydicom.dataset import Dataset

from node.config import ReportSection
from node.report.fhir import build_observation, encode_observation
from node.report.findings import Findings
from node.report.hl7 import build_oru, encode_oru
from node.report.sc import build_sc
from node.report.sr import build_sr
from node.report.uids import ReportUIDs
from storage import InvalidUID, validate_uid
from storage.tables import DeliveryKind

# How each kind is stored in the file store.
SUFFIXES = {
    DeliveryKind.SR: ".dcm",
    DeliveryKind.SC: ".dcm",
    DeliveryKind.OBSERVATION: ".json",
    DeliveryKind.ORU: ".hl7",
}


@dataclass(frozen=True)
class ReportObject:
    """One encoded report object, of the kind a destination may take; ``sop_instance_uid`` is
    its key (for the Observation and the ORU, a UID derived like the SR's: they are no DICOM
    objects, and each carries the SR's identity in its own way)."""

    kind: DeliveryKind
    sop_instance_uid: str
    data: bytes

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.kind]


@dataclass(frozen=True)
class Reports:
    """What was built, and each EHR form that could not be, with why: an Observation or ORU
    that cannot be made (no Patient ID) costs its own destinations, not the SR."""

    objects: list[ReportObject]
    unbuilt: dict[DeliveryKind, str]


def build_reports(
    header: Dataset,
    findings: Findings,
    cfg: ReportSection,
    ae_title: str,
    ehr: frozenset[DeliveryKind] = frozenset(),
) -> Reports:
    """The reports of ``findings`` on the image ``header`` describes: the SR, the SC when
    configured, and the EHR forms in ``ehr``; ``ae_title`` names the device observer.
    ValueError (highdicom's validation) when the header cannot make a valid SR or SC: the
    reason names what was wrong."""
    _check_uids(header)
    uids = ReportUIDs(header.SOPInstanceUID, findings.card.sha256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom on odd source names
        sr = build_sr(header, findings, uids, ae_title, cfg.sr_series_number, cfg.institution_name)
        made = [ReportObject(DeliveryKind.SR, uids.sr_instance, _encode(sr))]
        if cfg.secondary_capture:
            sc = build_sc(header, findings, uids, cfg.sc_series_number)
            made.append(ReportObject(DeliveryKind.SC, uids.sc_instance, _encode(sc)))
    unbuilt: dict[DeliveryKind, str] = {}
    if DeliveryKind.OBSERVATION in ehr:
        try:
            observation = build_observation(
                header, findings, uids.sr_instance, cfg.patient_identifier_system
            )
            made.append(
                ReportObject(
                    DeliveryKind.OBSERVATION, uids.observation, encode_observation(observation)
                )
            )
        except ValueError as e:
            unbuilt[DeliveryKind.OBSERVATION] = str(e)
    if DeliveryKind.ORU in ehr:
        try:
            oru = build_oru(header, findings, uids.oru, ae_title, cfg.institution_name)
            made.append(ReportObject(DeliveryKind.ORU, uids.oru, encode_oru(oru)))
        except (ValueError, HL7apyException) as e:
            unbuilt[DeliveryKind.ORU] = f"HL7 ORU: {e}"
    return Reports(made, unbuilt)


# The source UIDs a report copies or references (study, series in the evidence, frame of
# reference, the image itself): a report must never go into a "study" that is not one.
COPIED_UIDS = (
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID",
    "SOPClassUID",
)  # fmt: skip


def _check_uids(header: Dataset) -> None:
    for keyword in COPIED_UIDS:
        value = header.get(keyword)
        if value is None and keyword == "FrameOfReferenceUID":
            continue  # Type 3 in CR; the others are required
        try:
            validate_uid(str(value or ""))
        except InvalidUID:
            raise ValueError(f"source {keyword} {str(value)[:64]!r} is not a valid UID") from None


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
