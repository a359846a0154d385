"""The Secondary Capture summary, read by its text layout and its pixels: untrained weights'
warning dominates, a trained model's stated error and the meaning of a positive gap are said,
every line fits the page, and a patient's earlier X-ray ages are plotted in the lower half."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pydicom

from ai.card import ModelCard
from node.report.findings import EarlierAge, Findings
from node.report.sc import MARGIN, SIZE, _font, _footer, _lines, render

TRAINED = ModelCard(name="riken-senet154", version="v2", sha256="ab" * 32, reference_mae=4.95)
UNTRAINED = ModelCard(name="demo", untrained=True, sha256="cd" * 32)
PLOT_ROWS = slice(560, 800)  # between the findings and the footer


def test_untrained_weights_warning_dominates_the_number(chest_ds: pydicom.Dataset) -> None:
    lines = _lines(Findings(71.3, 65.2, UNTRAINED))
    assert [text for text, _ in lines[:2]] == ["UNTRAINED DEMO WEIGHTS", "NOT AN AGE ESTIMATE"]
    warning = min(size for _, size in lines[:2])
    assert all(size < warning for _, size in lines[2:])
    number = next(size for text, size in lines if "71.3" in text)
    assert number <= warning / 2
    pixels = render(chest_ds, Findings(71.3, 65.2, UNTRAINED))
    assert (pixels[60:240] == 255).mean() > 0.5  # drawn in a white band


def test_trained_summary_says_the_error_and_what_a_positive_gap_means(
    chest_ds: pydicom.Dataset,
) -> None:
    findings = Findings(71.3, 65.2, TRAINED)
    texts = [text for text, _ in _lines(findings)]
    assert texts[:2] == ["X-ray age", "71.3 years"]
    assert "typical error ± 5.0 years (model's MAE)" in texts
    assert "A positive difference: the chest looks older than the age." in texts
    for text, size in _lines(findings) + _footer(chest_ds, findings):
        assert _font(size).getlength(text) <= SIZE - MARGIN, text  # nothing runs off the page
    assert not render(chest_ds, findings)[PLOT_ROWS].any()  # no earlier ages: nothing drawn


def test_earlier_x_ray_ages_are_plotted_in_the_lower_half(chest_ds: pydicom.Dataset) -> None:
    earlier = (
        EarlierAge(dt.date(2021, 3, 1), 63.0, 59.5),
        EarlierAge(dt.date(2023, 6, 1), 66.1, None),
    )
    findings = Findings(71.3, 65.2, TRAINED, dt.date(2026, 11, 1), earlier)
    plotted = render(chest_ds, findings)[PLOT_ROWS]
    assert (plotted > 128).mean() > 0.005 and np.count_nonzero(plotted) > 2000


def test_the_aging_rate_is_drawn_as_the_fitted_line_and_stated(chest_ds: pydicom.Dataset) -> None:
    """Three images 2021-2026 rising 2 years of X-ray age per year: the rate is 2 and its line
    is drawn (the grey level of its colour, which no other mark has); images 4 months apart give
    no rate and no line."""
    earlier = (
        EarlierAge(dt.date(2021, 11, 1), 61.3, 60.2),
        EarlierAge(dt.date(2023, 11, 1), 65.3, 62.2),
    )
    findings = Findings(71.3, 65.2, TRAINED, dt.date(2026, 11, 1), earlier)
    rate = findings.aging_rate
    assert rate is not None and rate.images == 3
    assert abs(rate.rate - 2.0) < 0.01 and rate.se is not None and rate.se < 0.01
    close = Findings(71.3, 65.2, TRAINED, dt.date(2022, 3, 1), earlier[:1])
    assert close.aging_rate is None

    def line_pixels(f: Findings) -> int:
        return int(np.count_nonzero(np.abs(render(chest_ds, f)[PLOT_ROWS].astype(int) - 196) <= 2))

    assert line_pixels(findings) > 10 * line_pixels(close)
