"""The audit log: append-only, queried by ``xrayage audit`` with each filter and format, purged
only by the logged retention purge, and recording config and model changes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DatabaseError

from ai import ModelCard
from node.audit.changes import record_changes
from node.config import load_settings
from storage import AuditEvent, Database, Instance, InstanceState, record_event
from storage.audit import AuditQuery, query_events
from tests.servers import PostgreSQL
from tests.test_cli import run


def _instance(n: int, patient: str, accession: str) -> Instance:
    return Instance(
        sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=f"1.2.3.9{n}", patient_id=patient, accession_number=accession,
        path="-", sha256="-", size=0, state=InstanceState.RECEIVED,
    )  # fmt: skip


@pytest.fixture
def logged(tmp_path: Path) -> Path:
    """A node's data folder whose audit log holds events of two patients, one a year old."""
    db = Database.sqlite_in(tmp_path / "data")
    db.create_schema()
    with db.session() as s:
        a, b = _instance(1, "PAT-A", "ACC-1"), _instance(2, "PAT-B", "ACC-2")
        s.add_all([a, b])
        s.flush()
        record_event(s, "received", actor="MODALITY", instance=a)
        record_event(s, "skipped", instance=a, detail="not a chest")
        record_event(s, "received", actor="MODALITY", instance=b)
        record_event(s, "failed", outcome="failure", instance=b, detail="truncated")
        old = record_event(s, "received", actor="MODALITY", instance=b)
        old.at = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    db.dispose()
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n')
    return config


def _json(config: Path, *args: str) -> list[dict[str, object]]:
    out = run("audit", "-f", "json", "-c", str(config), *args)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_each_filter_narrows_the_query(logged: Path) -> None:
    assert [e["event"] for e in _json(logged, "--patient-id", "PAT-A")] == ["skipped", "received"]
    assert {e["patient_id"] for e in _json(logged, "--accession", "ACC-2")} == {"PAT-B"}
    assert [e["detail"] for e in _json(logged, "--outcome", "failure")] == ["truncated"]
    assert len(_json(logged, "--study", "1.2.3.92", "--event", "received")) == 2
    assert len(_json(logged, "--study", "1.2.3.92", "--since", "2026-01-01")) == 2
    assert [e["at"] for e in _json(logged, "--patient-id", "PAT-B", "--until", "2025-06-01")] == [
        "2025-01-01T00:00:00Z"
    ]


def test_csv_and_table_and_the_query_itself_is_logged(logged: Path) -> None:
    out = run("audit", "--patient-id", "PAT-A", "-f", "csv", "-c", str(logged))
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["event"] for r in rows] == ["skipped", "received"] and rows[0][
        "patient_id"
    ] == "PAT-A"
    table = run("audit", "--event", "failed", "-c", str(logged)).stdout
    assert "truncated" in table and "1 events" in table
    queries = _json(logged, "--event", "audit-query")
    assert queries[0]["actor"].startswith("cli:")  # type: ignore[union-attr]
    assert "patient_id=PAT-A" in str(queries[-1]["detail"])


def test_rows_cannot_be_updated_and_the_purge_is_logged(logged: Path) -> None:
    db = Database.sqlite_in(logged.parent / "data")
    with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
        s.execute(update(AuditEvent).values(detail="edited"))
    with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
        s.execute(text("UPDATE audit_events SET patient_id = 'X'"))
    out = run("audit-purge", "--older-than-days", "180", "-c", str(logged))
    assert out.stdout.startswith("deleted 1 audit events older than"), out.stderr
    with db.session() as s:
        purges = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "audit-purge")))
        assert len(purges) == 1 and purges[0].detail.startswith("deleted 1 audit events")  # type: ignore[union-attr]
        assert (
            s.scalar(
                select(AuditEvent).where(AuditEvent.at < dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
            )
            is None
        )
    db.dispose()


def test_config_and_model_changes_are_audited(tmp_path: Path) -> None:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    one = ModelCard(name="m", version="1", sha256="a" * 64)
    two = ModelCard(name="m", version="2", sha256="b" * 64)
    settings = load_settings(None, storage={"path": tmp_path})
    assert record_changes(db, settings, one) == []  # first start
    assert record_changes(db, settings, one) == []  # nothing changed
    web = {"name": "web", "stow_url": "http://x", "username": "u", "password": "dicomweb-pass"}
    changed = load_settings(None, storage={"path": tmp_path}, delivery={"max_attempts": 3},
                            http={"tokens": {"ward": "a-long-enough-secret"}},
                            destinations=[web])  # fmt: skip
    assert record_changes(db, changed, two) == [
        "delivery.max_attempts", "destinations", "http.tokens.ward", "loaded_model.sha256",
        "loaded_model.version",
    ]  # fmt: skip
    with db.session() as s:
        events = {e.event: e.detail for e in s.scalars(select(AuditEvent))}
        stored = s.scalar(
            text("SELECT settings_json FROM config_versions ORDER BY id DESC LIMIT 1")
        )
    assert events["config"] == (
        "settings changed: delivery.max_attempts, destinations, http.tokens.ward"
    )
    assert "-> m 2 (sha256 " + "b" * 64 in events["model"]  # type: ignore[operator]
    assert "a-long-enough-secret" not in stored and "dicomweb-pass" not in stored
    db.dispose()


def test_on_postgresql_the_log_is_append_only_and_queried_alike(postgresql: PostgreSQL) -> None:
    db = Database(postgresql.create_database("audit"))
    db.create_schema()
    with db.session() as s:
        inst = _instance(1, "PAT-A", "ACC-1")
        s.add(inst)
        s.flush()
        record_event(s, "received", instance=inst)
        record_event(s, "reported", instance=inst)
    with db.session() as s:
        found = query_events(s, AuditQuery(patient_id="PAT-A", limit=1))
        assert [e.event for e in found] == ["reported"]
        assert [
            e.event for e in query_events(s, AuditQuery(accession="ACC-1", before_id=found[0].id))
        ] == ["received"]
    with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
        s.execute(update(AuditEvent).values(detail="edited"))
    db.dispose()
