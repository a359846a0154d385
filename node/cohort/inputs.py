"""A cohort from two tables: the node's results (an export, or its database) and a site's
outcomes keyed by ``patient_id``. One image per patient, the index image; every patient who
cannot be analysed is kept in a list with the reason, never dropped silently.

Outcomes columns: ``patient_id``, ``followup_days``, ``event`` (0/1), optional ``index_date``
(ISO date) and any covariate or comorbidity columns (numbers, or 0/1, yes/no, true/false). Age
and sex are the results' (chronological age at the image, DICOM Patient's Sex).
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

from node.results.spreadsheet import read_cell
from xrayage.errors import UserError

Index = Literal["first", "last", "nearest"]
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


def _index_image(images: list[Image], index: Index, outcome: Outcome) -> Image | str:
    """The patient's index image, or why there is none."""
    dated = sorted(
        (i for i in images if i.study_date is not None), key=lambda i: (i.study_date, i.order)
    )
    if not dated:
        return "no study date on the results"
    if index == "first":
        return dated[0]
    if index == "last":
        return dated[-1]
    if outcome.index_date is None:
        return "no index_date"
    before = [i for i in dated if i.study_date <= outcome.index_date]  # type: ignore[operator]
    return before[-1] if before else "no result on or before index_date"


def build_cohort(
    outcomes: list[Outcome],
    images: list[Image],
    index: Index,
    age_range: tuple[float, float],
    horizon_days: float | None,
    model: str | None = None,
) -> Cohort:
    """Join outcomes and results, one index image per patient, with each exclusion's reason.
    With ``horizon_days``, follow-up ends there (an event after it is censored)."""
    images, chosen_model = one_model(images, model)
    by_patient: dict[str, list[Image]] = defaultdict(list)
    for i in images:
        by_patient[i.patient_id].append(i)
    cohort = Cohort(model=chosen_model)
    cohort.results_without_outcomes = len(set(by_patient) - {o.patient_id for o in outcomes})
    low, high = age_range
    for o in outcomes:
        chosen = (
            _index_image(by_patient[o.patient_id], index, o)
            if o.patient_id in by_patient
            else "no result"
        )
        reason: str | None = None
        if o.followup_days is None or o.event is None:
            reason = "no follow-up"
        elif isinstance(chosen, str):
            reason = chosen
        elif chosen.chronological_age is None:
            reason = "no chronological age"
        elif not low <= chosen.chronological_age <= high:
            reason = f"age outside the model's range {low:g}-{high:g}"
        elif chosen.sex not in ("M", "F"):
            reason = "sex not M or F"
        else:
            reason = next((f"no {k}" for k, v in o.values.items() if v is None), None)
        if reason is not None:
            cohort.excluded.append((o.patient_id, reason))
            continue
        assert not isinstance(chosen, str) and o.followup_days is not None and o.event is not None
        days, event = o.followup_days, o.event
        if horizon_days is not None and days > horizon_days:
            days, event = horizon_days, 0
        cohort.rows.append(
            {
                "patient_id": o.patient_id,
                "followup_days": days,
                "event": event,
                "xray_age": chosen.xray_age,
                "age": chosen.chronological_age,
                "sex": 1.0 if chosen.sex == "M" else 0.0,
                **o.values,
            }
        )
    return cohort
