"""Synthetic cohorts with planted effects, for the demo (``xrayage cohort --demo``) and the
tests: every patient ID starts with ``SYNTHETIC-`` and every report drawn from them says so.

Each patient has one to three chest images over the years before an index date; the model's
X-ray age regresses to the mean (``20 + 0.7 × age``, as age models do) plus the patient's true
gap: comorbidity shifts and noise. Time to event is exponential, its log-hazard linear in the
true gap, age, sex, eGFR and anaemia; follow-up is censored uniformly.

Two optional plants test the time origin and the aging rate: ``rate_sd`` gives each patient an
aging rate of their own (X-ray age rising ``0.7 + deviation`` years per year, with a hazard
ratio of ``hr_per_rate`` per unit), and ``after_event_shift`` adds an image after the follow-up
(after the event, or the end of follow-up), older-looking by that many years in patients with
the event: reverse causation, which an index rule that looks past the origin picks up. They draw
from a generator of their own, so the other draws stay as they were.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.results import RESULT_COLUMNS

SYNTHETIC_PREFIX = "SYNTHETIC-"


@dataclass(frozen=True)
class Truth:
    """The planted effects. The defaults are the paper's comorbidity shifts (hypertension
    +0.87, atrial fibrillation or flutter +1.22 years) and a hazard ratio near its figure."""

    n: int = 1500
    seed: int = 1
    hr_per_year: float = 1.05  # per year of true gap
    shifts: Mapping[str, float] = field(
        default_factory=lambda: {"hypertension": 0.87, "atrial_fibrillation": 1.22}
    )
    gap_sd: float = 4.0
    daily_hazard: float = 1 / 2500
    max_followup_days: int = 1825
    rate_sd: float = 0.0  # SD of the patients' aging-rate deviations
    hr_per_rate: float = 1.0  # per year of X-ray age per calendar year
    after_event_shift: float | None = None  # years; None: no image after the follow-up


def synthetic_cohort(truth: Truth = Truth()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of a results export (``RESULT_COLUMNS``) and of an outcomes table."""
    rng = np.random.default_rng(truth.seed)
    n = truth.n
    age = rng.uniform(45, 90, n)
    male = rng.random(n) < 0.55
    comorbid = {"hypertension": rng.random(n) < 0.6, "atrial_fibrillation": rng.random(n) < 0.3}
    egfr = np.clip(rng.normal(60, 20, n), 5, 120)
    anaemia = rng.random(n) < 0.35
    gap = rng.normal(0, truth.gap_sd, n)
    for name, shift in truth.shifts.items():
        gap += shift * comorbid[name]
    plants = np.random.default_rng(truth.seed + 10_000)
    rate_deviation = plants.normal(0, truth.rate_sd, n) if truth.rate_sd else np.zeros(n)
    log_hazard = (
        math.log(truth.hr_per_year) * gap
        + math.log(truth.hr_per_rate) * rate_deviation
        + 0.03 * (age - 65)
        + 0.2 * male
        - 0.01 * (egfr - 60)
        + 0.3 * anaemia
    )
    event_days = rng.exponential(1 / (truth.daily_hazard * np.exp(log_hazard)))
    censor_days = rng.uniform(90, truth.max_followup_days, n)
    index_date = dt.date(2024, 1, 1) + np.array(
        [dt.timedelta(days=int(d)) for d in rng.integers(0, 730, n)]
    )

    results, outcomes = [], []
    for i in range(n):
        pid = f"{SYNTHETIC_PREFIX}{i + 1:05d}"
        observed = min(event_days[i], censor_days[i])
        event = bool(event_days[i] <= censor_days[i])
        when: list[float] = []  # years before the index date; the first image is on it
        noise: list[float] = []
        for k in range(int(rng.integers(1, 4))):  # drawn in this order since the first version
            when.append(0.0 if k == 0 else float(rng.uniform(0.5, 4)))
            noise.append(float(rng.normal(0, 0.5)))
        if truth.after_event_shift is not None:  # an image after the follow-up ended
            when.append(-(observed + 30) / 365.25)
            noise.append(float(plants.normal(0, 0.5)) + truth.after_event_shift * event)
        for k, (years_before, error) in enumerate(zip(when, noise, strict=True)):
            at_age = age[i] - years_before
            xray_age = 20 + (0.7 + rate_deviation[i]) * at_age + gap[i] + error
            xray_age -= rate_deviation[i] * age[i]  # the deviation shapes the slope, not the level
            results.append(
                {
                    **dict.fromkeys(RESULT_COLUMNS),
                    "patient_id": pid,
                    "patient_sex": "M" if male[i] else "F",
                    "study_date": index_date[i] - dt.timedelta(days=round(365.25 * years_before)),
                    "sop_instance_uid": f"2.25.{truth.seed}{i:06d}{k}",
                    "view_position": "PA",
                    "xray_age": round(xray_age, 2),
                    "chronological_age": round(at_age, 2),
                    "age_gap": round(xray_age - at_age, 2),
                    # as a card with gap_correction (slope -0.3, intercept 20) would report it
                    "corrected_age_gap": round(xray_age - at_age - (20 - 0.3 * at_age), 2),
                    "model_name": "synthetic",
                    "model_version": "1",
                    "weights_sha256": "0" * 64,
                    "state": "delivered",
                }
            )
        outcomes.append(
            {
                "patient_id": pid,
                "index_date": index_date[i],
                "followup_days": round(float(observed), 1),
                "event": int(event),
                "hypertension": int(comorbid["hypertension"][i]),
                "atrial_fibrillation": int(comorbid["atrial_fibrillation"][i]),
                "egfr": round(float(egfr[i]), 1),
                "anaemia": "yes" if anaemia[i] else "no",
            }
        )
    return results, outcomes
