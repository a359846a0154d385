"""The running node: receiver, inference, deliverer and scheduler around one database and file
store, in one process (role ``all``) or spread over processes and hosts that share a PostgreSQL
database and a volume (roles ``receive``, ``infer``, ``deliver``, ``schedule``).

Everything the roles tell each other goes through the database (jobs, deliveries, scans), so
any mix of processes behaves like one node. ``schedule`` (retro-scans, audit purge, ATNA export,
recording config changes) runs once per deployment; the others scale out.

The service is composed from :data:`COMPONENTS`, one table of which part runs in which role;
every part has the interface of :class:`node.components.Component` and receives its own config
sections, not the settings.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.exc import SQLAlchemyError

from ai.card import ModelCard
from node.audit.atna import SyslogExporter
from node.audit.changes import record_changes
from node.components import Component, Signal
from node.config import ReportConfig, Settings
from node.delivery.deliverer import Deliverer
from node.dicom.scp import Receiver
from node.gate import Gate
from node.http.app import HttpServer, create_app, local_token
from node.infer.process import InferenceProcess, event
from node.infer.registry import active_cards, live_card
from node.report.identity import is_own_output
from node.results.validation import Validations
from node.retro.runner import RetroScanner, next_at
from node.schedule import ScheduledJob, Scheduler
from storage import Database, FileStore, record_event
from storage.audit import purge_events
from storage.schema import SchemaError, check
from storage.tables import utcnow

log = logging.getLogger("xrayage")

VALIDATION_CHECK = "7 * * * *"  # hourly: a drift is said within the hour, once a day
Role = Literal["receive", "infer", "deliver", "schedule", "all"]
ROLES: tuple[Role, ...] = get_args(Role)[:-1]


class NodeService:
    def __init__(self, settings: Settings, role: Role = "all") -> None:
        self.settings = settings
        self.role = role
        self.roles = set(ROLES) if role == "all" else {role}
        settings.storage.path.mkdir(parents=True, exist_ok=True)
        self.db = settings.storage.open_database()
        self.db.prepare_schema()
        self.store = settings.storage.open_file_store()
        cfg = settings.model
        # Only the inference part loads the networks (and imports torch); the others need the
        # live model's card (the gate's age range, the model that retro-scans compare against).
        self.card: ModelCard | None = live_card(self.db, cfg)
        self.validations = Validations(self.db, settings.validation, partial(active_cards, self.db))
        # Reports wake the deliverer, queued images the inference part: events that work across
        # processes where inference runs in one of its own (the default).
        self.isolated = (
            self.card is not None and "infer" in self.roles and cfg.isolation == "process"
        )
        make: Callable[[], Signal] = event if self.isolated else threading.Event
        self.reported, self.queued = make(), make()
        self.scheduler: Scheduler | None = None
        self.components: list[Component] = []
        # In start order (the model first: weights that cannot be loaded end `serve` before it
        # accepts images); stopped in reverse.
        for roles, build in COMPONENTS:
            if roles is None or roles & self.roles:
                part = build(self)
                if part is not None:
                    self.components.append(part)

    # -- the parts -------------------------------------------------------------------------
    def inference(self) -> Component | None:
        if self.card is None:
            return None
        s = self.settings
        reports = ReportConfig(s.report, s.node.ae_title, tuple(s.destinations))
        if self.isolated:
            return InferenceProcess(
                s.model, reports, s.storage, s.logging, self.db,
                wake=self.queued, reported=self.reported,
            )  # fmt: skip
        from node.infer.models import ModelSet
        from node.infer.worker import InferenceWorker

        models = ModelSet(self.db, s.model.device)
        models.refresh(force=True)
        return InferenceWorker(
            s.model, reports, self.db, self.store, models, self.reported.set, self.queued
        )

    def receiver(self) -> Receiver:
        return receiver_for(self.settings, self.db, self.store, self.card, self.queued.set)

    def deliverer(self) -> Deliverer | None:
        s = self.settings
        if not s.destinations:
            return None
        return Deliverer(s.destinations, s.delivery, s.node.ae_title, self.db, self.reported)

    def exporter(self) -> SyslogExporter | None:
        syslog = self.settings.audit.syslog
        return SyslogExporter(syslog, self.db, self.settings.node.ae_title) if syslog else None

    def schedule(self) -> Scheduler:
        self.scheduler = Scheduler(self.db, self._scheduled_jobs(), self._lead)
        return self.scheduler

    def http(self) -> HttpServer | None:
        http = self.settings.http
        if not http.port:
            return None
        metrics = next(
            (c.metrics_dir for c in self.components if isinstance(c, InferenceProcess)), None
        )
        tokens = http.tokens
        if not tokens:
            tokens, where = local_token(self.settings.storage.path)
            log.warning(
                "[http] has no tokens: the pages at http://%s:%d/ take the token in %s "
                "(name 'local'); add [http] tokens for other readers",
                http.host, http.port, where,
            )  # fmt: skip
        app = create_app(self.db, tokens, self.not_ready, metrics, self.validations)
        return HttpServer(app, http.host, http.port)

    def _scheduled_jobs(self) -> list[ScheduledJob]:
        jobs = []
        s = self.settings
        retro = s.retro
        if retro.peer is not None and self.card is not None:
            # The C-STORE path this process's receiver would use, for C-GET retrievals.
            receiver = self.receiver()
            scanner = RetroScanner(
                retro=retro, gate=s.gate, own_ae=s.node.ae_title, db=self.db,
                model_sha256=self.card.sha256, store_handler=receiver.handle_store,
            )  # fmt: skip
            # Grace: the window's length, so a run missed while the node was down still runs
            # when the node is back before the window ends, and not after.
            fire = CronTrigger.from_crontab(retro.schedule).get_next_fire_time(
                None, dt.datetime.now().astimezone()
            )
            grace = int((next_at(fire, retro.window_end) - fire).total_seconds())
            jobs.append(
                ScheduledJob(
                    "retro-scan", retro.schedule, grace, scanner.nightly, scanner.stopping.set
                )
            )
        if self.card is not None:
            check = self.validations.check
            jobs.append(ScheduledJob("validation-check", VALIDATION_CHECK, 3600, check))
        if s.audit.retention_days is not None:
            jobs.append(ScheduledJob("audit-purge", s.audit.purge_schedule, 86400, self.purge))
        return jobs

    def _lead(self) -> None:
        """This process schedules now: record what changed in the config and the model."""
        record_changes(self.db, self.settings, self.card)
        if self.settings.retro.peer is not None and self.card is None:
            log.warning("[retro] peer configured, but retro-scans need [model] weights")

    def purge(self) -> int:
        """The audit log's retention purge (``[audit] retention_days``)."""
        days = self.settings.audit.retention_days
        assert days is not None
        with self.db.session() as s:
            return purge_events(s, utcnow() - dt.timedelta(days=days), "schedule")

    # -- life ------------------------------------------------------------------------------
    def not_ready(self) -> list[str]:
        """What keeps this process from doing its role's work now (``/readyz``)."""
        problems = []
        try:
            check(self.db.engine)
        except (SchemaError, SQLAlchemyError) as e:
            problems.append(f"database: {str(e).splitlines()[0]}")
        for part in self.components:
            problems += part.problems()
        if "infer" in self.roles and self.card is None:
            problems.append("no [model] weights configured and no live model")
        return problems

    def start(self) -> None:
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d partial files left by an earlier stop", removed)
        for part in self.components:
            part.start()
        if "infer" in self.roles and self.card is None:
            log.warning(
                "no [model] weights configured and no live model: images are received and "
                "queued, and inference waits until a model is configured (then restart)"
            )
        storage = self.settings.storage
        if "receive" in self.roles and self.store.free_bytes() < 0:
            log.warning(
                "%s: %d MB free, below [storage] min_free_mb = %d: every C-STORE is refused "
                "(A700 Out of Resources) until space is freed or the reserve lowered",
                storage.path, (self.store.free_bytes() >> 20) + storage.min_free_mb,
                storage.min_free_mb,
            )  # fmt: skip
        if "infer" in self.roles and not self.settings.destinations:
            log.warning(
                "no [[destinations]]: reports are kept in %s and stay `reported`",
                self.settings.storage.path / "dicom" / "reports",
            )
        if "schedule" in self.roles and self.settings.retro.peer is None:
            log.warning("no [retro] peer: no nightly re-scans of the archive")
        node = self.settings.node
        where = f" on port {node.port}" if "receive" in self.roles else ""
        with self.db.session() as s:
            record_event(s, "node", detail=f"started as {node.ae_title} ({self.role}){where}")

    def stop(self) -> None:
        for part in reversed(self.components):
            part.stop()
        with self.db.session() as s:
            record_event(s, "node", detail=f"stopped ({self.role})")
        self.db.dispose()

    def serve_forever(self) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        log.info("stopping")
        self.stop()


def receiver_for(
    settings: Settings,
    db: Database,
    store: FileStore,
    card: ModelCard | None,
    on_queued: Callable[[], None] = lambda: None,
) -> Receiver:
    """The receive path, with the gate of ``card``'s validated age range (any age without a
    model) that never lets the node's own output through."""
    age_range = card.age_range if card else (0.0, 200.0)
    gate = Gate(settings.gate, age_range, is_own_output)
    return Receiver(settings.node, gate, db, store, on_queued)


Build = Callable[[NodeService], Component | None]
# Which part runs in which role (None: in every role), in start order.
COMPONENTS: list[tuple[set[Role] | None, Build]] = [
    ({"infer"}, NodeService.inference),
    ({"deliver"}, NodeService.deliverer),
    ({"schedule"}, NodeService.exporter),
    ({"receive"}, NodeService.receiver),
    ({"schedule"}, NodeService.schedule),
    (None, NodeService.http),
]
