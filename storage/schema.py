"""The database schema, managed by Alembic migrations (``storage/migrations``).

SQLite, the embedded default, is upgraded when the node starts: it has one user. PostgreSQL is
shared by several processes, so it is upgraded once, on purpose, with ``xrayage db upgrade``;
a node started against an out-of-date PostgreSQL schema refuses with :class:`SchemaError`
rather than racing other processes to migrate it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from xrayage.errors import UserError

_MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaError(UserError, RuntimeError):
    pass


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


@functools.cache  # the migration files do not change while the process runs
def head() -> str:
    """The revision this build's tables need."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at; None for a database no migration has touched."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply the missing migrations in one transaction; returns (from, to) revisions."""
    before = current(engine)
    if before is None and _has_tables(engine):
        raise SchemaError(
            "the database has tables but no migration history (made by a build before "
            "migrations): export what you need with `xrayage audit`, then start from an empty "
            "database"
        )
    with engine.begin() as conn:
        cfg = _config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, head()


def check(engine: Engine) -> None:
    """Raise :class:`SchemaError` unless the database is at this build's revision."""
    at, need = current(engine), head()
    if at != need:
        raise SchemaError(
            f"database schema is at revision {at or 'none'}, this build needs {need}: "
            "run `xrayage db upgrade`"
        )


def _has_tables(engine: Engine) -> bool:
    return bool(set(inspect(engine).get_table_names()) - {"apscheduler_jobs"})
