from __future__ import annotations

import pydicom
import pytest

from node.dicom.header import chronological_age


def ds(**attrs: str) -> pydicom.Dataset:
    d = pydicom.Dataset()
    for k, v in attrs.items():
        setattr(d, k, v)
    return d


@pytest.mark.parametrize(
    ("attrs", "years"),
    [
        ({"PatientAge": "062Y"}, 62.0),
        ({"PatientAge": "018M"}, 1.5),
        ({"PatientAge": "052W"}, 1.0),
        ({"PatientBirthDate": "19400305", "StudyDate": "20040826"}, 64.48),
        ({"PatientBirthDate": "19400305", "AcquisitionDate": "19500305"}, 10.0),
        # no unit: ambiguous, so the birth date decides, and without one the age is unknown
        ({"PatientAge": "062", "PatientBirthDate": "19400305", "StudyDate": "20000305"}, 60.0),
        ({"PatientAge": "062"}, None),
        ({"PatientBirthDate": "20100101", "StudyDate": "20000101"}, None),
        ({"PatientBirthDate": "garbage", "StudyDate": "20000101"}, None),
        ({}, None),
    ],
)
def test_chronological_age(attrs: dict[str, str], years: float | None) -> None:
    assert chronological_age(ds(**attrs)) == years
