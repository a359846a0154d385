"""The DICOM Structured Report: a TID 1500 Measurement Report in a Comprehensive 3D SR.

Content (PS3.16 TID 1500, IHE AI Results):
- observer context: the node as device observer (TID 1004);
- procedure reported: plain chest X-ray (SCT 399208008);
- image library (TID 1600) and the measurement group's source image: the radiograph;
- measurements (TID 300): X-ray age, chronological age when known, their difference and, when
  the model card carries an age-gap bias correction, the difference with that correction, in
  UCUM ``a`` (year), each with algorithm identification (TID 4019: name, version, weights
  SHA-256).

No standard code exists for an image-estimated age, so the private coding scheme ``99XRAYAGE``
is declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import CodedConcept, RelationshipTypeValues
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.compat import entry_descriptors
from node.report.evidence import character_set, keep_character_set, usable_header
from node.report.findings import Findings
from node.report.identity import MANUFACTURER
from node.report.uids import ReportUIDs, device_uid

SCHEME = "99XRAYAGE"
XRAY_AGE = CodedConcept("XA-001", SCHEME, "X-ray age")
AGE_DIFFERENCE = CodedConcept("XA-002", SCHEME, "X-ray age minus chronological age")
CORRECTED_DIFFERENCE = CodedConcept("XA-003", SCHEME, "Age difference, bias-corrected")
CHRONOLOGICAL_AGE = CodedConcept("30525-0", "LN", "Age")
YEARS = CodedConcept("a", "UCUM", "year")
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain X-ray of chest")


def _projection_descriptors(dataset: Dataset) -> list:
    """The TID 1603 projection-radiography items, only those present.

    Patient Orientation and Imager Pixel Spacing are Type 3 in the CR IOD (many chest CRs lack
    them, the pydicom-data one included), and TID 1603 makes their items conditional on them.
    highdicom requires both, so the projection descriptors are generated here.
    """
    items: list = []
    orientation = dataset.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2:
        for code, value in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn),
            orientation,
            strict=True,
        ):
            items.append(
                hd.sr.TextContentItem(
                    name=code,
                    value=value,
                    relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
    spacing = dataset.get("ImagerPixelSpacing") or dataset.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
        for code, value in (
            (codes.DCM.HorizontalPixelSpacing, spacing[1]),
            (codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            items.append(
                hd.sr.NumContentItem(
                    name=code,
                    value=float(value),
                    unit=codes.UCUM.Millimeter,
                    relationship_type=RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
    return items


def image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library holding the source radiograph."""
    entry = hd.sr.ImageContentItem(
        name=CodedConcept("260753009", "SCT", "Source"),
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    entry.ContentSequence = hd.sr.ContentSequence(
        entry_descriptors(source, _projection_descriptors)
    )
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence([entry])
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def algorithm(findings: Findings) -> hd.sr.AlgorithmIdentification:
    card = findings.card
    parameters = [f"weights-sha256={card.sha256}"]
    if card.untrained:
        parameters.append("weights=UNTRAINED random weights, the value is not an age estimate")
    return hd.sr.AlgorithmIdentification(
        name=card.name[:64], version=card.version[:64], parameters=parameters
    )


def build_sr(
    source: Dataset,
    findings: Findings,
    uids: ReportUIDs,
    ae_title: str,
    series_number: int,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one source radiograph (``source`` may be header-only)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(ae_title),
            name=ae_title,
            manufacturer_name=MANUFACTURER,
            model_name=findings.card.name[:64],
        ),
    )
    algo = algorithm(findings)
    measurements = [
        hd.sr.Measurement(name=XRAY_AGE, value=findings.xray_age, unit=YEARS, algorithm_id=algo)
    ]
    if findings.chronological_age is not None and findings.age_gap is not None:
        measurements += [
            hd.sr.Measurement(name=CHRONOLOGICAL_AGE, value=findings.chronological_age, unit=YEARS),
            hd.sr.Measurement(
                name=AGE_DIFFERENCE, value=findings.age_gap, unit=YEARS, algorithm_id=algo
            ),
        ]
    if findings.corrected_age_gap is not None:
        measurements.append(
            hd.sr.Measurement(
                name=CORRECTED_DIFFERENCE,
                value=findings.corrected_age_gap,
                unit=YEARS,
                algorithm_id=algo,
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking, identifier="X-ray age"),
        algorithm_id=algo,
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
    )
    # TID 1500 row order: the image library follows the procedure reported.
    items = report[0].ContentSequence
    after = max(
        i for i, item in enumerate(items) if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    )
    items.insert(after + 1, image_library(source))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[usable_header(source)],
        specific_character_set=character_set(source),
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        is_complete=True,
        is_verified=False,
        series_description=findings.series_description,
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=SCHEME,
                name="xrayage private codes",
                responsible_organization="xrayage project",
            )
        ],
    )
    keep_character_set(sr, source)
    return sr
