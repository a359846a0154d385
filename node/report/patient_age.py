"""Chronological age at the time of the study, in years, when the header tells it."""

from __future__ import annotations

import datetime as dt
import re

from pydicom.dataset import Dataset

# PS3.5 6.2 AS: nnnD, nnnW, nnnM or nnnY. A value without its unit ("062") is ambiguous
# (years? months?) and is treated as unknown rather than guessed.
_AS = re.compile(r"^(\d{3})([DWMY])$")
_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def parse_da(value: object) -> dt.date | None:
    """A DA value (PS3.5 6.2) as a date; None when absent or not a date."""
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def is_age_string(value: object) -> bool:
    """Whether ``value`` is a valid AS value (PS3.5 6.2), e.g. ``062Y``."""
    return bool(_AS.match(str(value or "").strip()))


def chronological_age(ds: Dataset) -> float | None:
    """Years, from PatientAge, else from PatientBirthDate and the study (or acquisition) date."""
    m = _AS.match(str(ds.get("PatientAge", "") or "").strip())
    if m:
        return round(int(m.group(1)) * _DAYS[m.group(2)] / 365.25, 2)
    birth = parse_da(ds.get("PatientBirthDate", ""))
    when = next(
        (
            d
            for k in ("StudyDate", "AcquisitionDate", "ContentDate")
            if (d := parse_da(ds.get(k, "")))
        ),
        None,
    )
    if birth is None or when is None or when < birth:
        return None
    return round((when - birth).days / 365.25, 2)
