"""The node's results as data: rows of :data:`COLUMNS` (the stored ones and the aging rate),
pseudonymised on request, every export audited; Parquet (CSV, JSON and tables are the CLI's).

Pseudonyms are HMAC-SHA256 of the value under a site's secret key (at least 32 bytes, read from
a file and never written anywhere): the same key gives the same pseudonym, so exports of
different days, and an outcomes table pseudonymised with the same key, still join; without the
key a pseudonym cannot be turned back. Patient IDs and accession numbers become 32 hex
characters, UIDs stay UIDs (``2.25.`` and the first 128 bits of the HMAC, PS3.5 B.2).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from node.config import ConfigError
from node.results import aging
from storage import record_event
from storage.results import RESULT_COLUMNS, ResultRow, ResultsQuery, patient_ages, query_results

# What an export carries: the stored columns, then the patient's X-ray aging rate by that model
# over their images up to the row's (node.results.aging).
COLUMNS = (*RESULT_COLUMNS, *aging.COLUMNS)

MIN_KEY_BYTES = 32
_IDS = ("patient_id", "accession_number")
_UIDS = ("study_instance_uid", "sop_instance_uid")


def read_key(path: Path) -> bytes:
    """The pseudonymisation key in ``path``; a missing or short one is the user's error."""
    try:
        key = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"pseudonymisation key file {path}: {e.strerror or e}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"pseudonymisation key file {path}: {len(key)} bytes, at least {MIN_KEY_BYTES} "
            f"needed (e.g. head -c 32 /dev/urandom > {path})"
        )
    return key


class Pseudonymiser:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def _digest(self, value: str) -> bytes:
        return hmac.new(self.key, value.encode(), hashlib.sha256).digest()

    def identifier(self, value: str) -> str:
        """A patient ID's or accession number's pseudonym: 32 hex digits."""
        return self._digest(value).hex()[:32]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for name in _IDS:
            if out[name] is not None:
                out[name] = self.identifier(out[name])
        for name in _UIDS:
            if out[name] is not None:
                out[name] = f"2.25.{int.from_bytes(self._digest(out[name])[:16], 'big')}"
        return out


def export(session: Session, query: ResultsQuery, actor: str, key: bytes | None) -> list[ResultRow]:
    """The rows of ``query``, pseudonymised with ``key`` if given, and the export audited: who,
    how many rows, and whether they carried patient identifiers (a disclosure) or not."""
    rows = with_aging_rates(session, query_results(session, query))
    if key is not None:
        pseudonymise = Pseudonymiser(key)
        rows = [ResultRow(r.id, pseudonymise(r.values)) for r in rows]
    what = "pseudonymised" if key is not None else "with patient identifiers (disclosure)"
    record_event(session, "export", actor=actor, detail=f"results: {len(rows)} rows {what}")
    return rows


def with_aging_rates(session: Session, rows: list[ResultRow]) -> list[ResultRow]:
    """Each row with the aging rate of its patient by its model, over the images dated on or
    before its own (what was known when it was reported)."""
    series = patient_ages(
        session,
        {(r.values["patient_id"], r.values["weights_sha256"]) for r in rows},
    )
    out = []
    for r in rows:
        v = r.values
        points = series.get((v["patient_id"], v["weights_sha256"]), [])
        rate = (
            aging.aging_rate(p for p in points if p[0] <= v["study_date"])
            if v["study_date"] is not None
            else None
        )
        out.append(ResultRow(r.id, {**v, **(rate.columns() if rate else aging.NO_RATE)}))
    return out


def plain(value: Any) -> Any:
    """A value as text formats carry it: dates and times in ISO 8601, UTC with ``Z``."""
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def as_parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    """Typed columns (dates, UTC times, floats), the same with no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {
        "study_date": pa.date32(),
        "reported_at": pa.timestamp("us", tz="UTC"),
        **{
            name: pa.float64()
            for name in ("xray_age", "chronological_age", "age_gap", "corrected_age_gap")
        },
        "aging_rate": pa.float64(),
        "aging_rate_se": pa.float64(),
        "aging_rate_images": pa.int64(),
        "untrained": pa.bool_(),
    }
    schema = pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), out)
    return out.getvalue()
