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

from node.report.evidence import character_set, keep_character_set, usable_header
from node.report.findings import EarlierAge, Findings
from node.report.identity import MANUFACTURER
from node.report.uids import ReportUIDs

SIZE = 1024


Line = tuple[str, int]  # text, font size in pixels
MARGIN = 64


def _lines(f: Findings) -> list[Line]:
    """The summary's lines, top down. With untrained weights the warning comes first and
    largest, and the number is small: it is not an age estimate."""
    card = f.card
    if card.untrained:
        lines = [
            ("UNTRAINED DEMO WEIGHTS", 64),
            ("NOT AN AGE ESTIMATE", 64),
            (f"(the network's output: {f.xray_age:.1f})", 32),
        ]
    else:
        lines = [("X-ray age", 52), (f"{f.xray_age:.1f} years", 96)]
        if card.reference_mae is not None:
            lines.append((f"typical error ± {card.reference_mae:.1f} years (model's MAE)", 32))
    if f.chronological_age is not None and f.age_gap is not None:
        lines += [
            (f"Chronological age  {f.chronological_age:.1f} years", 40),
            (f"Difference  {f.age_gap:+.1f} years", 40),
        ]
        if f.corrected_age_gap is not None:
            lines.append((f"Bias-corrected difference  {f.corrected_age_gap:+.1f} years", 40))
        if not card.untrained:
            lines.append(("A positive difference: the chest looks older than the age.", 28))
    else:
        lines.append(("Chronological age unknown", 40))
    return lines


def _footer(source: Dataset, f: Findings) -> list[Line]:
    card = f.card
    return [
        ("AI result — not for diagnosis", 40),
        (f"Model  {card.name} {card.version}"[:60], 24),
        (f"Weights SHA-256  {card.sha256[:16]}...", 24),
        (
            f"Source  {source.get('Modality', '')} {source.get('BodyPartExamined', '')} "
            f"{source.get('ViewPosition', '')}  series {source.get('SeriesNumber', '')} "
            f"image {source.get('InstanceNumber', '')}",
            24,
        ),
    ]


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    # DejaVu Sans ships inside matplotlib, so every install has the same full-coverage font.
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _height(lines: list[Line]) -> int:
    return sum(int(size * 1.35) for _, size in lines)


def _history(f: Findings, width: int, height: int) -> Image.Image:
    """This patient's X-ray ages over time (and chronological ages), white on black."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    points = [*f.earlier, EarlierAge(f.study_date, f.xray_age, f.chronological_age)]  # type: ignore[arg-type]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="black")
    # Fixed margins: tight_layout and autofmt_xdate measured the text twice, 60 of the 96 ms.
    rate = f.aging_rate
    top = 0.86 if rate is None else 0.76  # room for the rate's line in the title
    fig.subplots_adjust(left=0.07, right=0.98, top=top, bottom=0.16)
    ax = fig.subplots()
    ax.set_facecolor("black")
    dates = [p.study_date for p in points]
    ax.plot(dates, [p.xray_age for p in points], "o-", color="white", label="X-ray age")
    known = [p for p in points if p.chronological_age is not None]
    if known:
        ages = [p.chronological_age for p in known]
        ax.plot([p.study_date for p in known], ages, "s--", color="#999", label="age")
    ax.plot(dates[-1:], [f.xray_age], "o", color="white", markersize=14, fillstyle="none")
    title = "This patient's X-ray ages (years)"
    if rate is not None:  # the least-squares line whose slope is the rate
        ends = [dates[0], dates[-1]]
        ax.plot(ends, [rate.at(d) for d in ends], "-", color="#f5c542", linewidth=2,
                label="fitted line")  # fmt: skip
        title += f"\naging rate {rate.rate:.1f} years per year ({rate.images} images)"
    ax.set_title(title, color="white", fontsize=18)
    ax.legend(facecolor="black", labelcolor="white", fontsize=14, frameon=False)
    locator = AutoDateLocator(maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.tick_params(colors="white", labelsize=13)
    for spine in ax.spines.values():
        spine.set_color("#777")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("L")


def render(source: Dataset, findings: Findings) -> np.ndarray:
    """The page: the findings at the top, the footer at the bottom, and between them, when
    the patient has earlier X-ray ages by this model, their plot over time."""
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    lines, footer = _lines(findings), _footer(source, findings)
    y = 56
    for i, (text, size) in enumerate(lines):
        if findings.card.untrained and i < 2:  # the warning in a white band: it dominates
            draw.rectangle((0, y - 8, SIZE, y + int(size * 1.3)), fill=255)
            draw.text((MARGIN, y), text, fill=0, font=_font(size))
        else:
            draw.text((MARGIN, y), text, fill=255, font=_font(size))
        y += int(size * 1.35)
    bottom = SIZE - 40 - _height(footer)
    if findings.earlier and findings.study_date is not None and bottom - y > 200:
        plot = _history(findings, SIZE - 2 * MARGIN, bottom - y - 40)
        image.paste(plot, (MARGIN, y + 20))
    for text, size in footer:
        draw.text((MARGIN, bottom), text, fill=255, font=_font(size))
        bottom += int(size * 1.35)
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
