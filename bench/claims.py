"""Job-queue claims per second with several workers, on PostgreSQL and on SQLite, as JSON.

Fills the node's own schema with ``--jobs`` queued jobs, then starts ``--workers`` processes
that each loop as an inference worker does, without the model: claim up to ``--batch`` jobs
under a lease (``storage.queue.claim_jobs``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
``UPDATE ... RETURNING`` on SQLite), then mark them done in a second transaction. Every job must
be claimed exactly once: the run fails otherwise. PostgreSQL is a throwaway server started here
(127.0.0.1, a free port), so both backends run on the same machine in the same run.

    python bench/claims.py --workers 8 --jobs 20000 --batch 1,8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, insert, select, update

sys.path[0] = str(Path(__file__).resolve().parents[1])

from storage import Database, Instance, InstanceState, Job, JobState  # noqa: E402
from storage.queue import claim_jobs  # noqa: E402
from tests.servers import PostgreSQL, free_port  # noqa: E402

LEASE = dt.timedelta(minutes=5)


def fill(db: Database, jobs: int) -> None:
    db.create_schema()
    with db.session() as s:
        s.execute(
            insert(Instance),
            [
                {"sop_instance_uid": f"1.2.3.{i}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
                 "path": f"/x/{i}", "sha256": "0" * 64, "size": 0, "origin": "push",
                 "state": InstanceState.QUEUED}
                for i in range(jobs)
            ],
        )  # fmt: skip
        ids = s.scalars(select(Instance.id)).all()
        s.execute(insert(Job), [{"instance_id": i, "state": JobState.QUEUED} for i in ids])


def worker(url: str, batch: int, start: mp.synchronize.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    db = Database(url)
    owner = f"bench:{mp.current_process().pid}"
    claimed = 0
    start.wait()
    while True:
        with db.session() as s:
            claimed_now = claim_jobs(s, owner, batch, LEASE, models=["bench"], live="bench")
            ids = [job.id for job in claimed_now]
        if not ids:
            break
        with db.session() as s:
            s.execute(update(Job).where(Job.id.in_(ids)).values(state=JobState.DONE))
        claimed += len(ids)
    db.dispose()
    out.put(claimed)


def run(backend: str, url: str, workers: int, jobs: int, batch: int) -> dict[str, object]:
    db = Database(url)
    fill(db, jobs)
    start, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=worker, args=(url, batch, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every worker connected and waiting
    began = time.perf_counter()
    start.set()
    per_worker = [out.get() for _ in procs]
    seconds = time.perf_counter() - began
    for p in procs:
        p.join()
    with db.session() as s:
        attempts = s.execute(
            select(func.count(), func.max(Job.attempts), func.min(Job.attempts))
        ).one()
        not_done = s.scalar(select(func.count()).where(Job.state != JobState.DONE))
    db.dispose()
    if attempts[1] != 1 or attempts[2] != 1 or not_done or sum(per_worker) != jobs:
        raise SystemExit(f"{backend}: a job was claimed twice or never: {attempts}, {not_done}")
    return {
        "backend": backend, "workers": workers, "batch": batch, "jobs": jobs,
        "seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1),
        "claims_per_s": round(jobs / batch / seconds, 1),
        "per_worker_min": min(per_worker), "per_worker_max": max(per_worker),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--batch", default="1,8", help="jobs per claim, comma-separated")
    args = parser.parse_args()
    results = []
    server = PostgreSQL(free_port())
    server.start()
    try:
        for n, batch in enumerate(int(b) for b in args.batch.split(",")):
            with tempfile.TemporaryDirectory() as folder:
                sqlite = f"sqlite:///{Path(folder) / 'queue.db'}"
                results.append(run("sqlite", sqlite, args.workers, args.jobs, batch))
            pg = server.create_database(f"queue{n}")
            results.append(run("postgresql", pg, args.workers, args.jobs, batch))
    finally:
        server.stop()
    print(json.dumps({"bench": "queue", "cpus": mp.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
