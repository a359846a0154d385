"""The X-ray aging rate: how fast a patient's X-ray age rises per calendar year across their
serial radiographs, by one model.

The rate is the ordinary least-squares slope of X-ray age on study date (in years), with its
standard error (from the residuals; none with two images, where the line fits exactly) and the
number of images. A rate needs at least two images whose dates span ``MIN_SPAN_DAYS``: closer
images differ by the model's noise (MAE about 5 years) more than by ageing, so a slope over a
few weeks would be noise divided by a small interval.

A 2026 study of 421,894 adults (Radiology: AI) found that this speed, across serial chest
radiographs, predicted mortality beyond a single X-ray age. A rate of 1 is ageing in step with
the calendar.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

from scipy.stats import linregress

MIN_SPAN_DAYS = 365
DAYS_PER_YEAR = 365.25
COLUMNS = ("aging_rate", "aging_rate_se", "aging_rate_images")


@dataclass(frozen=True)
class AgingRate:
    rate: float  # years of X-ray age per calendar year
    se: float | None  # None with two images
    images: int
    intercept: float  # the fitted X-ray age at ``start``
    start: dt.date  # the first image's study date

    def at(self, when: dt.date) -> float:
        """The fitted X-ray age on a date (the line the SC draws)."""
        return self.intercept + self.rate * (when - self.start).days / DAYS_PER_YEAR

    def columns(self) -> dict[str, float | int | None]:
        return {"aging_rate": self.rate, "aging_rate_se": self.se, "aging_rate_images": self.images}


NO_RATE: dict[str, float | int | None] = dict.fromkeys(COLUMNS)


def aging_rate(
    points: Iterable[tuple[dt.date, float]], min_span_days: int = MIN_SPAN_DAYS
) -> AgingRate | None:
    """The rate over (study date, X-ray age) points, or None without two images at least
    ``min_span_days`` apart."""
    dated = sorted(points)
    if len(dated) < 2 or (dated[-1][0] - dated[0][0]).days < min_span_days:
        return None
    start = dated[0][0]
    years = [(d - start).days / DAYS_PER_YEAR for d, _ in dated]
    fit = linregress(years, [age for _, age in dated])
    se = float(fit.stderr) if len(dated) > 2 and math.isfinite(fit.stderr) else None
    return AgingRate(float(fit.slope), se, len(dated), float(fit.intercept), start)
