"""``xrayage results``: what the node found, one row per analysed instance, as data."""

from __future__ import annotations

import getpass
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from node.cli.support import (
    ConfigOption,
    UsageError,
    open_database,
    parse_time,
    print_rows,
    user_errors,
)
from node.config import load_settings
from node.results.export import as_parquet, export, plain, read_key
from storage import InstanceState
from storage.results import RESULT_COLUMNS, ResultsQuery


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
    config: ConfigOption = None,
) -> None:
    """The node's results, newest first, in fixed columns; every export is audited."""
    query = ResultsQuery(
        since=parse_time(since, "--since"),
        until=parse_time(until, "--until"),
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
    if format == Format.parquet:
        sys.stdout.buffer.write(as_parquet(rows))
    else:
        shown = [{k: plain(v) for k, v in row.items()} for row in rows]
        print_rows(shown, RESULT_COLUMNS, format, "results", limit)
