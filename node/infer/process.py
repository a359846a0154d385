"""The inference worker in a process of its own, supervised by the one that answers C-STORE.

The model, and the decoders under it, are the parts of the node that a single image can break:
GDCM throws a C++ exception that aborts the process (SIGABRT) on a JPEG-LS stream that disagrees
with its header, and a header can claim more memory than the host has. Decoding runs in the
engine's own decoding processes (:mod:`ai.engine`), so such an image ends one of those and is
failed with that cause; whatever ends the inference process itself (the OOM killer, a crash in
the model) ends it, not the receiver: associations, C-ECHO and C-STORE go on. The supervisor
gives the dead process's jobs back to the queue with the cause (``killed by SIGKILL``), audits
the death, and starts a new process after a backoff (1, 2, 4 ... 60 s). A job of a dead process
is then claimed alone, and after ``[model] max_attempts`` deaths it is ``failed`` with that
cause (storage/queue.py), so one bad image costs its own attempts and no other image's.

The child is started with ``spawn`` (a fresh interpreter: no threads or sockets of the parent
inherited), receives its config sections (pickled), opens its own database connection and file
store, and loads the model itself. Parent and child talk through the database (jobs) and four
events: ``wake`` (a job was queued), ``reported`` (wakes the deliverer), ``ready``, ``stop``.
Its counters go to prometheus-client's multiprocess files, which ``/metrics`` sums in.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ai.errors import ModelLoadError
from ai.processes import cause_of, keep_freed_memory, spawned_child
from node.components import STOP_SECONDS
from node.config import LoggingSection, ModelSection, ReportConfig, StorageSection
from storage import Database, record_event
from storage.owners import this_process
from storage.queue import requeue_owner

log = logging.getLogger("xrayage.infer")

_SPAWN = multiprocessing.get_context("spawn")
# The child counts into files here; read when prometheus-client is imported, so it is set in
# the environment the child starts with (the parent imported it long before, in memory mode).
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_ENVIRONMENT = threading.Lock()
BACKOFF_MAX_SECONDS = 60.0
INFERENCE_NICENESS = 10


def event() -> Any:
    """An event that the inference process can set and this one wait on (and the reverse)."""
    return _SPAWN.Event()


class InferenceProcess:
    """Starts, watches, restarts and stops the inference process: the service's component for
    inference when ``[model] isolation = "process"``."""

    def __init__(
        self,
        cfg: ModelSection,
        reports: ReportConfig,
        storage: StorageSection,
        logging_cfg: LoggingSection,
        db: Database,
        wake: Any,
        reported: Any,
    ) -> None:
        """``wake`` (a job was queued) and ``reported`` (wakes the deliverer): events from
        :func:`event`, shared with the process. The process loads the models the models table
        names (node/infer/models.py)."""
        self.config = (cfg, reports, storage, logging_cfg)
        self.db = db
        self.wake = wake
        self.reported = reported
        self.ready = event()
        self.child_stop = event()
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="xrayage-metrics-"))
        self.deaths = 0
        self.last_death: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a stop and a restart never cross
        self._errors: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._supervisor = threading.Thread(
            target=self._supervise, name="xrayage-infer-supervisor", daemon=True
        )

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        """A new process; ``self._errors`` receives its reason if it cannot load the model."""
        self.ready.clear()
        self.child_stop.clear()
        errors, child_errors = _SPAWN.Pipe(duplex=False)
        proc = _SPAWN.Process(
            target=run_child,
            args=(
                *self.config,
                self.wake,
                self.reported,
                self.ready,
                self.child_stop,
                child_errors,
            ),
            name="xrayage-infer",
            # Not a daemon: it starts decoding processes, which a daemon may not. It stops with
            # stop(), or at its parent's death (spawned_child).
            daemon=False,
        )
        with _ENVIRONMENT:  # for the child only: a later subprocess of ours must not count there
            before = os.environ.get(METRICS_ENV)
            os.environ[METRICS_ENV] = str(self.metrics_dir)
            try:
                proc.start()  # returns once the child has exec'd, with this environment
            finally:
                if before is None:
                    del os.environ[METRICS_ENV]
                else:
                    os.environ[METRICS_ENV] = before
        child_errors.close()
        if self._errors is not None:
            self._errors.close()
        self._errors = errors
        return proc

    def start(self) -> None:
        """Start the first process and wait until its model is loaded; a model that cannot be
        loaded is the user's error (ModelLoadError), not a process to restart for ever."""
        proc = self._spawn()
        while not self.ready.wait(0.2):
            if not proc.is_alive():
                raise ModelLoadError(f"inference process could not start: {self._reason(proc)}")
        self._proc = proc
        self._supervisor.start()

    def _reason(self, proc: multiprocessing.process.BaseProcess) -> str:
        assert self._errors is not None
        try:
            if self._errors.poll():
                return str(self._errors.recv())
        except EOFError:  # the child closed its end: its model had loaded
            pass
        return cause_of(proc.exitcode)

    def _supervise(self) -> None:
        delay = 1.0
        while True:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            proc.join()
            if self._stopping.is_set():
                return
            self._died(proc)
            if time.monotonic() - started > BACKOFF_MAX_SECONDS:  # it had run well for a while
                delay = 1.0
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._proc = self._spawn()

    def _died(self, proc: multiprocessing.process.BaseProcess) -> None:
        self.deaths += 1
        cause = f"inference process {proc.pid} {self._reason(proc)}"
        self.last_death = cause
        try:
            with self.db.session() as s:
                requeued = requeue_owner(s, str(this_process(proc.pid)), cause)
                record_event(s, "node", detail=f"{cause}; {requeued} jobs requeued; restarting")
        except SQLAlchemyError as e:  # its jobs come back when their lease expires
            log.error("%s; its jobs could not be requeued now (%s); restarting it", cause, e)
            return
        log.error("%s; %d jobs requeued; restarting it", cause, requeued)

    def problems(self) -> list[str]:
        """What keeps inference from running now (``/readyz``)."""
        if self._proc is not None and self.ready.is_set() and self._proc.is_alive():
            return []
        if self.last_death:
            return [f"inference process restarting ({self.last_death})"]
        return ["inference process not running"]

    def stop(self) -> None:
        """Ask the process to stop after its batch, and wait for it (terminated after
        ``STOP_SECONDS``)."""
        with self._lock:
            self._stopping.set()
            self.child_stop.set()
            self.wake.set()
        proc = self._proc
        if proc is not None:
            proc.join(STOP_SECONDS)
            if proc.is_alive():
                log.warning("inference process %d did not stop in time: terminated", proc.pid)
                proc.terminate()
                proc.join(5)
        if self._supervisor.is_alive():
            self._supervisor.join(5)
        if self._errors is not None:
            self._errors.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def run_child(
    cfg: ModelSection,
    reports: ReportConfig,
    storage: StorageSection,
    logging_cfg: LoggingSection,
    wake: Any,
    reported: Any,
    ready: Any,
    stop: Any,
    errors: Connection,
) -> None:
    """The inference process: the models and the worker loop, until ``stop`` or the parent's
    death (a child of a killed ``serve`` must not go on claiming jobs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # decides; a plain kill stops cleanly
    spawned_child()  # dies with its parent: a child of a killed serve must not claim jobs
    # Below the receiver when the cores are short (its decoding processes inherit this): a
    # C-STORE or a retro-scan's retrieve is never slowed by the model; idle cores are shared.
    os.nice(INFERENCE_NICENESS)
    keep_freed_memory()  # the model's and the batches' tensors reuse memory (ai/processes.py)
    from node.infer.models import ModelSet  # torch loads here, in the child only
    from node.infer.worker import InferenceWorker
    from node.logs import configure_logging

    configure_logging(logging_cfg)
    db = storage.open_database()
    models = ModelSet(db, cfg.device)
    try:
        models.refresh(force=True)
        worker = InferenceWorker(
            cfg, reports, db, storage.open_file_store(), models, reported.set, wake,
            in_own_process=True,
        )  # fmt: skip
    except Exception as e:  # the parent reports it as the user's error, once
        errors.send(str(e) or type(e).__name__)
        raise SystemExit(1) from None
    errors.close()
    worker.start()
    ready.set()
    parent = multiprocessing.parent_process()
    while not stop.wait(1.0):
        if parent is not None and not parent.is_alive():
            break
    worker.stop()
    db.dispose()
