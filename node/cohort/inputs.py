"""A cohort from two tables: the node's results (an export, or its database) and a site's
outcomes keyed by ``patient_id``. One image per patient, the index image; every patient who
cannot be analysed is kept in a list with the reason, never dropped silently.

Outcomes columns: ``patient_id``, ``followup_days``, ``event`` (0/1), optional ``index_date``
(ISO date) and any covariate or comorbidity columns (numbers, or 0/1, yes/no, true/false). Sex
is the results' (DICOM Patient's Sex).

The time origin: with ``index_date``, that date. Follow-up is counted from it, so no image
after it may index (an image taken after the event would let the outcome shape the exposure:
reverse causation), and an image more than ``max_lag_days`` before it is too old to stand for
the patient at the origin (excluded, with the reason). ``age`` is the age at the index date
(the image's chronological age plus the lag). Without ``index_date``, follow-up is from the
index image and ``age`` is the age at it.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from node.results.aging import DAYS_PER_YEAR, MIN_SPAN_DAYS, aging_rate
from node.results.spreadsheet import read_cell
from xrayage.errors import UserError

Index = Literal["first", "last", "nearest"]
Exposure = Literal["corrected_gap", "gap", "aging_rate"]
Correction = Literal["cohort", "card"]
DEFAULT_MAX_LAG_DAYS = 365
OUTCOME_COLUMNS = ("patient_id", "followup_days", "event")
RESULT_NEEDS = ("patient_id", "study_date", "xray_age", "chronological_age", "patient_sex")
FROM_RESULTS = ("age", "sex")  # covariates read from the results, not the outcomes
_TRUE, _FALSE = {"1", "yes", "true", "y"}, {"0", "no", "false", "n"}


class CohortError(UserError, ValueError):
    """Input that cannot be analysed: one line naming the file, row or column."""


@dataclass(frozen=True)
class Outcome:
    line: int  # in the outcomes file, for messages
    patient_id: str
    followup_days: float | None
    event: int | None
    index_date: dt.date | None
    values: dict[str, float | None]  # the covariate and comorbidity columns asked for


@dataclass(frozen=True)
class Image:
    """One result row as the cohort needs it."""

    patient_id: str
    study_date: dt.date | None
    xray_age: float
    chronological_age: float | None
    sex: str | None
    model_name: str
    model_version: str
    weights_sha256: str
    order: str  # tie-break between images of one day: when reported, then the UID
    card_gap: float | None = None  # the results' corrected_age_gap: by the model card

    @property
    def model(self) -> str:
        return f"{self.model_name} {self.model_version} {self.weights_sha256}"


@dataclass
class Cohort:
    """The analysable patients, one row each (columns: patient_id, followup_days, event,
    xray_age, age, sex, and the asked-for outcome columns), and the excluded ones."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (patient_id, reason)
    results_without_outcomes: int = 0
    model: str | None = None
    origin: Literal["index_date", "index image"] = "index image"
    index: Index = "first"
    max_lag_days: int | None = None  # with origin index_date


@dataclass(frozen=True)
class Selection:
    """Which image indexes each patient and who is analysed: ``index`` among the images up to
    the time origin, the age range of the image, follow-up cut at ``horizon_days``, one
    ``model``, and what the exposure needs (``card_gap``, ``aging_rate``)."""

    index: Index = "first"
    age_range: tuple[float, float] = (18.0, 100.0)
    horizon_days: float | None = None
    model: str | None = None
    index_date: bool = False  # the outcomes have index_date: it is the time origin
    max_lag_days: int = DEFAULT_MAX_LAG_DAYS
    needs: frozenset[str] = frozenset()


def _number(text: object, where: str, column: str) -> float | None:
    """A value as a CSV or the database has it (None and "" are missing)."""
    value = str("" if text is None else text).strip().lower()
    if value == "":
        return None
    if value in _TRUE:
        return 1.0
    if value in _FALSE:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise CohortError(f"{where}: {column} {text!r} is not a number, 0/1, yes/no or true/false")
    return number


def _date(text: str | None, where: str, column: str) -> dt.date | None:
    if text is None or text.strip() == "":
        return None
    try:
        return dt.date.fromisoformat(text.strip()[:10])
    except ValueError:
        raise CohortError(f"{where}: {column} {text!r} is not a date (YYYY-MM-DD)") from None


