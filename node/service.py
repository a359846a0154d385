"""The running node: receiver, inference worker, deliverer and scheduler around one database
and file store, in one process (role ``all``) or spread over processes and hosts that share a
PostgreSQL database and a volume (roles ``receive``, ``infer``, ``deliver``, ``schedule``).

Everything the roles tell each other goes through the database (jobs, deliveries, scans), so
any mix of processes behaves like one node. ``schedule`` (retro-scans, audit purge, ATNA export,
recording config changes) runs once per deployment; the others scale out.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from typing import TYPE_CHECKING, Literal, get_args

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from ai.card import ModelCard
from ai.presets import model_card, resolve_weights
from node.atna import SyslogExporter
from node.changes import record_changes
from node.config import Settings
from node.deliver import Deliverer
from node.http_api import HttpServer, create_app
from node.receive import Receiver
from node.retro import RetroScanner, next_at
from node.schedule import ScheduledJob, Scheduler
from node.scp_server import GuardedServer
from storage import Database, record_event
from storage.audit import purge_events
from storage.locks import (
    cancel_wait,
    release_scheduler_lock,
    try_scheduler_lock,
    wait_scheduler_lock,
)
from storage.schema import SchemaError, check
from storage.tables import utcnow

if TYPE_CHECKING:
    from node.pipeline import InferenceWorker

log = logging.getLogger("xrayage")

Role = Literal["receive", "infer", "deliver", "schedule", "all"]
ROLES: tuple[Role, ...] = get_args(Role)[:-1]


class NodeService:
    def __init__(self, settings: Settings, role: Role = "all") -> None:
        self.settings = settings
        self.role = role
        roles = set(ROLES) if role == "all" else {role}
        settings.storage.path.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.database_url, settings.storage.database_timeout_seconds)
        self.db.prepare_schema()
        self.store = settings.file_store()
        cfg = settings.model
        weights = resolve_weights(cfg.weights, cfg.cache_dir) if cfg.weights else None
        self.deliverer = (
            Deliverer(settings, self.db) if settings.destinations and "deliver" in roles else None
        )
        # Only the inference role loads the network (and imports torch); the others need its
        # card (the gate's age range, the model identity that retro-scans compare against).
        self.card: ModelCard | None = None
        self.worker: InferenceWorker | None = None
        if weights and "infer" in roles:
            from ai.model import AgeModel
            from node.pipeline import InferenceWorker

            model = AgeModel.load(weights, cfg.device, warm_up=True)
            self.card = model.card
            self.worker = InferenceWorker(
                settings,
                self.db,
                self.store,
                model,
                on_reported=self.deliverer.wake.set if self.deliverer else None,
            )
        elif weights:
            self.card = model_card(weights)
        # The receiver stores what the SCP receives and what a C-GET retro-scan fetches.
        self.receiver = Receiver(
            settings,
            self.db,
            self.store,
            self.card.age_range if self.card else (0.0, 200.0),
            on_queued=self.worker.wake.set if self.worker else lambda: None,
        )
        self.listens = "receive" in roles
        scheduling = "schedule" in roles
        self.scanner = (
            RetroScanner(settings, self.db, self.card.sha256, self.receiver.handle_store)
            if settings.retro.peer is not None and self.card is not None and scheduling
            else None
        )
        self.scheduler = Scheduler(self.db, self._scheduled_jobs()) if scheduling else None
        syslog = settings.audit.syslog
        self.exporter = (
            SyslogExporter(syslog, self.db, settings.node.ae_title)
            if syslog and scheduling
            else None
        )
        http = settings.http
        self.http = (
            HttpServer(create_app(self.db, http.tokens, self.not_ready), http.host, http.port)
            if http.port
            else None
        )
        self._server: GuardedServer | None = None
        self._lock: Connection | None = None  # holds the scheduler's lock on PostgreSQL
        self._stopping = threading.Event()
        self._scheduling = False

    def not_ready(self) -> list[str]:
        """What keeps this process from doing its role's work now (``/readyz``)."""
        problems = []
        try:
            check(self.db.engine)
        except (SchemaError, SQLAlchemyError) as e:
            problems.append(f"database: {str(e).splitlines()[0]}")
        if self.listens and self._server is None:
            problems.append("DICOM SCP not listening")
        for name, thread in (("inference worker", self.worker), ("deliverer", self.deliverer)):
            if thread is not None and not thread.is_alive():
                problems.append(f"{name} not running")
        if self.role in ("infer", "all") and self.worker is None:
            problems.append("no [model] weights configured")
        return problems

    def _scheduled_jobs(self) -> list[ScheduledJob]:
        jobs = []
        retro = self.settings.retro
        if self.scanner is not None:
            # Grace: the window's length, so a run missed while the node was down still runs
            # when the node is back before the window ends, and not after.
            fire = CronTrigger.from_crontab(retro.schedule).get_next_fire_time(
                None, dt.datetime.now().astimezone()
            )
            grace = int((next_at(fire, retro.window_end) - fire).total_seconds())
            jobs.append(ScheduledJob("retro-scan", retro.schedule, grace, self.scanner.nightly))
        if self.settings.audit.retention_days is not None:
            jobs.append(
                ScheduledJob("audit-purge", self.settings.audit.purge_schedule, 86400, self.purge)
            )
        return jobs

    def purge(self) -> int:
        """The audit log's retention purge (``[audit] retention_days``)."""
        days = self.settings.audit.retention_days
        assert days is not None
        with self.db.session() as s:
            return purge_events(s, utcnow() - dt.timedelta(days=days), "schedule")

    def start(self) -> None:
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d partial files left by an earlier stop", removed)
        node = self.settings.node
        where = f" on port {node.port}" if self.listens else ""
        with self.db.session() as s:
            record_event(s, "node", detail=f"started as {node.ae_title} ({self.role}){where}")
        if self.listens:
            self._server = self.receiver.start()
            log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)
        if self.worker is not None:
            model = self.worker.model
            card = model.card
            log.info(
                "model %s %s (sha256 %s) on %s%s",
                card.name,
                card.version,
                card.sha256,
                model.device,
                " - UNTRAINED weights" if card.untrained else "",
            )
            self.worker.start()
        elif self.role in ("infer", "all"):
            log.warning(
                "no [model] weights configured: images are received and queued, "
                "and inference waits until a model is configured"
            )
        for thread in (self.deliverer, self.exporter):
            if thread is not None:
                thread.start()
        if self.scheduler is not None:
            self._start_scheduling()
        if self.http is not None:
            self.http.start()
            log.info("HTTP on %s:%d", self.settings.http.host, self.settings.http.port)
            if not self.settings.http.tokens:
                log.warning("[http] has no tokens: only /healthz, /readyz and /metrics answer")

    def _start_scheduling(self) -> None:
        """Scheduling runs once per deployment: on PostgreSQL the process that holds the
        scheduler's advisory lock; another says so and waits for it (SQLite has one ``serve``
        per data folder anyway)."""
        if self.db.engine.dialect.name == "postgresql":
            self._lock = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if not try_scheduler_lock(self._lock):
                log.warning(
                    "another process schedules for this database (retro-scans, audit purge, "
                    "config changes): this one waits until it stops"
                )
                threading.Thread(
                    target=self._schedule_when_locked, name="xrayage-schedule-lock", daemon=True
                ).start()
                return
        self._schedule()

    def _schedule_when_locked(self) -> None:
        assert self._lock is not None
        try:
            wait_scheduler_lock(self._lock)
        except SQLAlchemyError:
            if not self._stopping.is_set():
                raise
        if self._stopping.is_set():  # stop() cancelled the wait, or came just after it
            self._lock.close()
            return
        log.info("scheduler lock taken: this process schedules now")
        self._schedule()

    def _schedule(self) -> None:
        assert self.scheduler is not None
        self._scheduling = True
        record_changes(self.db, self.settings, self.card)
        if self.settings.retro.peer is not None and self.scanner is None:
            log.warning("[retro] peer configured, but retro-scans need [model] weights")
        self.scheduler.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.http is not None:
            self.http.stop()
        if self.scanner is not None:
            self.scanner.stopping.set()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self._server is not None:
            self._server.shutdown()
        for thread in (self.worker, self.deliverer, self.exporter):
            if thread is not None and thread.is_alive():
                thread.stop()
                thread.join(timeout=60)
        with self.db.session() as s:
            record_event(s, "node", detail=f"stopped ({self.role})")
        if self._lock is not None:
            if self._scheduling:
                release_scheduler_lock(self._lock)
            else:
                cancel_wait(self._lock)  # the waiting thread closes it
        self.db.dispose()

    def serve_forever(self) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        log.info("stopping")
        self.stop()
