"""Continuous local validation: the figures over the rolling window and by month, only
patients within the card's range, and a drift past the card's stated MAE said once a day."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from sqlalchemy import select

from ai.card import ModelCard
from node.config import ValidationSection
from node.results.validation import ALERT_EVENT, Validation
from storage import AuditEvent, Database, Instance, InstanceState, Result, utcnow

CARD = ModelCard(name="test", version="1", sha256="ab" * 32, reference_mae=4.95)


def _reported(db: Database, ages: list[tuple[float, float]], at: dt.datetime) -> None:
    with db.session() as s:
        for xray, real in ages:
            n = s.query(Instance).count()
            inst = Instance(
                sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                path="-", sha256="-", size=0, state=InstanceState.REPORTED, view_position="PA",
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
    assert (rolling.count, rolling.mae, rolling.bias) == (2, 3.0, -1.0)
    months = v.figures("month")
    assert sum(m.count for m in months) == 3
    assert months[0].period == f"{now - dt.timedelta(days=60):%Y-%m}"


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
    assert Validation(db, CARD, ValidationSection(alert_margin_years=5)).drift() is None
