"""``xrayage retry``: list failed deliveries, and queue them again once the cause is fixed."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.cli.support import ConfigOption, UsageError, open_database, user_errors
from node.config import load_settings
from storage import Delivery
from storage.deliveries import failed_deliveries, retry_deliveries


@user_errors
def retry(
    ids: Annotated[list[int] | None, typer.Argument(help="delivery IDs to queue again")] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="queue every failed delivery again")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Queue failed deliveries again; with no ID and no --all-failed, list them."""
    if ids and all_failed:
        raise UsageError("give delivery IDs or --all-failed, not both")
    db = open_database(load_settings(config))
    try:
        with db.session() as s:
            if not ids and not all_failed:
                _show(failed_deliveries(s))
                return
            actor = f"cli:{getpass.getuser()}"
            queued = retry_deliveries(s, None if all_failed else ids, actor)
            typer.echo(
                f"queued {len(queued)} deliveries again; a running node sends them within seconds"
            )
    finally:
        db.dispose()


def _show(rows: list[Delivery]) -> None:
    if not rows:
        typer.echo("no failed deliveries")
        return
    table = Table("ID", "destination", "kind", "object", "attempts", "last error", box=None)
    for d in rows:
        table.add_row(
            str(d.id), d.destination, d.kind.value, d.sop_instance_uid, str(d.attempts),
            d.last_error,
        )  # fmt: skip
    Console(width=200).print(table)
    typer.echo("queue again with: xrayage retry ID... | --all-failed")
