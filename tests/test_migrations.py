"""The schema is Alembic's: migrations build exactly the tables the code declares, on SQLite and
PostgreSQL; `xrayage db upgrade` applies them; a node refuses a shared schema that is behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, update
from sqlalchemy.exc import DatabaseError

from storage import AuditEvent, Database, record_event
from storage.schema import SchemaError, head
from storage.tables import Base
from tests.servers import PostgreSQL
from tests.test_cli import run


def _differences(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        return list(
            compare_metadata(
                MigrationContext.configure(conn, opts={"include_object": _not_scheduler}),
                Base.metadata,
            )
        )


def _not_scheduler(obj: object, name: str | None, type_: str, *_: object) -> bool:
    return name != "apscheduler_jobs"


def _schema_is_the_models(db: Database) -> None:
    db.create_schema()
    assert _differences(db) == []  # a model change without its migration fails here
    with db.session() as s:
        record_event(s, "node", detail="x")
    with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
        s.execute(update(AuditEvent).values(detail="edited"))
    db.create_schema()  # a second upgrade is a no-op
    db.dispose()


def test_migrations_build_the_declared_schema_on_sqlite(tmp_path: Path) -> None:
    _schema_is_the_models(Database.sqlite_in(tmp_path))


def test_migrations_build_the_declared_schema_on_postgresql(postgresql: PostgreSQL) -> None:
    _schema_is_the_models(Database(postgresql.create_database("schema")))


def test_db_upgrade_is_run_on_purpose_for_postgresql(
    tmp_path: Path, postgresql: PostgreSQL
) -> None:
    url = postgresql.create_database("upgrade")
    config = tmp_path / "xrayage.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "data"}"\ndatabase_url = "{url}"\n')

    refused = run("serve", "--config", str(config), "--role", "deliver")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"xrayage: error: database schema is at revision none, this build needs {head()}: "
        "run `xrayage db upgrade`"
    )
    assert run("db", "current", "--config", str(config)).returncode == 1

    first = run("db", "upgrade", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"database upgraded from revision none (empty) to {head()}"
    again = run("db", "upgrade", "--config", str(config))
    assert again.stdout.strip() == f"database already at revision {head()}"
    current = run("db", "current", "--config", str(config))
    assert current.returncode == 0 and current.stdout.strip() == (
        f"database at {head()}; this build needs {head()}"
    )


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "xrayage.toml"
    config.write_text('[storage]\ndatabase_url = "postgresql+psycopg://nobody@127.0.0.1:1/none"\n')
    out = run("db", "upgrade", "--config", str(config))
    assert out.returncode == 2
    assert out.stderr.startswith("xrayage: error: database: ") and out.stderr.count("\n") == 1


def test_a_database_from_before_migrations_is_refused_clearly(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'xrayage.db'}")
    Base.metadata.create_all(engine)  # what builds before migrations did
    engine.dispose()
    with pytest.raises(SchemaError, match="no migration history"):
        Database.sqlite_in(tmp_path).create_schema()


INSERT_INSTANCES = (
    "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, path, sha256, size, origin, "
    "state, received_at, updated_at) VALUES "
)
DELIVERED = "(1, '1.1', '1.2', 'a', '0', 0, 'push', 'delivered', '2026-11-01', '2026-11-01')"


def _migrated_from(tmp_path: Path, revision: str, *inserts: str) -> Database:
    """A database at ``revision`` holding the rows of ``inserts``, then upgraded to head."""
    from alembic import command
    from sqlalchemy import text

    from storage.schema import _config

    db = Database.sqlite_in(tmp_path)
    cfg = _config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        for insert in inserts:
            conn.execute(text(insert))
    db.create_schema()  # to head
    assert _differences(db) == []
    return db


def test_migration_0004_names_the_model_of_jobs_and_the_kind_of_deliveries(tmp_path: Path) -> None:
    """On a database holding data at 0003: a done job takes its result's model, a queued one
    none; the SC's delivery becomes `sc`, the SR's `sr`."""
    from sqlalchemy import text

    db = _migrated_from(
        tmp_path,
        "0003",
        f"{INSERT_INSTANCES}{DELIVERED}, "
        "(2, '2.1', '1.2', 'b', '0', 0, 'push', 'queued', '2026-11-01', '2026-11-01')",
        "INSERT INTO jobs (id, instance_id, state, attempts, created_at) VALUES "
        "(1, 1, 'done', 1, '2026-11-01'), (2, 2, 'queued', 0, '2026-11-01')",
        "INSERT INTO results (id, instance_id, model_name, model_version, model_sha256, "
        "xray_age, sr_sop_instance_uid, sc_sop_instance_uid, created_at) VALUES "
        "(1, 1, 'm', '1', 'abc', 60.0, '9.1', '9.2', '2026-11-01')",
        "INSERT INTO deliveries (id, instance_id, destination, sop_instance_uid, path, state, "
        "attempts, next_attempt_at) VALUES (1, 1, 'pacs', '9.1', 'sr', 'delivered', 1, "
        "'2026-11-01'), (2, 1, 'pacs', '9.2', 'sc', 'delivered', 1, '2026-11-01')",
    )
    with db.engine.connect() as conn:
        jobs = conn.execute(text("SELECT id, model_sha256 FROM jobs ORDER BY id")).all()
        kinds = conn.execute(text("SELECT sop_instance_uid, kind FROM deliveries ORDER BY id"))
        assert [tuple(r) for r in kinds] == [("9.1", "sr"), ("9.2", "sc")]
    assert [tuple(r) for r in jobs] == [(1, "abc"), (2, None)]
    db.dispose()


def test_migration_0005_marks_the_demo_models_results_untrained(tmp_path: Path) -> None:
    from sqlalchemy import text

    db = _migrated_from(
        tmp_path,
        "0004",
        INSERT_INSTANCES + DELIVERED,
        "INSERT INTO results (id, instance_id, model_name, model_version, model_sha256, "
        "xray_age, created_at) VALUES (1, 1, 'xrayage-untrained-seresnet', '1', 'a', 50.0, "
        "'2026-11-01'), (2, 1, 'riken-senet154', '1', 'b', 60.0, '2026-11-01')",
    )
    with db.engine.connect() as conn:
        marked = conn.execute(text("SELECT id, untrained FROM results ORDER BY id")).all()
    assert [(i, bool(u)) for i, u in marked] == [(1, True), (2, False)]
    db.dispose()


def test_migration_0006_keeps_jobs_and_results_and_the_next_start_registers_the_live_model(
    tmp_path: Path, weights: Path
) -> None:
    """On a database holding data at 0005: jobs keep their state at priority 0, and the first
    start registers ``[model] weights`` as the live model, which counts the results of these
    weights and takes the job queued while no model was configured."""
    from sqlalchemy import text

    from ai.presets import model_card
    from node.config import ModelSection
    from node.infer.registry import live_card
    from storage.models import images_seen, live_model

    sha = model_card(weights).sha256
    db = _migrated_from(
        tmp_path,
        "0005",
        f"{INSERT_INSTANCES}{DELIVERED}, "
        "(2, '2.1', '1.2', 'b', '0', 0, 'push', 'queued', '2026-11-01', '2026-11-01')",
        "INSERT INTO jobs (id, instance_id, state, model_sha256, attempts, created_at) VALUES "
        f"(1, 1, 'done', '{sha}', 1, '2026-11-01'), (2, 2, 'queued', NULL, 0, '2026-11-01')",
        "INSERT INTO results (id, instance_id, model_name, model_version, model_sha256, "
        f"xray_age, untrained, created_at) VALUES (1, 1, 'm', '1', '{sha}', 60.0, 0, "
        "'2026-11-01')",
    )
    with db.engine.connect() as conn:
        jobs = conn.execute(text("SELECT id, state, priority FROM jobs ORDER BY id")).all()
        assert conn.execute(text("SELECT count(*) FROM models")).scalar() == 0
    assert [tuple(r) for r in jobs] == [(1, "done", 0), (2, "queued", 0)]
    card = live_card(db, ModelSection(weights=str(weights)))
    assert card is not None and card.sha256 == sha
    with db.session() as s:
        assert live_model(s).sha256 == sha  # type: ignore[union-attr]
        assert images_seen(s) == {sha: 1}
        # registering it handed the queued job over (storage.queue.adopt_jobs)
        assert s.execute(text("SELECT model_sha256 FROM jobs WHERE id = 2")).scalar() == sha
    db.dispose()
