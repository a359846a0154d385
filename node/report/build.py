"""From an age to the report objects: the SR (TID 1500) and, when configured, the Secondary
Capture summary, encoded as DICOM Part 10 files. Pure: nothing is stored or recorded here
(storing is the file store's, recording storage/results.py's)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from node.config import ReportSection
from node.report.findings import Findings
from node.report.sc import build_sc
from node.report.sr import build_sr
from node.report.uids import ReportUIDs
from storage import InvalidUID, validate_uid
from storage.tables import DeliveryKind


@dataclass(frozen=True)
class ReportObject:
    """One encoded report object, of the kind a destination may take."""

    kind: DeliveryKind
    sop_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class Reports:
    sr: ReportObject
    sc: ReportObject | None

    @property
    def objects(self) -> list[ReportObject]:
        return [self.sr] if self.sc is None else [self.sr, self.sc]


def build_reports(
    header: Dataset, findings: Findings, cfg: ReportSection, ae_title: str
) -> Reports:
    """The reports of ``findings`` on the image ``header`` describes; ``ae_title`` names the
    device observer. ValueError (highdicom's validation) when the header cannot make a valid
    report: the reason names what was wrong."""
    _check_uids(header)
    uids = ReportUIDs(header.SOPInstanceUID, findings.card.sha256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom on odd source names
        sr = build_sr(header, findings, uids, ae_title, cfg.sr_series_number, cfg.institution_name)
        sc = None
        if cfg.secondary_capture:
            made = build_sc(header, findings, uids, cfg.sc_series_number)
            sc = ReportObject(DeliveryKind.SC, uids.sc_instance, _encode(made))
    return Reports(ReportObject(DeliveryKind.SR, uids.sr_instance, _encode(sr)), sc)


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
