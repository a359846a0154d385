"""Synthetic cohorts with planted effects, for the demo (``xrayage cohort --demo``) and the
tests: every patient ID starts with ``SYNTHETIC-`` and every report drawn from them says so.

Each patient has one to three chest images over the years before an index date; the model's
X-ray age regresses to the mean (``20 + 0.7 × age``, as age models do) plus the patient's true
gap: comorbidity shifts and noise. Time to event is exponential, its log-hazard linear in the
true gap, age, sex, eGFR and anaemia; follow-up is censored uniformly.
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
    log_hazard = (
        math.log(truth.hr_per_year) * gap
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
        for k in range(int(rng.integers(1, 4))):  # the last image is on the index date
            years_before = 0 if k == 0 else float(rng.uniform(0.5, 4))
            at_age = age[i] - years_before
            xray_age = 20 + 0.7 * at_age + gap[i] + rng.normal(0, 0.5)
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
                    "model_name": "synthetic",
                    "model_version": "1",
                    "weights_sha256": "0" * 64,
                    "state": "delivered",
                }
            )
        observed = min(event_days[i], censor_days[i])
        outcomes.append(
            {
                "patient_id": pid,
                "index_date": index_date[i],
                "followup_days": round(float(observed), 1),
                "event": int(event_days[i] <= censor_days[i]),
                "hypertension": int(comorbid["hypertension"][i]),
                "atrial_fibrillation": int(comorbid["atrial_fibrillation"][i]),
                "egfr": round(float(egfr[i]), 1),
                "anaemia": "yes" if anaemia[i] else "no",
            }
        )
    return results, outcomes