def _rows(path: Path, needs: Sequence[str], what: str) -> tuple[list[str], Iterable[dict]]:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise CohortError(f"{what} file {path}: {e.strerror or e}") from None
    reader = csv.DictReader(handle)
    columns = list(reader.fieldnames or [])
    missing = [c for c in needs if c not in columns]
    if missing:
        handle.close()
        raise CohortError(
            f"{path}: no column {', '.join(missing)} (an {what} table needs {', '.join(needs)})"
        )
    # A results CSV the node wrote marks values a spreadsheet would run (node.results.spreadsheet)
    rows = ({k: read_cell(v) if isinstance(v, str) else v for k, v in r.items()} for r in reader)
    return columns, rows


def read_outcomes(path: Path, wanted: Sequence[str]) -> tuple[list[Outcome], bool]:
    """The outcomes rows, checked; ``wanted``: the covariate and comorbidity columns. Returns
    them and whether the table has ``index_date``."""
    columns, reader = _rows(path, OUTCOME_COLUMNS, "outcomes")
    for name in wanted:
        if name not in columns:
            raise CohortError(
                f"{path}: no column {name!r} (asked for by --adjust or --comorbidities; "
                f"columns: {', '.join(columns)})"
            )
    outcomes: list[Outcome] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        pid = (row["patient_id"] or "").strip()
        where = f"{path} line {line} (patient_id {pid!r})"
        if not pid:
            raise CohortError(f"{path} line {line}: empty patient_id")
        if pid in seen:
            raise CohortError(f"{where}: patient_id also on line {seen[pid]} (one row a patient)")
        seen[pid] = line
        days = _number(row["followup_days"], where, "followup_days")
        if days is not None and days < 0:
            raise CohortError(f"{where}: followup_days {row['followup_days']} is negative")
        event_text = (row["event"] or "").strip()
        if event_text not in ("", "0", "1"):
            raise CohortError(f"{where}: event {row['event']!r} is not 0 or 1")
        outcomes.append(
            Outcome(
                line,
                pid,
                days,
                int(event_text) if event_text else None,
                _date(row.get("index_date"), where, "index_date"),
                {name: _number(row[name], where, name) for name in wanted},
            )
        )
    return outcomes, "index_date" in columns


def image(row: dict[str, Any], where: str) -> Image:
    """An image from a results row (a database row's values or an export's CSV row)."""
    xray_age = _number(row["xray_age"], where, "xray_age")
    if xray_age is None:
        raise CohortError(f"{where}: no xray_age")
    study_date = row["study_date"]
    if not isinstance(study_date, dt.date):
        study_date = _date(study_date, where, "study_date")
    return Image(
        str(row["patient_id"] or ""),
        study_date,
        xray_age,
        _number(row["chronological_age"], where, "chronological_age"),
        (row.get("patient_sex") or "").strip().upper() or None,
        *(str(row.get(k) or "") for k in ("model_name", "model_version", "weights_sha256")),
        f"{row.get('reported_at') or ''} {row.get('sop_instance_uid') or ''}",
        _number(row.get("corrected_age_gap"), where, "corrected_age_gap"),
    )


def read_results_csv(path: Path) -> list[Image]:
    """The rows of a results export (``xrayage results -f csv``)."""
    _, reader = _rows(path, RESULT_NEEDS, "results")
    return [image(row, f"{path} line {line}") for line, row in enumerate(reader, start=2)]


def one_model(images: list[Image], model: str | None) -> tuple[list[Image], str | None]:
    """The images of one model: ``model`` (a name or weights SHA-256 prefix) picks it; results
    of several models without it are ambiguous."""
    if model is not None:
        images = [
            i for i in images if model == i.model_name or i.weights_sha256.startswith(model)
        ]
        if not images:
            raise CohortError(f"--model: no results of a model {model!r}")
    models = sorted({i.model for i in images})
    if len(models) > 1:
        raise CohortError(
            f"results of {len(models)} models ({'; '.join(models)}): choose one with --model"
        )
    return images, (models[0] if models else None)


def _dated(images: list[Image]) -> list[Image]:
    return sorted(
        (i for i in images if i.study_date is not None), key=lambda i: (i.study_date, i.order)
    )


