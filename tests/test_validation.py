"""Continuous local validation: the figures over the rolling window and by month (of the
analysis or of the study), only patients within the card's range, images and patients counted
apart, r and limits of agreement only from 10 images, and a drift past the card's stated MAE
over enough patients said once a day."""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from pathlib import Path

import pytest
from sqlalchemy import select

from ai.card import ModelCard
from node.config import ValidationSection
from node.results.validation import ALERT_EVENT, Validation
from storage import AuditEvent, Database, Instance, InstanceState, Result, utcnow

CARD = ModelCard(name="test", version="1", sha256="ab" * 32, reference_mae=4.95)


def _reported(
    db: Database,
    ages: list[tuple[float, float]],
    at: dt.datetime,
    patient: str | None = None,
    study_date: dt.date | None = None,
) -> None:
    """Reported images; each its own patient unless ``patient`` is given."""
    with db.session() as s:
        for xray, real in ages:
            n = s.query(Instance).count()
            inst = Instance(
                sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                path="-", sha256="-", size=0, state=InstanceState.REPORTED, view_position="PA",
                patient_id=patient or f"P{n}", study_date=study_date,
            )  # fmt: skip
            s.add(inst)
            s.flush()
            s.add(
                Result(
                    instance_id=inst.id,
                    model_name="test",
                    model_version="1",
                    model_sha256=CARD.sha256,
                    xray_age=xray,
                    chronological_age=real,
                    created_at=at,
                )
            )


@pytest.fixture
def db(tmp_path: Path) -> Database:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    return db


def test_windows_months_and_the_cards_range(db: Database) -> None:
    now = utcnow()
    _reported(db, [(50.0, 48.0), (40.0, 44.0)], now - dt.timedelta(days=2))
    _reported(db, [(30.0, 30.5)], now - dt.timedelta(days=60))  # outside the window
    _reported(db, [(12.0, 10.0), (99.0, 101.0)], now)  # outside the card's 18-100
    v = Validation(db, CARD, ValidationSection(window_days=30))
    (rolling,) = v.figures("all")
    assert (rolling.images, rolling.mae, rolling.bias) == (2, 3.0, -1.0)
    months = v.figures("month")
    assert sum(m.images for m in months) == 3
    assert months[0].period == f"{now - dt.timedelta(days=60):%Y-%m}"


def test_images_and_patients_are_counted_apart_and_r_needs_ten(db: Database) -> None:
    now = utcnow()
    _reported(db, [(50.0 + i, 48.0 + i) for i in range(6)], now, "A", dt.date(2019, 5, 2))
    _reported(db, [(40.0 + i, 44.0 + 2 * i) for i in range(3)], now, "B", dt.date(2026, 1, 9))
    (nine,) = Validation(db, CARD, ValidationSection()).figures("all")
    assert (nine.images, nine.patients) == (9, 2)
    assert nine.r is None and nine.loa_low is None and nine.loa_high is None
    assert nine.note == "r and limits of agreement need at least 10 images"
    _reported(db, [(70.0, 69.0)], now, "C", dt.date(2026, 1, 20))
    (ten,) = Validation(db, CARD, ValidationSection()).figures("all")
    pairs = [
        *((50.0 + i, 48.0 + i) for i in range(6)),
        *((40.0 + i, 44.0 + 2 * i) for i in range(3)),
    ]
    xs, ys = [x for x, _ in pairs] + [70.0], [y for _, y in pairs] + [69.0]
    diffs = [x - y for x, y in zip(xs, ys, strict=True)]
    assert ten.r == pytest.approx(statistics.correlation(xs, ys)) and ten.note is None
    assert ten.loa_high == pytest.approx(statistics.fmean(diffs) + 1.96 * statistics.stdev(diffs))
    # A retro-scan ages old studies today: by analysis one month, by study the studies' months.
    assert [m.period for m in Validation(db, CARD, ValidationSection()).figures("month")] == [
        f"{now:%Y-%m}"
    ]
    by_study = Validation(db, CARD, ValidationSection()).figures("study-month")
    assert [(m.period, m.images, m.patients) for m in by_study] == [
        ("2019-05", 6, 1),
        ("2026-01", 4, 2),
    ]


def test_a_drift_is_warned_and_audited_once_a_day(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    _reported(db, [(60.0 + i % 7 + 9, 60.0 + i % 7) for i in range(120)], utcnow())
    v = Validation(db, CARD, ValidationSection(min_count=100, alert_margin_years=2))
    with caplog.at_level(logging.WARNING):
        first = v.check()
        assert first is not None and "MAE 9.00 years" in first and "stated 4.95" in first
        assert v.check() is None  # said today already
    assert [r.getMessage() for r in caplog.records] == [f"validation: {first}"]
    with db.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.event == ALERT_EVENT)).all()
    assert [(e.outcome, e.detail) for e in events] == [("failure", first)]
    assert Validation(db, CARD, ValidationSection(min_count=121)).drift() is None  # too few


def test_a_drift_needs_enough_patients_not_images(db: Database) -> None:
    """120 images of one patient are one patient's anatomy, not a site's drift."""
    _reported(db, [(69.0 + i % 7, 60.0 + i % 7) for i in range(120)], utcnow(), "ONE")
    assert Validation(db, CARD, ValidationSection(min_count=100)).drift() is None
    assert Validation(db, CARD, ValidationSection(min_count=1)).drift() is not None
    assert Validation(db, CARD, ValidationSection(alert_margin_years=5)).drift() is None
