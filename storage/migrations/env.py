"""Alembic environment: runs on the connection that :mod:`storage.schema` hands over, so the
node's own URL, pragmas and timeouts apply; no ``alembic.ini`` is needed."""

from __future__ import annotations

from alembic import context

from storage.tables import Base


def _ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    # APScheduler keeps its job store in the same database and manages that table itself.
    return not (type_ == "table" and reflected and compare_to is None)


context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=Base.metadata,
    include_object=_ours,
    render_as_batch=True,  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