def _index_image(images: list[Image], outcome: Outcome, select: Selection) -> Image | str:
    """The patient's index image, or why there is none."""
    dated = _dated(images)
    if not dated:
        return "no study date on the results"
    if not select.index_date:  # follow-up from the index image itself
        return dated[0] if select.index == "first" else dated[-1]
    origin = outcome.index_date
    if origin is None:
        return "no index_date"
    before = [i for i in dated if i.study_date <= origin]  # type: ignore[operator]
    if not before:
        return "no result on or before index_date"
    recent = [i for i in before if _lag(i, origin) <= select.max_lag_days]
    if not recent:
        return f"no result within {select.max_lag_days} days before index_date"
    return recent[0] if select.index == "first" else recent[-1]


def _lag(image: Image, origin: dt.date) -> int:
    return (origin - image.study_date).days  # type: ignore[operator]


def _rate(images: list[Image], until: dt.date) -> float | None:
    """The X-ray aging rate over the patient's images up to the time origin."""
    points = [(i.study_date, i.xray_age) for i in _dated(images)]
    found = aging_rate((when, age) for when, age in points if when <= until)  # type: ignore[operator,misc]
    return found.rate if found is not None else None


def _reason(chosen: Image, outcome: Outcome, select: Selection, rate: float | None) -> str | None:
    """Why a patient with an index image cannot be analysed, or None."""
    low, high = select.age_range
    if chosen.chronological_age is None:
        return "no chronological age"
    if not low <= chosen.chronological_age <= high:
        return f"age outside the model's range {low:g}-{high:g}"
    if chosen.sex not in ("M", "F"):
        return "sex not M or F"
    if "card_gap" in select.needs and chosen.card_gap is None:
        return "no corrected_age_gap (the model card states no bias correction)"
    if "aging_rate" in select.needs and rate is None:
        return f"no aging rate (fewer than 2 images {MIN_SPAN_DAYS}+ days apart by the origin)"
    return next((f"no {k}" for k, v in outcome.values.items() if v is None), None)


def build_cohort(outcomes: list[Outcome], images: list[Image], select: Selection) -> Cohort:
    """Join outcomes and results, one index image per patient, with each exclusion's reason.
    With ``horizon_days``, follow-up ends there (an event after it is censored)."""
    images, chosen_model = one_model(images, select.model)
    by_patient: dict[str, list[Image]] = defaultdict(list)
    for i in images:
        by_patient[i.patient_id].append(i)
    cohort = Cohort(
        model=chosen_model,
        origin="index_date" if select.index_date else "index image",
        index=select.index,
        max_lag_days=select.max_lag_days if select.index_date else None,
    )
    cohort.results_without_outcomes = len(set(by_patient) - {o.patient_id for o in outcomes})
    for o in outcomes:
        mine = by_patient.get(o.patient_id, [])
        chosen = _index_image(mine, o, select) if mine else "no result"
        if o.followup_days is None or o.event is None:
            cohort.excluded.append((o.patient_id, "no follow-up"))
            continue
        if isinstance(chosen, str):
            cohort.excluded.append((o.patient_id, chosen))
            continue
        origin = o.index_date if select.index_date else chosen.study_date
        assert origin is not None and chosen.study_date is not None
        rate = _rate(mine, origin) if "aging_rate" in select.needs else None
        reason = _reason(chosen, o, select, rate)
        if reason is not None:
            cohort.excluded.append((o.patient_id, reason))
            continue
        assert chosen.chronological_age is not None
        days, event = o.followup_days, o.event
        if select.horizon_days is not None and days > select.horizon_days:
            days, event = select.horizon_days, 0
        lag = _lag(chosen, origin)
        cohort.rows.append(
            {
                "patient_id": o.patient_id,
                "followup_days": days,
                "event": event,
                "xray_age": chosen.xray_age,
                "age": chosen.chronological_age + lag / DAYS_PER_YEAR,  # at the time origin
                "age_at_image": chosen.chronological_age,
                "lag_days": lag,
                "sex": 1.0 if chosen.sex == "M" else 0.0,
                "card_gap": chosen.card_gap,
                "aging_rate": rate,
                **o.values,
            }
        )
    return cohort
