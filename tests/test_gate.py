"""The gate: only frontal chest radiographs are analysed; everything else has a reason."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from node.config import GateSection
from node.gate import Gate
from node.report.identity import is_own_output

ADULT = (18.0, 100.0)


def decide(ds: pydicom.Dataset, gate: GateSection, age_range: tuple[float, float]):  # type: ignore[no-untyped-def]
    return Gate(gate, age_range, is_own_output).decide(ds)


def reason(ds: pydicom.Dataset, gate: GateSection | None = None) -> str | None:
    return decide(ds, gate or GateSection(), ADULT).reason


def test_the_chest_pa_from_pydicom_data_is_analysed(chest_ds: pydicom.Dataset) -> None:
    assert decide(chest_ds, GateSection(), ADULT).analyse


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"ViewPosition": "LL"}, "view LL is not frontal (PA/AP)"),
        ({"BodyPartExamined": "SKULL"}, "body part SKULL is not CHEST"),
        (
            {"SOPClassUID": DigitalXRayImageStorageForProcessing},
            "DX For Processing (raw detector image, not for presentation)",
        ),
        (
            {"SOPClassUID": SecondaryCaptureImageStorage},
            "SOP class Secondary Capture Image Storage is not CR or DX For Presentation",
        ),
        (
            {"ImageType": ["DERIVED", "SECONDARY"]},
            "ImageType SECONDARY (derived or captured image)",
        ),
        ({"Manufacturer": "xrayage"}, None),  # a radiograph, whatever its label
        (
            {"Manufacturer": "xrayage", "SOPClassUID": SecondaryCaptureImageStorage},
            "the node's own output",
        ),
        (
            {"Manufacturer": "xrayage", "SOPClassUID": Comprehensive3DSRStorage},
            "the node's own output",
        ),
        ({"PatientAge": "007Y"}, "patient age 7 outside the model's validated range 18-100"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "colour image (RGB)"),
        ({"NumberOfFrames": 4}, "multi-frame image"),
        (
            {"Rows": 60000, "Columns": 60000},
            "60000 x 60000 pixels (x 1 samples and frames) exceed the pixel budget of "
            "67,108,864 before decoding",
        ),
    ],
)
def test_skip_reasons(
    chest_ds: pydicom.Dataset, edit: dict[str, object], expected: str | None
) -> None:
    for keyword, value in edit.items():
        setattr(chest_ds, keyword, value)
    assert reason(chest_ds) == expected


def test_missing_pixel_data_is_skipped(chest_ds: pydicom.Dataset) -> None:
    del chest_ds.PixelData
    assert reason(chest_ds) == "no Pixel Data"


def test_derived_primary_can_be_refused_by_config(chest_ds: pydicom.Dataset) -> None:
    assert chest_ds.ImageType[:2] == ["DERIVED", "PRIMARY"]
    assert reason(chest_ds, GateSection(accept_derived_primary=False)) == "ImageType DERIVED"


def test_missing_body_part_and_view_fall_back_on_descriptions(chest_ds: pydicom.Dataset) -> None:
    del chest_ds.BodyPartExamined
    del chest_ds.ViewPosition
    chest_ds.StudyDescription = "ABDOMEN"
    assert reason(chest_ds) == "no BodyPartExamined, and no description names the chest"
    chest_ds.SeriesDescription = "Chest P.A."
    assert reason(chest_ds) is None
    chest_ds.SeriesDescription = "Chest lateral"
    assert reason(chest_ds) == "no ViewPosition, and no description names a frontal view"
