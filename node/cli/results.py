"""``xrayage results``: what the node found, one row per analysed instance, as data."""

from __future__ import annotations

import datetime as dt
import getpass
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from node.cli.support import (
    ConfigOption,
    UsageError,
    open_database,
    parse_period,
    print_rows,
    user_errors,
)
from node.config import load_settings
from node.results import aging
from node.results.export import COLUMNS, as_parquet, export, plain, read_key
from storage import InstanceState
from storage.results import ResultsQuery

# What a person scans in a terminal; CSV, JSON and Parquet carry every column.
TABLE_COLUMNS = (
    "reported_at", "patient_id", "study_date", "view_position", "xray_age",
    "chronological_age", "age_gap", "aging_rate", "model_name", "state",
)  # fmt: skip
PER_PATIENT_COLUMNS = (
    "patient_id", "patient_sex", "model_name", "model_version", "weights_sha256", "images",
    "first_study_date", "study_date", "xray_age", "chronological_age", "age_gap",
    "corrected_age_gap", "untrained", *aging.COLUMNS,
)  # fmt: skip
PER_PATIENT_TABLE = (
    "patient_id", "model_name", "images", "first_study_date", "study_date", "xray_age",
    "age_gap", "aging_rate", "aging_rate_se", "aging_rate_images",
)  # fmt: skip


def per_patient(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per patient and model: the values of the image with the latest study date (its
    aging rate is over all the patient's images up to it), how many of the selected rows are
    theirs, and the first study date among them."""
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for row in rows:  # newest first
        if row["patient_id"]:
            groups.setdefault((row["patient_id"], row["weights_sha256"]), []).append(row)
    out = []
    for mine in groups.values():
        dates = [r["study_date"] for r in mine if r["study_date"] is not None]
        latest = max(mine, key=lambda r: r["study_date"] or dt.date.min)
        newest = {**latest, "images": len(mine), "first_study_date": min(dates, default=None)}
        out.append({c: newest[c] for c in PER_PATIENT_COLUMNS})
    return out


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def parse_state(value: str | None) -> InstanceState | None:
    if value is None:
        return None
    try:
        return InstanceState(value)
    except ValueError:
        known = ", ".join(s.value for s in InstanceState)
        raise UsageError(f"--state: {value!r} is not a state (one of {known})") from None


@user_errors
def results(
    since: Annotated[str | None, typer.Option(help="aged from this UTC date or time")] = None,
    until: Annotated[str | None, typer.Option(help="aged before this UTC date or time")] = None,
    state: Annotated[str | None, typer.Option(help="inferred, reported, delivered, failed")] = None,
    patient_id: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option(help="model name, as in its card")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000_000)] = 1000,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    pseudonymise_key_file: Annotated[
        Path | None,
        typer.Option(help="replace patient IDs, accession numbers and UIDs by a keyed HMAC"),
    ] = None,
    per_patient_rows: Annotated[
        bool,
        typer.Option(
            "--per-patient", help="one row per patient and model, with the X-ray aging rate"
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """The node's results, newest first, in fixed columns; every export is audited. The table
    shows the columns a person scans; CSV, JSON and Parquet carry them all."""
    start, end = parse_period(since, until)
    if per_patient_rows and format == Format.parquet:
        raise UsageError("--per-patient: formats table, csv and json (not parquet)")
    query = ResultsQuery(
        since=start,
        until=end,
        state=parse_state(state),
        patient_id=patient_id,
        model=model,
        limit=limit,
    )
    key = read_key(pseudonymise_key_file) if pseudonymise_key_file is not None else None
    db = open_database(load_settings(config))
    try:
        with db.session() as s:
            rows = [r.values for r in export(s, query, f"cli:{getpass.getuser()}", key)]
    finally:
        db.dispose()
    untrained = sorted({r["model_name"] for r in rows if r["untrained"]})
    if untrained:  # on stderr: the data on stdout stays data
        typer.echo(
            f"warning: {sum(1 for r in rows if r['untrained'])} of these rows are from "
            f"UNTRAINED weights ({', '.join(untrained)}): not age estimates "
            "(column untrained)",
            err=True,
        )
    columns, table, noun = COLUMNS, TABLE_COLUMNS, "results"
    if per_patient_rows:
        rows = per_patient(rows)
        columns, table, noun = PER_PATIENT_COLUMNS, PER_PATIENT_TABLE, "patients"
    if format == Format.parquet:
        sys.stdout.buffer.write(as_parquet(rows))
    else:
        shown = [{k: plain(v) for k, v in row.items()} for row in rows]
        if format == Format.table and not per_patient_rows:  # to the minute: fits a terminal
            shown = [
                {**r, "reported_at": (r["reported_at"] or "")[:16].replace("T", " ")}
                for r in shown
            ]
        print_rows(shown, columns, format, noun, 0 if per_patient_rows else limit, table)
