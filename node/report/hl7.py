"""The result as an HL7 v2.5.1 ``ORU^R01`` message, for an EHR's interface engine.

Segments (HL7 v2.5.1 chapter 7, ORU^R01 in original-mode acknowledgement):

- ``MSH``: sending application = the node's AE title, sending facility = ``[report]
  institution_name``; MSH-10, the message control ID, derives from the result (source image and
  model), so a resend of one result carries the same ID and the receiver can recognise it;
- ``PID``: PID-3 the Patient ID (assigning authority from Issuer of Patient ID, type ``MR``),
  PID-5 the name, PID-7 the birth date, PID-8 the sex, from the DICOM header;
- ``OBR``: OBR-3 (filler order number) the Accession Number, OBR-4 the service, OBR-7 the study's
  date and time, OBR-25 result status ``P`` (preliminary: unverified AI);
- ``OBX`` (``NM``, OBX-11 ``P``, units UCUM ``a``): the X-ray age, the chronological age (LOINC
  30525-0) and the age gaps when known; an ``ST`` OBX with the Study Instance UID (DCM 110180);
  OBX-18 names the model; ``NTE`` segments carry the weights' SHA-256 and, for untrained
  weights, the warning.

Built with hl7apy at strict validation; every value from a header is escaped by hl7apy's
datatypes, and control characters are dropped (a CR would end the segment).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Element, Message
from hl7apy.factories import datatype_factory
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from node.dicom.header import parse_da, study_datetime
from node.report.fhir import AGE_GAP, CORRECTED_GAP, UNTRAINED_NOTE, XRAY_AGE
from node.report.findings import Findings
from node.report.sr import SCHEME  # a local coding system (HL7 table 0396's 99zzz)

YEARS = ("a", "year", "UCUM")
CHRONOLOGICAL_AGE = ("30525-0", "Age", "LN")
STUDY_UID = ("110180", "Study Instance UID", "DCM")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def control_id(oru_uid: str) -> str:
    """MSH-10 (ST, at most 20 characters): the same for every send of one result."""
    return hashlib.sha256(oru_uid.encode()).hexdigest()[:20].upper()


def _put(parent: Element, name: str, value: object, max_length: int = 199) -> None:
    """Set ``parent``'s child ``name`` to a value, as its own datatype: no control characters,
    cut to the field's length; hl7apy escapes the delimiters when it encodes. Nothing is set
    for an empty value."""
    text = _CONTROL.sub(" ", str(value or "")).strip()[:max_length]
    if text:
        datatype = getattr(parent, name).datatype
        setattr(parent, name, datatype_factory(datatype, text, version="2.5.1"))


def _dtm(when: dt.date | None) -> str | None:
    """An HL7 DTM: to the second for a date and time, the day for a date."""
    if when is None:
        return None
    return when.strftime("%Y%m%d%H%M%S" if isinstance(when, dt.datetime) else "%Y%m%d")


def _coded(field: Element, concept: tuple[str, str, str]) -> None:
    for name, text in zip(("ce_1", "ce_2", "ce_3"), concept, strict=True):
        _put(field, name, text)


def build_oru(
    header: Dataset,
    findings: Findings,
    oru_uid: str,
    ae_title: str,
    facility: str | None,
    now: dt.datetime | None = None,
) -> Message:
    """The ORU^R01 of ``findings`` on the image ``header`` describes. ValueError without a
    Patient ID: the receiver could not place the result."""
    if not str(header.get("PatientID") or "").strip():
        raise ValueError("no Patient ID, so the EHR cannot place the result")
    card = findings.card
    msg = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    _put(msh.msh_3, "hd_1", ae_title, 20)
    if facility:
        _put(msh.msh_4, "hd_1", facility, 20)
    msh.msh_7 = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S+0000")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(oru_uid)
    msh.msh_11 = "P"
    msh.msh_12 = "2.5.1"
    msh.msh_15 = "AL"  # original mode: the receiver answers every message
    msh.msh_16 = "NE"
    msh.msh_18 = "UNICODE UTF-8"

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    _put(pid.pid_3, "cx_1", header.get("PatientID"), 64)
    issuer = header.get("IssuerOfPatientID")
    if issuer:
        _put(pid.pid_3.cx_4, "hd_1", issuer, 20)
    pid.pid_3.cx_5 = "MR"
    name = header.get("PatientName")
    if name:
        _put(pid.pid_5.xpn_1, "fn_1", name.family_name, 64)
        _put(pid.pid_5, "xpn_2", name.given_name, 64)
        _put(pid.pid_5, "xpn_3", name.middle_name, 64)
    birth = _dtm(parse_da(header.get("PatientBirthDate")))
    if birth:
        pid.pid_7 = birth
    sex = str(header.get("PatientSex", "") or "")
    pid.pid_8 = sex if sex in ("M", "F", "O") else "U"

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.obr
    obr.obr_1 = "1"
    _put(obr.obr_3, "ei_1", header.get("AccessionNumber"), 16)
    _coded(obr.obr_4, (XRAY_AGE[0], XRAY_AGE[1], SCHEME))
    studied = _dtm(study_datetime(header))
    if studied:
        obr.obr_7 = studied
    obr.obr_25 = "P"

    rows: list[tuple[tuple[str, str, str], float | None]] = [
        ((XRAY_AGE[0], XRAY_AGE[1], SCHEME), findings.xray_age),
        (CHRONOLOGICAL_AGE, findings.chronological_age),
        ((AGE_GAP[0], AGE_GAP[1], SCHEME), findings.age_gap),
        ((CORRECTED_GAP[0], CORRECTED_GAP[1], SCHEME), findings.corrected_age_gap),
    ]
    n = 0
    for concept, value in rows:
        if value is None:
            continue
        n += 1
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(n)
        obx.obx_2 = "NM"
        _coded(obx.obx_3, concept)
        obx.obx_5 = f"{value:.2f}"
        _coded(obx.obx_6, YEARS)
        obx.obx_11 = "P"
        if studied:
            obx.obx_14 = studied
        _put(obx.obx_18, "ei_1", f"{card.name} {card.version}", 199)
    uid = order.add_group("ORU_R01_OBSERVATION")
    uid.obx.obx_1 = str(n + 1)
    uid.obx.obx_2 = "ST"
    _coded(uid.obx.obx_3, STUDY_UID)
    uid.obx.obx_5 = str(header.StudyInstanceUID)  # checked as a UID before any report is built
    uid.obx.obx_11 = "P"
    notes = [f"Model {card.name} {card.version}, weights SHA-256 {card.sha256 or 'unknown'}"]
    if card.untrained:
        notes.append(UNTRAINED_NOTE)
    for i, note in enumerate(notes, start=1):
        nte = uid.add_segment("NTE")
        nte.nte_1 = str(i)
        _put(nte, "nte_3", note, 200)
    return msg


def encode_oru(message: Message) -> bytes:
    return message.to_er7().encode()


def parse(data: bytes) -> Message:
    """An HL7 v2 message (an ORU the node stored, or an ACK), parsed by hl7apy."""
    return parse_message(data.decode("utf-8"), find_groups=True)


def read_oru(path: Path) -> Message:
    """The stored ORU, parsed again (a file damaged on disk fails here)."""
    return parse(path.read_bytes())
