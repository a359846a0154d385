"""The result as a FHIR R4 ``Observation``, for the EHR.

Shaped as the HL7 *DICOM SR to FHIR Resource Mapping* implementation guide maps a TID 1500
measurement (its "Imaging Measurement" profile): one Observation per measurement group, with

- ``status`` ``preliminary``: an AI result no person has verified;
- ``category`` ``imaging`` (observation-category);
- ``code``: no standard code exists for an age estimated from an image, so the code comes from
  the node's own code system (:data:`CODE_SYSTEM`, the same concepts as the SR's ``99XRAYAGE``
  scheme) with a display that says what it is;
- ``valueQuantity`` in years (UCUM ``a``), and components for the chronological age (LOINC
  30525-0), the age gap and the bias-corrected gap when known;
- ``subject``: the patient by identifier (``[report] patient_identifier_system``);
- ``effectiveDateTime``: the study's date and time;
- ``derivedFrom``: the ImagingStudy, by its Study Instance UID;
- ``device``: the model as a contained ``Device`` (name, version, weights SHA-256);
- ``meta.security``: ``AIAST`` (HL7 v3 ObservationValue, "Artificial Intelligence asserted"),
  the AI-transparency tag;
- a ``note`` when the weights are untrained.

The Observation's identifier is the SR's SOP Instance UID (``urn:dicom:uid``), so a resend
with a conditional create makes no second Observation. Built with ``fhir.resources`` (R4B
classes, whose Observation and Device are those of R4), which validates every element.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from pydantic import ValidationError
from pydicom.dataset import Dataset

from node.dicom.header import study_datetime
from node.report.findings import Findings
from node.report.uids import NAMESPACE

# The node's own code system: a URN of the node's fixed UUID namespace, valid forever.
CODE_SYSTEM = f"urn:uuid:{NAMESPACE}"
DICOM_UID = "urn:dicom:uid"  # FHIR's system for DICOM UIDs, values as urn:oid:
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"

XRAY_AGE = ("XA-001", "X-ray age, estimated from a frontal chest radiograph")
AGE_GAP = ("XA-002", "X-ray age minus chronological age")
CORRECTED_GAP = ("XA-003", "X-ray age minus chronological age, bias-corrected")
UNTRAINED_NOTE = "UNTRAINED DEMO WEIGHTS: not an age estimate, not for diagnosis."


def _own(code: tuple[str, str]) -> CodeableConcept:
    return CodeableConcept(
        coding=[Coding(system=CODE_SYSTEM, code=code[0], display=code[1])], text=code[1]
    )


def _years(value: float) -> Quantity:
    return Quantity(value=round(value, 2), unit="year", system=UCUM, code="a")


def sr_identifier(sr_sop_instance_uid: str) -> Identifier:
    return Identifier(system=DICOM_UID, value=f"urn:oid:{sr_sop_instance_uid}")


def effective_time(header: Dataset) -> str | None:
    """The study's date (and time, in the node's time zone where the header gives none), as a
    FHIR dateTime: a time needs a zone there."""
    moment = study_datetime(header, ("StudyDate", "ContentDate"))
    if not isinstance(moment, dt.datetime):
        return None if moment is None else moment.isoformat()
    offset = header.get("TimezoneOffsetFromUTC")
    if offset:
        sign = -1 if str(offset).startswith("-") else 1
        hhmm = str(offset).lstrip("+-")
        zone = dt.timezone(sign * dt.timedelta(hours=int(hhmm[:2]), minutes=int(hhmm[2:4])))
        return moment.replace(tzinfo=zone).isoformat()
    return moment.astimezone().isoformat()


def build_observation(
    header: Dataset,
    findings: Findings,
    sr_sop_instance_uid: str,
    patient_identifier_system: str | None,
) -> Observation:
    """The Observation of ``findings`` on the image ``header`` describes, identified by the
    SR's UID. ValueError when the header's values make no valid resource."""
    card = findings.card
    components = []
    if findings.chronological_age is not None:
        age = CodeableConcept(coding=[Coding(system=LOINC, code="30525-0", display="Age")])
        components.append(
            ObservationComponent(code=age, valueQuantity=_years(findings.chronological_age))
        )
    for code, value in ((AGE_GAP, findings.age_gap), (CORRECTED_GAP, findings.corrected_age_gap)):
        if value is not None:
            components.append(ObservationComponent(code=_own(code), valueQuantity=_years(value)))
    model = Device(
        id="model",
        deviceName=[DeviceDeviceName(name=card.name, type="model-name")],
        version=[DeviceVersion(value=card.version)],
        identifier=[Identifier(system="urn:xrayage:weights-sha256", value=card.sha256)]
        if card.sha256
        else None,
        note=[Annotation(text=UNTRAINED_NOTE)] if card.untrained else None,
    )
    patient_id = str(header.get("PatientID") or "").strip()
    if not patient_id:
        raise ValueError("FHIR Observation: no Patient ID, so the EHR cannot place the result")
    patient = Identifier(system=patient_identifier_system, value=patient_id)
    study = Reference(
        type="ImagingStudy",
        identifier=Identifier(system=DICOM_UID, value=f"urn:oid:{header.StudyInstanceUID}"),
    )
    try:
        return Observation(
            meta=Meta(
                security=[
                    Coding(
                        system=V3_OBSERVATION_VALUE,
                        code="AIAST",
                        display="Artificial Intelligence asserted",
                    )
                ]
            ),
            contained=[model],
            identifier=[sr_identifier(sr_sop_instance_uid)],
            status="preliminary",
            category=[
                CodeableConcept(
                    coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging", display="Imaging")]
                )
            ],
            code=_own(XRAY_AGE),
            subject=Reference(type="Patient", identifier=patient),
            effectiveDateTime=effective_time(header),
            valueQuantity=_years(findings.xray_age),
            bodySite=CodeableConcept(
                coding=[Coding(system=SNOMED, code="51185008", display="Thoracic structure")]
            ),
            device=Reference(reference="#model"),
            derivedFrom=[study],
            component=components or None,
            note=[Annotation(text=UNTRAINED_NOTE)] if card.untrained else None,
        )
    except ValidationError as e:
        raise ValueError(f"FHIR Observation: {e.errors()[0]['msg']}") from None


def encode_observation(observation: Observation) -> bytes:
    return observation.model_dump_json(exclude_none=True).encode()


def read_observation(path: Path) -> Observation:
    """The stored Observation, validated again (a file damaged on disk fails here)."""
    return Observation.model_validate_json(path.read_bytes())
