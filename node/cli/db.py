"""``xrayage db``: the database schema (Alembic migrations, :mod:`storage.schema`)."""

from __future__ import annotations

import typer

from node.cli.support import ConfigOption, user_errors
from node.config import load_settings
from storage import Database
from storage.schema import current, head, upgrade

db_app = typer.Typer(
    help="The node's database schema.", no_args_is_help=True, rich_markup_mode="markdown"
)


def _database(config: ConfigOption) -> Database:
    settings = load_settings(config)
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    return settings.storage.open_database()


@db_app.command("upgrade")
@user_errors
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the schema to this build's revision (run once before scaling out)."""
    db = _database(config)
    try:
        before, after = upgrade(db.engine)
    finally:
        db.dispose()
    if before == after:
        typer.echo(f"database already at revision {after}")
    else:
        typer.echo(f"database upgraded from revision {before or 'none (empty)'} to {after}")


@db_app.command("current")
@user_errors
def db_current(config: ConfigOption = None) -> None:
    """Print the schema revision of the database and the one this build needs."""
    db = _database(config)
    try:
        at = current(db.engine)
    finally:
        db.dispose()
    typer.echo(f"database at {at or 'none'}; this build needs {head()}")
    if at != head():
        raise typer.Exit(1)
