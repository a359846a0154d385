"""The paper's analyses (Ieki et al. 2022, Figs. 2 and 3) on a site's cohort, by lifelines and
statsmodels: the age gap and its bias correction, the gap's difference by comorbidity, Kaplan-
Meier curves by gap group with the log-rank test, and Cox proportional-hazards models with their
assumption checked and the gap's added value (C-index, likelihood-ratio test).

The result is ``cohort.json`` as a dict; its key names are documented (README "Cohort
analysis") and scripts rely on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from node.cohort.inputs import Cohort, CohortError, Correction, Exposure
from node.cohort.synthetic import SYNTHETIC_PREFIX
from node.results.aging import MIN_SPAN_DAYS

Grouping = Literal["gap-sign", "tertiles"]
MIN_EVENTS = 10
PH_ALPHA = 0.05


@dataclass(frozen=True)
class Plan:
    """What to fit: the exposure, the Cox model's adjustments, the comorbidity columns, the
    Kaplan-Meier grouping and which bias correction makes the corrected gap (``cohort``: the
    residual of X-ray age on age in this cohort, as the paper; ``card``: the model card's, as
    the SR reports it)."""

    exposure: Exposure = "corrected_gap"
    adjust: Sequence[str] = ("age", "sex")
    comorbidities: Sequence[str] = ()
    groups: Grouping = "gap-sign"
    correction: Correction = "cohort"

    @property
    def gap(self) -> Literal["corrected_gap", "gap"]:
        """The gap the comorbidity model and ``cox.gap`` use."""
        return "gap" if self.exposure == "gap" else "corrected_gap"


@dataclass
class Analysis:
    """``summary``: cohort.json; ``km``: one fitted Kaplan-Meier estimator per group, for the
    plot."""

    summary: dict[str, Any]
    km: list[Any] = field(default_factory=list)


def _ci(low: float, high: float) -> list[float]:
    return [float(low), float(high)]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _check(frame: pd.DataFrame, plan: Plan) -> None:
    events = int(frame["event"].sum())
    if events < MIN_EVENTS:
        raise CohortError(
            f"only {events} events among {len(frame)} analysable patients: at least "
            f"{MIN_EVENTS} are needed to fit (refused)"
        )
    for name in (*plan.adjust, *plan.comorbidities):
        if frame[name].nunique() < 2:
            option = "--adjust" if name in plan.adjust else "--comorbidities"
            raise CohortError(
                f"{option}: column {name!r} is constant ({frame[name].iloc[0]:g} for all "
                f"{len(frame)} analysable patients): it cannot be estimated"
            )


def _groups(value: pd.Series, grouping: Grouping, rate: bool) -> tuple[pd.Series, list[str]]:
    if grouping == "gap-sign":  # a rate's threshold: ageing in step with the calendar
        names = ["rate <= 1", "rate > 1"] if rate else ["gap <= 0", "gap > 0"]
        return value.gt(1 if rate else 0).map({False: names[0], True: names[1]}), names
    gap = value
    low, high = np.quantile(gap, [1 / 3, 2 / 3])
    names = [f"low (< {low:.1f})", f"middle ({low:.1f} to {high:.1f})", f"high (> {high:.1f})"]
    return pd.Series(
        np.select([gap < low, gap <= high], names[:2], names[2]), index=gap.index
    ), names


def _cox(frame: pd.DataFrame, terms: Sequence[str]) -> Any:
    from lifelines import CoxPHFitter

    return CoxPHFitter().fit(
        frame[["followup_days", "event", *terms]], duration_col="followup_days", event_col="event"
    )


def _term(fit: Any, name: str, scale: float = 1.0) -> dict[str, Any]:
    row = fit.summary.loc[name]
    return {
        "hr": math.exp(scale * row["coef"]),
        "ci95": _ci(
            math.exp(scale * row["coef lower 95%"]), math.exp(scale * row["coef upper 95%"])
        ),
        "p": float(row["p"]),
    }


def _gap_effect(fit: Any, name: str) -> dict[str, Any]:
    year, five = _term(fit, name), _term(fit, name, 5.0)
    return {
        "hr_per_year": year["hr"],
        "ci95": year["ci95"],
        "p": year["p"],
        "hr_per_5_years": five["hr"],
        "ci95_per_5_years": five["ci95"],
    }


def _rate_effect(fit: Any) -> dict[str, Any]:
    rate = _term(fit, "aging_rate")
    return {"hr_per_unit": rate["hr"], "ci95": rate["ci95"], "p": rate["p"]}


def _definition(plan: Plan, intercept: float, slope: float) -> str:
    """The exposure as the code computes it, for the report."""
    if plan.exposure == "gap":
        return "gap = X-ray age - chronological age at the image"
    if plan.exposure == "aging_rate":
        return (
            "aging_rate = the least-squares slope of X-ray age on study date (years of X-ray "
            "age per calendar year) over the patient's images up to the time origin, from at "
            f"least 2 images {MIN_SPAN_DAYS} or more days apart"
        )
    if plan.correction == "card":
        return (
            "corrected_gap = the results' corrected_age_gap: X-ray age - age at the image - "
            "(slope x age + intercept) with the model card's gap correction, as the SR reports it"
        )
    return (
        f"corrected_gap = X-ray age - ({intercept:.3f} + {slope:.3f} x age at the image), "
        "the residual of X-ray age regressed on age at the image in this cohort"
    )


def _comorbidities(frame: pd.DataFrame, plan: Plan) -> dict[str, Any]:
    """One linear model of the gap on all comorbidities, adjusted for age and sex (Fig. 2)."""
    if not plan.comorbidities:
        return {}
    import statsmodels.api as sm

    # Age at the image, the gap's own: then the raw and corrected gaps, which differ by a
    # linear function of that age, give the same differences.
    terms = list(dict.fromkeys([*plan.comorbidities, "age_at_image", "sex"]))
    fit = sm.OLS(frame[plan.gap], sm.add_constant(frame[terms])).fit()
    ci = fit.conf_int()
    return {
        name: {
            "estimate_years": float(fit.params[name]),
            "ci95": _ci(ci.loc[name, 0], ci.loc[name, 1]),
            "p": float(fit.pvalues[name]),
        }
        for name in plan.comorbidities
    }


def analyse(cohort: Cohort, plan: Plan) -> Analysis:
    """Fit everything; a cohort too small or a covariate that cannot be estimated is refused."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test, proportional_hazard_test

    frame = pd.DataFrame(cohort.rows)
    if frame.empty:
        raise CohortError("no analysable patients (see the exclusions)")
    _check(frame, plan)
    # The cohort's own bias correction: the residual of X-ray age on chronological age, so that
    # the gap does not simply track age (regression to the mean of any age model).
    slope, intercept = np.polyfit(frame["age_at_image"], frame["xray_age"], 1)
    frame["gap"] = frame["xray_age"] - frame["age_at_image"]
    frame["corrected_gap"] = (
        frame["xray_age"] - (intercept + slope * frame["age_at_image"])
        if plan.correction == "cohort"
        else frame["card_gap"].astype(float)
    )
    frame["group"], names = _groups(
        frame[plan.exposure], plan.groups, rate=plan.exposure == "aging_rate"
    )
    warnings: list[str] = []

    adjust = list(plan.adjust)
    with_gap = _cox(frame, [plan.exposure, *adjust])
    gaps = {}
    for name in ("gap", "corrected_gap"):
        fit = with_gap if name == plan.exposure else _cox(frame, [name, *adjust])
        gaps[name] = {
            "mean": float(frame[name].mean()),
            "sd": float(frame[name].std()),
            **_gap_effect(fit, name),
        }
    cox: dict[str, Any] = {"adjusted_for": adjust, "gap": gaps[plan.gap]}
    if plan.exposure == "aging_rate":  # and beyond a single X-ray age: with the gap as well
        beyond = _cox(frame, ["aging_rate", "corrected_gap", *adjust])
        cox["aging_rate"] = {
            **_rate_effect(with_gap),
            "mean": float(frame["aging_rate"].mean()),
            "sd": float(frame["aging_rate"].std()),
            "adjusted_for_corrected_gap": _rate_effect(beyond),
        }
    cox["covariates"] = {name: _term(with_gap, name) for name in adjust}
    if adjust:
        without_gap = _cox(frame, adjust)
        c_without = float(without_gap.concordance_index_)
        lr = 2 * (with_gap.log_likelihood_ - without_gap.log_likelihood_)
        from scipy.stats import chi2

        lr_p = float(chi2.sf(lr, 1))
    else:  # no adjustment: the model without the gap is the null model
        c_without = 0.5
        lr_p = float(with_gap.log_likelihood_ratio_test().p_value)
    ph = proportional_hazard_test(
        with_gap, frame[["followup_days", "event", plan.exposure, *adjust]], time_transform="rank"
    )
    ph_p = {str(term): float(p) for term, p in ph.summary["p"].items()}
    for term, p in ph_p.items():
        if p < PH_ALPHA:
            warnings.append(
                f"proportional hazards: Schoenfeld residual test p = {p:.3g} for {term}; its "
                "hazard ratio is an average over follow-up (consider --horizon-days or strata)"
            )
    events = int(frame["event"].sum())
    if events / (1 + len(adjust)) < 10:
        warnings.append(
            f"{events} events for {1 + len(adjust)} Cox terms: fewer than 10 per term, the "
            "estimates may be unstable"
        )

    km, groups = [], {}
    for name in names:
        part = frame[frame["group"] == name]
        if part.empty:
            continue
        fitter = KaplanMeierFitter(label=name).fit(part["followup_days"], part["event"])
        km.append(fitter)
        groups[name] = {
            "n": len(part),
            "events": int(part["event"].sum()),
            "median_days": _finite(fitter.median_survival_time_),
        }
    logrank = multivariate_logrank_test(frame["followup_days"], frame["group"], frame["event"])

    excluded: dict[str, int] = {}
    for _, reason in cohort.excluded:
        excluded[reason] = excluded.get(reason, 0) + 1
    lags = frame["lag_days"]
    summary = {
        "synthetic": bool(frame["patient_id"].str.startswith(SYNTHETIC_PREFIX).all()),
        "model": cohort.model,
        "n_patients": len(frame),
        "n_events": events,
        "excluded": excluded,
        "results_without_outcomes": cohort.results_without_outcomes,
        "time_origin": {
            "origin": cohort.origin,
            "index": cohort.index,
            "max_lag_days": cohort.max_lag_days,
            "lag_days": {
                "median": float(lags.median()),
                "q1": float(lags.quantile(0.25)),
                "q3": float(lags.quantile(0.75)),
                "max": float(lags.max()),
            },
        },
        "exposure": plan.exposure,
        "exposure_definition": _definition(plan, float(intercept), float(slope)),
        "correction": plan.correction,
        "bias_correction": {"intercept": float(intercept), "slope": float(slope)},
        "gaps": gaps,
        "cox": cox,
        "ph_test": ph_p,
        "c_index": {"without_gap": c_without, "with_gap": float(with_gap.concordance_index_)},
        "lr_test_p": lr_p,
        "logrank_p": float(logrank.p_value),
        "km": {"grouping": plan.groups, "groups": groups},
        "comorbidities": _comorbidities(frame, plan),
        "warnings": warnings,
    }
    return Analysis(summary, km)
