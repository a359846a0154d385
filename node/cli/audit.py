"""``xrayage audit``: query the audit log; ``xrayage audit-purge``: the retention purge."""

from __future__ import annotations

import datetime as dt
import getpass
from typing import Annotated

import typer

from node.cli.support import (
    ConfigOption,
    Format,
    UsageError,
    open_database,
    parse_period,
    print_rows,
    user_errors,
)
from node.config import load_settings
from storage import utcnow
from storage.audit import EVENTS, FIELDS, AuditQuery, as_dict, purge_events, run_query

# The table a terminal can show (the other formats carry every field).
TABLE_COLUMNS = ("at", "event", "outcome", "actor", "patient_id", "detail")
Text = Annotated[str | None, typer.Option()]


@user_errors
def audit(
    since: Annotated[str | None, typer.Option(help="from this UTC date or time")] = None,
    until: Annotated[str | None, typer.Option(help="before this UTC date or time")] = None,
    patient_id: Text = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID")] = None,
    accession: Text = None,
    event: Annotated[str | None, typer.Option(help=f"one of: {', '.join(EVENTS)}")] = None,
    outcome: Annotated[str | None, typer.Option(help="success or failure")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100000)] = 100,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    config: ConfigOption = None,
) -> None:
    """Events of the audit log, newest first. The query itself is logged too."""
    if event is not None and event not in EVENTS:
        raise UsageError(f"--event: {event!r} is not an event; events: {', '.join(EVENTS)}")
    start, end = parse_period(since, until)
    query = AuditQuery(
        since=start,
        until=end,
        patient_id=patient_id,
        study=study,
        accession=accession,
        event=event,
        outcome=outcome,
        limit=limit,
    )
    db = open_database(load_settings(config))
    try:
        with db.session() as s:
            rows = [as_dict(r) for r in run_query(s, query, f"cli:{getpass.getuser()}")]
    finally:
        db.dispose()
    print_rows(rows, FIELDS, format, "events", limit, TABLE_COLUMNS)


@user_errors
def audit_purge(
    older_than_days: Annotated[int, typer.Option(min=1, help="delete events older than this")],
    config: ConfigOption = None,
) -> None:
    """Delete old audit events (retention); the purge itself is logged."""
    db = open_database(load_settings(config))
    try:
        with db.session() as s:
            before = utcnow() - dt.timedelta(days=older_than_days)
            count = purge_events(s, before, f"cli:{getpass.getuser()}")
    finally:
        db.dispose()
    typer.echo(f"deleted {count} audit events older than {before:%Y-%m-%d %H:%M} UTC")
