"""What one report says, independent of how it is encoded (SR or Secondary Capture)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ai.card import ModelCard
from node.results.aging import AgingRate, aging_rate


@dataclass(frozen=True)
class EarlierAge:
    """An earlier image of the same patient, aged by the same model."""

    study_date: dt.date
    xray_age: float
    chronological_age: float | None


@dataclass(frozen=True)
class Findings:
    xray_age: float
    chronological_age: float | None
    card: ModelCard
    study_date: dt.date | None = None
    earlier: tuple[EarlierAge, ...] = ()  # oldest first; the summary image plots them

    @property
    def age_gap(self) -> float | None:
        """X-ray age minus chronological age (the SR's "Age difference")."""
        if self.chronological_age is None:
            return None
        return round(self.xray_age - self.chronological_age, 2)

    @property
    def corrected_age_gap(self) -> float | None:
        """The age gap less its expected value at this age, by the card's bias correction."""
        correction = self.card.gap_correction
        if correction is None or self.chronological_age is None:
            return None
        slope, intercept = correction
        raw = self.xray_age - self.chronological_age
        return round(raw - (slope * self.chronological_age + intercept), 2)

    @property
    def aging_rate(self) -> AgingRate | None:
        """The patient's X-ray aging rate over the earlier images and this one."""
        if self.study_date is None:
            return None
        return aging_rate(
            [(e.study_date, e.xray_age) for e in self.earlier] + [(self.study_date, self.xray_age)]
        )

    @property
    def series_description(self) -> str:
        # LO, at most 64 characters, and only characters every character set can carry.
        if self.card.untrained:
            return "X-ray age - AI, UNTRAINED DEMO WEIGHTS - not for diagnosis"
        return "X-ray age - AI result - not for diagnosis"
