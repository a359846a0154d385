"""A Secondary Capture image that shows the report's numbers, for viewers that cannot show SR.

The text is rendered into the pixels (MONOCHROME2, 8-bit) with no patient name in it, so the
image carries no burned-in identifiers; patient and study come from the source's header.
"""

from __future__ import annotations

from functools import cache

import highdicom as hd
import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from node.gate import MANUFACTURER
from node.report.findings import Findings
from node.report.header import character_set, keep_character_set, usable_header
from node.report.uids import ReportUIDs

SIZE = 1024


def _lines(source: Dataset, f: Findings) -> list[tuple[str, int]]:
    """(text, font size) lines of the summary."""
    card = f.card
    lines = [("X-ray age", 64), (f"{f.xray_age:.1f} years", 96)]
    if f.chronological_age is not None and f.difference is not None:
        lines += [
            (f"Chronological age  {f.chronological_age:.1f} years", 40),
            (f"Difference  {f.difference:+.1f} years", 40),
        ]
        if f.corrected_difference is not None:
            lines.append((f"Bias-corrected difference  {f.corrected_difference:+.1f} years", 40))
    else:
        lines.append(("Chronological age unknown", 40))
    lines += [
        ("", 24),
        (f"Model  {card.name} {card.version}"[:60], 28),
        (f"Weights SHA-256  {card.sha256[:16]}...", 28),
        (
            f"Source  {source.get('Modality', '')} {source.get('BodyPartExamined', '')} "
            f"{source.get('ViewPosition', '')}  series {source.get('SeriesNumber', '')} "
            f"image {source.get('InstanceNumber', '')}",
            28,
        ),
        ("", 24),
        ("AI result — not for diagnosis", 44),
    ]
    if card.untrained:
        lines.append(("UNTRAINED DEMO WEIGHTS — NOT AN AGE ESTIMATE", 30))
    return lines


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    # DejaVu Sans ships inside matplotlib, so every install has the same full-coverage font.
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def render(source: Dataset, findings: Findings) -> np.ndarray:
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    y = 80
    for text, size in _lines(source, findings):
        draw.text((64, y), text, fill=255, font=_font(size))
        y += int(size * 1.35)
    return np.asarray(image, dtype=np.uint8)


def build_sc(
    source: Dataset, findings: Findings, uids: ReportUIDs, series_number: int
) -> hd.sc.SCImage:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=usable_header(source),
        specific_character_set=character_set(source),
        pixel_array=render(source, findings),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        series_instance_uid=uids.sc_series,
        series_number=series_number,
        sop_instance_uid=uids.sc_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=findings.series_description,
    )
    # A text page has no anatomical axes: Patient Orientation is Type 2C here (PS3.3 C.7.6.1),
    # so it is sent empty rather than with the placeholder highdicom requires.
    sc.PatientOrientation = ""
    # Laterality (Type 2C) is unknowable for a text page; empty is what PS3.3 C.7.3.1 allows.
    sc.Laterality = ""
    sc.BurnedInAnnotation = "NO"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    keep_character_set(sc, source)
    return sc
