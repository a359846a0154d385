"""The running node: receiver, inference worker and deliverer around one database and store."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading

from apscheduler.triggers.cron import CronTrigger

from ai import AgeModel, resolve_weights
from node.atna import SyslogExporter
from node.changes import record_changes
from node.config import Settings
from node.deliver import Deliverer
from node.http_api import HttpServer, create_app
from node.pipeline import InferenceWorker
from node.receive import Receiver
from node.retro import RetroScanner, next_at
from node.schedule import ScheduledJob, Scheduler
from node.scp_server import GuardedServer
from storage import Database, FileStore, record_event
from storage.audit import purge_events
from storage.tables import utcnow

log = logging.getLogger("xrayage")


class NodeService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.storage.path.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.database_url, settings.storage.database_timeout_seconds)
        self.db.create_schema()
        self.store = FileStore(
            settings.storage.path / "dicom", settings.storage.min_free_mb * 1024 * 1024
        )
        cfg = settings.model
        self.model = (
            AgeModel.load(resolve_weights(cfg.weights, cfg.cache_dir), cfg.device, warm_up=True)
            if cfg.weights
            else None
        )
        self.deliverer = Deliverer(settings, self.db) if settings.destinations else None
        self.worker = (
            InferenceWorker(
                settings,
                self.db,
                self.store,
                self.model,
                on_reported=self.deliverer.wake.set if self.deliverer else None,
            )
            if self.model
            else None
        )
        age_range = self.model.card.age_range if self.model else (0.0, 200.0)
        self.receiver = Receiver(
            settings,
            self.db,
            self.store,
            age_range,
            on_queued=self.worker.wake.set if self.worker else lambda: None,
        )
        self.scanner = (
            RetroScanner(settings, self.db, self.model.card.sha256, self.receiver.handle_store)
            if settings.retro.peer is not None and self.model is not None
            else None
        )
        self.scheduler = Scheduler(self.db, self._scheduled_jobs())
        syslog = settings.audit.syslog
        self.exporter = SyslogExporter(syslog, self.db, settings.node.ae_title) if syslog else None
        http = settings.http
        self.http = (
            HttpServer(create_app(self.db, http.tokens), http.host, http.port)
            if http.port
            else None
        )
        self._server: GuardedServer | None = None

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
        record_changes(self.db, self.settings, self.model.card if self.model else None)
        with self.db.session() as s:
            record_event(s, "node", detail=f"started as {node.ae_title} on port {node.port}")
        self._server = self.receiver.start()
        log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)
        if self.worker is None:
            log.warning(
                "no [model] weights configured: images are received and queued, "
                "and inference waits until a model is configured"
            )
        else:
            card = self.model.card  # type: ignore[union-attr]
            log.info(
                "model %s %s (sha256 %s) on %s%s",
                card.name,
                card.version,
                card.sha256,
                self.model.device,
                " - UNTRAINED weights" if card.untrained else "",
            )  # type: ignore[union-attr]
            self.worker.start()
        for thread in (self.deliverer, self.exporter):
            if thread is not None:
                thread.start()
        if self.settings.retro.peer is not None and self.scanner is None:
            log.warning("[retro] peer configured, but retro-scans need [model] weights")
        self.scheduler.start()
        if self.http is not None:
            self.http.start()
            log.info("HTTP API on %s:%d", self.settings.http.host, self.settings.http.port)
            if not self.settings.http.tokens:
                log.warning("[http] has no tokens: only /healthz answers")

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.scanner is not None:
            self.scanner.stopping.set()
        self.scheduler.stop()
        if self._server is not None:
            self._server.shutdown()
        for thread in (self.worker, self.deliverer, self.exporter):
            if thread is not None and thread.is_alive():
                thread.stop()
                thread.join(timeout=60)
        with self.db.session() as s:
            record_event(s, "node", detail="stopped")
        self.db.dispose()

    def serve_forever(self) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        log.info("stopping")
        self.stop()
