"""Which received instances are analysed (ARCHITECTURE.md: gate before inference).

Only frontal chest radiographs: CR or DX For Presentation, chest, PA or AP, a primary image,
within the model's validated age range, and never the node's own output. Everything else is
accepted on the wire (so the PACS does not retry) and recorded as skipped with the first reason
found. The gate reads header attributes only; pixels are decoded later by the inference worker.
A value that cannot be read as its VR says (``NumberOfFrames`` = ``abc``) is itself the reason:
the instance is skipped naming the attribute, never a failed C-STORE.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from ai.limits import over_budget
from node.config import GateSection
from node.dicom.header import Unreadable, chronological_age, integer
from node.dicom.header import value as _get

RADIOGRAPHS = {ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation}


@dataclass(frozen=True)
class Decision:
    analyse: bool
    reason: str | None = None
    code: str | None = None  # a short, fixed name for the reason (a metrics label)


def _skip(code: str, reason: str) -> Decision:
    return Decision(False, reason, code)


def _descriptions(ds: Dataset) -> str:
    return " | ".join(
        str(_get(ds, k) or "") for k in ("SeriesDescription", "ProtocolName", "StudyDescription")
    )


def _body_part(ds: Dataset, gate: GateSection) -> str | None:
    part = str(_get(ds, "BodyPartExamined") or "").strip().upper()
    if part:
        allowed = {p.upper() for p in gate.body_parts}
        return None if part in allowed else f"body part {part} is not {'/'.join(sorted(allowed))}"
    if any(re.search(p, _descriptions(ds)) for p in gate.chest_patterns):
        return None
    return "no BodyPartExamined, and no description names the chest"


def _view(ds: Dataset, gate: GateSection) -> str | None:
    view = str(_get(ds, "ViewPosition") or "").strip().upper()
    allowed = [v.upper() for v in gate.views]
    if view:
        return None if view in allowed else f"view {view} is not frontal ({'/'.join(allowed)})"
    text = _descriptions(ds)
    if any(re.search(p, text) for v, p in gate.view_patterns.items() if v.upper() in allowed):
        return None
    return "no ViewPosition, and no description names a frontal view"


@dataclass(frozen=True)
class Gate:
    """The rules under ``[gate]``, the model's validated ``age_range``, and what the node's own
    output is (``is_own_output``, given by the reports that write it)."""

    section: GateSection
    age_range: tuple[float, float]
    is_own_output: Callable[[Dataset], bool]

    def decide(self, ds: Dataset) -> Decision:
        try:
            return self._decide(ds)
        except Unreadable as e:
            return _skip("unreadable", str(e))

    def _decide(self, ds: Dataset) -> Decision:
        gate = self.section
        sop_class = str(_get(ds, "SOPClassUID"))
        if self.is_own_output(ds):
            return _skip("own-output", "the node's own output")
        if sop_class == DigitalXRayImageStorageForProcessing:
            return _skip(
                "for-processing", "DX For Processing (raw detector image, not for presentation)"
            )
        if sop_class not in RADIOGRAPHS:
            name = getattr(ds.SOPClassUID, "name", sop_class) if "SOPClassUID" in ds else "missing"
            return _skip("sop-class", f"SOP class {name} is not CR or DX For Presentation")
        if str(_get(ds, "PresentationIntentType")).upper() == "FOR PROCESSING":
            return _skip("for-processing", "PresentationIntentType FOR PROCESSING")
        image_type = [str(v).upper() for v in (_get(ds, "ImageType", None) or [])]  # type: ignore[attr-defined]
        if len(image_type) >= 2 and image_type[1] == "SECONDARY":
            return _skip("secondary", "ImageType SECONDARY (derived or captured image)")
        if image_type[:1] == ["DERIVED"] and not gate.accept_derived_primary:
            return _skip("derived", "ImageType DERIVED")
        if "PixelData" not in ds:
            return _skip("no-pixels", "no Pixel Data")
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "NumberOfFrames"):
            integer(ds, keyword)  # a number, or Unreadable naming it
        budget = over_budget(ds)
        if budget:
            return _skip("too-large", budget)
        if integer(ds, "SamplesPerPixel") != 1:
            return _skip("colour", f"colour image ({_get(ds, 'PhotometricInterpretation', '?')})")
        if integer(ds, "NumberOfFrames") != 1:
            return _skip("multi-frame", "multi-frame image")
        for code, check in (("body-part", _body_part), ("view", _view)):
            reason = check(ds, gate)
            if reason:
                return _skip(code, reason)
        age = chronological_age(ds)
        low, high = self.age_range
        if age is not None and not low <= age <= high:
            return _skip(
                "age-range",
                f"patient age {age:g} outside the model's validated range {low:g}-{high:g}",
            )
        return Decision(True)
