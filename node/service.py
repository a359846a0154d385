"""The running node: receiver, inference worker and deliverer around one database and store."""

from __future__ import annotations

import logging
import signal
import threading

from ai import AgeModel, resolve_weights
from node.config import Settings
from node.deliver import Deliverer
from node.pipeline import InferenceWorker
from node.receive import Receiver
from node.scp_server import GuardedServer
from storage import Database, FileStore

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
        self._server: GuardedServer | None = None

    def start(self) -> None:
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d partial files left by an earlier stop", removed)
        node = self.settings.node
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
        if self.deliverer is not None:
            self.deliverer.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        for thread in (self.worker, self.deliverer):
            if thread is not None and thread.is_alive():
                thread.stop()
                thread.join(timeout=60)
        self.db.dispose()

    def serve_forever(self) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        log.info("stopping")
        self.stop()
