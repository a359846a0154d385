"""Engine and sessions: SQLite (WAL) under the data folder by default, or any SQLAlchemy URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage import schema
from xrayage.errors import UserError


def _sqlite_pragmas(dbapi_connection, busy_ms: int) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_connection.cursor()
    # WAL lets the SCP threads insert while the worker reads; FULL sync makes a commit durable
    # before the C-STORE response goes back (ARCHITECTURE.md: durable before Success).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    # How long a write waits for another writer; then it fails, and a C-STORE answers 0xA700.
    cur.execute(f"PRAGMA busy_timeout={busy_ms}")
    cur.close()


class DatabaseUnavailable(UserError):
    """The database cannot be opened or reached; the message names it (password hidden)."""


class Database:
    """Owns the engine; ``session()`` gives a transaction that commits on success."""

    def __init__(self, url: str, timeout_seconds: float = 30.0) -> None:
        self.url = url
        kwargs: dict[str, object] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": timeout_seconds, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            busy_ms = int(timeout_seconds * 1000)
            event.listen(
                self.engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, busy_ms)
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def sqlite_in(cls, folder: Path) -> Database:
        folder.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{folder / 'xrayage.db'}")

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def create_schema(self) -> None:
        """Bring the schema to this build's revision (Alembic; see :mod:`storage.schema`)."""
        schema.upgrade(self.engine)

    def prepare_schema(self) -> None:
        """What a starting node does: upgrade the embedded SQLite database, and only check a
        shared one (PostgreSQL is upgraded on purpose, with ``xrayage db upgrade``)."""
        try:
            if self.is_sqlite:
                schema.upgrade(self.engine)
            else:
                schema.check(self.engine)
        except OperationalError as e:  # the first connection: say which database
            where = self.engine.url.render_as_string(hide_password=True)
            reason = str(e.orig).strip().splitlines()[0]
            raise DatabaseUnavailable(f"database {where}: {reason}") from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
