"""Scheduled work (APScheduler): the nightly retro-scan and the audit log's retention purge.

The jobs live in the node's database (APScheduler's SQLAlchemyJobStore, table
``apscheduler_jobs``), so their next run time survives a restart. A run missed while the node
was down runs once when it is back (runs are coalesced), provided that is within the job's grace
time: for the retro-scan, the length of its window, so a node back after ``window_end`` waits
for the next night. A run that started is not started again: APScheduler stores the next run
time before it runs the job, and an interrupted scan resumes from its cursor the next night.
A changed schedule replaces the stored one, and the change is audited.

Scheduling runs once per deployment: on PostgreSQL in the process that holds the scheduler's
advisory lock (storage/locks.py); another says so and waits for it. SQLite has one ``serve``
per data folder anyway.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from storage import Database, record_event
from storage.locks import (
    cancel_wait,
    release_scheduler_lock,
    try_scheduler_lock,
    wait_scheduler_lock,
)

log = logging.getLogger("xrayage.schedule")

# Stored jobs name their function as text, so they call this module's runner, which finds the
# work registered under the job's ID by the (single) scheduler of this process.
_work: dict[str, Callable[[], object]] = {}


def _run(job_id: str) -> None:
    try:
        _work[job_id]()
    except Exception:
        log.exception("scheduled %s failed", job_id)


@dataclass(frozen=True)
class ScheduledJob:
    job_id: str
    crontab: str
    grace_seconds: int
    work: Callable[[], object]
    interrupt: Callable[[], None] = lambda: None  # ends a running ``work`` early, resumably


class Scheduler:
    """The component of the ``schedule`` role; ``on_lead`` runs when this process starts
    scheduling (it records config changes once per deployment)."""

    def __init__(
        self, db: Database, jobs: list[ScheduledJob], on_lead: Callable[[], None] = lambda: None
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.on_lead = on_lead
        self.scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=db.engine)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        self._lock: Connection | None = None  # holds the scheduler's lock on PostgreSQL
        self._stopping = threading.Event()
        self._leading = False
        # Taking the lead and stopping never cross: a stop during a start waits for it.
        self._state = threading.Lock()

    def start(self) -> None:
        if self.db.engine.dialect.name == "postgresql":
            self._lock = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if not try_scheduler_lock(self._lock):
                log.warning(
                    "another process schedules for this database (retro-scans, audit purge, "
                    "config changes): this one waits until it stops"
                )
                threading.Thread(
                    target=self._lead_when_locked, name="xrayage-schedule-lock", daemon=True
                ).start()
                return
        with self._state:
            self._lead()

    def _lead_when_locked(self) -> None:
        assert self._lock is not None
        try:
            wait_scheduler_lock(self._lock)
        except SQLAlchemyError:
            if not self._stopping.is_set():
                raise
        with self._state:
            if self._stopping.is_set():  # stop() cancelled the wait, or came just after it
                self._lock.close()
                return
            log.info("scheduler lock taken: this process schedules now")
            self._lead()

    def _lead(self) -> None:
        self._leading = True
        self.on_lead()
        self.scheduler.start(paused=True)  # reconcile stored jobs before any of them fires
        wanted = {job.job_id for job in self.jobs}
        for stored in self.scheduler.get_jobs():
            if stored.id not in wanted:
                stored.remove()
                self._audit(f"{stored.id}: no longer scheduled")
        for job in self.jobs:
            _work[job.job_id] = job.work
            trigger = CronTrigger.from_crontab(job.crontab)
            stored = self.scheduler.get_job(job.job_id)
            if stored is None or str(stored.trigger) != str(trigger):
                self.scheduler.add_job(
                    _run, trigger, args=[job.job_id], id=job.job_id, replace_existing=True,
                    misfire_grace_time=job.grace_seconds,
                )  # fmt: skip
                self._audit(f"{job.job_id}: scheduled at {job.crontab!r}")
        self.scheduler.resume()
        for job in self.scheduler.get_jobs():
            log.info("%s: next run %s", job.id, job.next_run_time)

    def next_run(self, job_id: str) -> dt.datetime | None:
        job = self.scheduler.get_job(job_id)
        return job.next_run_time if job else None

    def stop(self) -> None:
        """Interrupts running work (a scan stops after its study), waits for it, and gives the
        lock back or stops waiting for it."""
        self._stopping.set()
        for job in self.jobs:
            job.interrupt()
        with self._state:
            if self.scheduler.running:
                detach(self.scheduler)
                self.scheduler.shutdown(wait=True)
            if self._lock is not None:
                if self._leading:
                    release_scheduler_lock(self._lock)
                else:
                    cancel_wait(self._lock)  # the waiting thread closes it

    def problems(self) -> list[str]:
        return []

    def _audit(self, detail: str) -> None:
        with self.db.session() as s:
            record_event(s, "config", detail=detail)


def detach(scheduler: BackgroundScheduler) -> None:
    """Detach the job store before ``shutdown()``: APScheduler 3 processes due jobs once more on
    shutdown, fails to submit them to its stopped executor, and yet stores their next run time,
    so a run due at that moment would be lost. The stored jobs stay as they are."""
    scheduler.pause()
    scheduler.remove_jobstore("default")
