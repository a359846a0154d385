"""The figures people read, checked by what they draw: the dashboard's SVGs (text kept as text)
and the cohort's forest plot. Whole-number counts, dates that do not crowd, markers that do
not hide each other, labels in words with the estimates written beside them, intervals
within the axes, and an untrained model's figures saying so."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from ai.card import ModelCard
from node.cohort.analysis import Plan, analyse
from node.cohort.inputs import Outcome, Selection, build_cohort, image
from node.cohort.plots import forest_figure
from node.cohort.synthetic import Truth, synthetic_cohort
from node.config import ValidationSection
from node.http import plots
from node.results.validation import Validation
from storage import Database, utcnow
from tests.test_validation import _reported

TRAINED = ModelCard(name="t", version="1", sha256="ab" * 32, reference_mae=4.95)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    now = utcnow()
    for day in range(0, 30, 2):  # a few images every other day
        _reported(db, [(60.0 + day % 5, 58.0)] * (1 + day % 3), now - dt.timedelta(days=day))
    return db


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the dashboard renders, kept to read back what they draw."""
    figures: list[Figure] = []
    render = plots._svg

    def keep(fig: Figure) -> bytes:
        figures.append(fig)
        return render(fig)

    monkeypatch.setattr(plots, "_svg", keep)
    return figures


def _texts(svg: bytes) -> list[str]:
    return [t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg.decode())]


def test_images_per_day_has_whole_counts_and_spaced_dates(
    db: Database, drawn: list[Figure]
) -> None:
    plots.per_day(db)
    (ax,) = drawn[0].axes
    drawn[0].canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_yticks())  # no 0.5 or 1.5 images
    dates = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert 3 <= len(dates) <= 8, dates  # a date label every few days, not 30


def test_equal_mae_and_bias_both_show_and_untrained_figures_say_so(
    db: Database, drawn: list[Figure]
) -> None:
    """Every image 2 years over: MAE equals bias each month; the bias marker is drawn hollow
    and smaller over the MAE's, so both are seen."""
    svg = plots.agreement([Validation(db, TRAINED, ValidationSection())])
    assert plots.UNTRAINED not in _texts(svg)
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    mae, bias = lines["MAE"], lines["bias"]
    assert list(mae.get_ydata()) == list(bias.get_ydata())  # equal here
    assert bias.get_markersize() < mae.get_markersize() and bias.get_fillstyle() == "none"
    assert bias.get_zorder() > mae.get_zorder()
    untrained = ModelCard(name="demo", sha256="ab" * 32, untrained=True)
    for plot in (plots.scatter, plots.bland_altman, plots.gaps, plots.agreement):
        assert plots.UNTRAINED in _texts(plot([Validation(db, untrained, ValidationSection())]))


def test_the_forest_plot_names_its_rows_in_words_and_writes_each_estimate() -> None:
    results, outcomes = synthetic_cohort(Truth(n=800, seed=2))
    rows = [Outcome(2, o["patient_id"], o["followup_days"], o["event"], o["index_date"],
                    {"anaemia": 1.0 if o["anaemia"] == "yes" else 0.0, "egfr": o["egfr"],
                     "hypertension": float(o["hypertension"])})
            for o in outcomes]  # fmt: skip
    cohort = build_cohort(rows, [image(r, "-") for r in results], Selection(index_date=True))
    analysis = analyse(cohort, Plan(adjust=("age", "sex", "egfr", "anaemia"),
                                    comorbidities=("hypertension",)))  # fmt: skip
    fig = forest_figure(analysis)
    fig.canvas.draw()
    hazards, shifts = fig.axes
    labels = [t.get_text() for t in hazards.get_yticklabels()]
    assert "X-ray age gap, bias-corrected (this cohort's)\n(per 5 years)" in labels
    assert "age (per year)" in labels and "male sex" in labels
    assert not any("_" in label for ax in fig.axes for label in
                   (t.get_text() for t in ax.get_yticklabels()))  # fmt: skip
    cox = analysis.summary["cox"]
    written = [t.get_text() for t in hazards.texts]
    hr = cox["covariates"]["age"]
    assert f"{hr['hr']:.2f} ({hr['ci95'][0]:.2f} to {hr['ci95'][1]:.2f})" in written
    assert len(written) == len(labels) and len(shifts.texts) == 1
    low, high = hazards.get_xlim()  # every interval within the axis, with room at the ends
    intervals = [cox["gap"]["ci95_per_5_years"], *(c["ci95"] for c in cox["covariates"].values())]
    assert low < min(i[0] for i in intervals) and high > max(i[1] for i in intervals)
    # Caps at both ends of every interval: a narrow one still shows beyond its marker.
    caps = [c for c in hazards.get_children() if type(c).__name__ == "Line2D"
            and c.get_marker() == "|"]  # fmt: skip
    assert len(caps) >= 2 * len(labels)
