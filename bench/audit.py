"""Audit-log query latency with a million events, on SQLite and on PostgreSQL, printed as JSON.

Fills ``audit_events`` (the node's own schema and indexes) with ``--rows`` events spread over
``--patients`` patients, ~170 events per study as the node writes them per image, then times the
queries that ``xrayage audit`` and ``GET /api/audit`` run (``storage.audit.query_events``):

- ``patient``: ``--patient-id X``, newest 100 first (the issue's target: p95 at most 50 ms);
- ``patient+since``: the same within the last 30 days;
- ``event+page``: ``--event received`` three pages deep (keyset paging with ``before_id``).

PostgreSQL is a throwaway server started here (initdb, 127.0.0.1 and a free port only; as the
``postgres`` user when run as root), so both backends run on the same machine in the same run.

    python bench/audit.py --rows 1000000 --queries 300
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import insert
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage import Database
from storage.audit import AuditQuery, query_events
from storage.tables import AuditEvent
from tests.servers import PostgreSQL, free_port

EVENTS = ("association", "received", "queued", "inferred", "reported", "delivered")


def rows(n: int, patients: int, seed: int = 7):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    step = dt.timedelta(days=730) / n
    for i in range(n):
        p = rng.randrange(patients)
        yield {
            "at": start + i * step,
            "event": EVENTS[i % len(EVENTS)],
            "outcome": "success",
            "actor": "MODALITY1",
            "patient_id": f"PID{p:07d}",
            "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{p}.{i // 60}",
            "accession_number": f"ACC{i // 60:09d}",
            "sop_instance_uid": f"1.2.826.0.1.3680043.10.2.{i // 6}",
            "detail": None,
        }


def fill(db: Database, n: int, patients: int) -> float:
    started = time.perf_counter()
    batch: list[dict[str, object]] = []
    with db.engine.begin() as conn:
        for row in rows(n, patients):
            batch.append(row)
            if len(batch) == 20000:
                conn.execute(insert(AuditEvent), batch)
                batch = []
        if batch:
            conn.execute(insert(AuditEvent), batch)
    if db.engine.dialect.name == "postgresql":
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE audit_events")
    else:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


Work = Callable[[Session, random.Random], object]


def timed(db: Database, work: Work, n: int) -> dict[str, float]:
    rng = random.Random(11)
    latencies = []
    for _ in range(n):
        with db.session() as s:
            t = time.perf_counter()
            work(s, rng)
            latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    return {
        "p50_ms": round(statistics.median(latencies), 2),
        "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
        "max_ms": round(latencies[-1], 2),
    }


def measure(db: Database, n_rows: int, patients: int, n_queries: int) -> dict[str, object]:
    db.create_schema()
    fill_s = fill(db, n_rows, patients)
    since = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=700)

    def pid(rng: random.Random) -> str:
        return f"PID{rng.randrange(patients):07d}"

    def three_pages(s: Session, rng: random.Random) -> None:
        before = None
        for _ in range(3):
            page = query_events(s, AuditQuery(event="received", before_id=before))
            before = page[-1].id

    return {
        "fill_s": round(fill_s, 1),
        "patient": timed(
            db, lambda s, r: query_events(s, AuditQuery(patient_id=pid(r))), n_queries
        ),
        "patient+since": timed(
            db, lambda s, r: query_events(s, AuditQuery(patient_id=pid(r), since=since)), n_queries
        ),
        "event+page": timed(db, three_pages, n_queries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    out: dict[str, object] = {"rows": args.rows, "patients": args.patients, "target_p95_ms": 50}
    for backend in args.backends.split(","):
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as folder:
                db = Database.sqlite_in(Path(folder))
                out["sqlite"] = measure(db, args.rows, args.patients, args.queries)
                db.dispose()
        else:
            pg = PostgreSQL(free_port())
            pg.start()
            try:
                db = Database(pg.url)
                out["postgresql"] = measure(db, args.rows, args.patients, args.queries)
                db.dispose()
            finally:
                pg.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
