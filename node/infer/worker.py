"""The inference worker: queued jobs -> model -> result -> SR (+ SC) -> deliveries.

One thread per process holds the model, loaded once and warmed up. With fewer images queued than
``[model] batch_size``, it waits up to ``max_wait_ms`` (from the oldest queued job) for more, then
claims a batch under a lease (``lease_seconds``); decoding runs in the engine's processes and the
tensor steps on the model's device, never on the C-STORE threads. If the process dies, its jobs
are claimed again: at once by a worker restarted on the same host, or by any worker once the
lease expires.
Every step is idempotent: results are unique per (instance, model SHA-256), report UIDs are
derived from the same pair, and deliveries are unique per (object, destination), so redoing a
job replaces, never doubles.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from ai import AgeModel, Engine
from ai.decode import load_dataset, small_header
from ai.device_decode import device_decoder
from node.components import Signal, WorkerThread
from node.config import ModelSection, ReportConfig
from node.dicom.header import chronological_age, parse_da
from node.metrics import BATCH_SIZE, INFERENCE_SECONDS, INFERRED, STAGE_SECONDS
from node.report.build import build_reports
from node.report.findings import EarlierAge, Findings
from storage import Database, FileStore, InstanceState, Job, utcnow
from storage.deliveries import StoredObject
from storage.owners import this_process
from storage.queue import (
    adopt_jobs,
    backlog,
    claim_jobs,
    fail_exhausted,
    fail_job,
    finish_job,
    held_job,
    requeue_orphans,
)
from storage.results import (
    Ages,
    ModelIdentity,
    earlier_ages,
    record_inferred,
    record_reports,
    stored_age,
)

log = logging.getLogger("xrayage.pipeline")


class InferenceWorker(WorkerThread):
    idle_seconds = 2.0

    def __init__(
        self,
        cfg: ModelSection,
        reports: ReportConfig,
        db: Database,
        store: FileStore,
        model: AgeModel,
        on_reported: Callable[[], None] | None = None,
        wake: Signal | None = None,
        in_own_process: bool = False,
    ) -> None:
        """``in_own_process``: this worker runs in the node's inference process, which ends
        with the node; a predecessor's jobs found at start are not counted against their images
        (:func:`storage.queue.requeue_orphans`)."""
        super().__init__("xrayage-infer", wake)
        self.in_own_process = in_own_process
        self.on_reported = on_reported or (lambda: None)
        self.cfg = cfg
        self.reports = reports
        self.db = db
        self.store = store
        self.model = model
        card = model.card
        self.identity = ModelIdentity(card.name, card.version, card.sha256, card.untrained)
        self.engine = make_engine(model, cfg)
        me = this_process()
        self.host, self.owner = me.host, str(me)
        self.lease = dt.timedelta(seconds=cfg.lease_seconds)

    def start(self) -> None:
        card = self.model.card
        log.info(
            "model %s %s (sha256 %s) on %s%s",
            card.name,
            card.version,
            card.sha256,
            self.model.device,
            " - UNTRAINED weights" if card.untrained else "",
        )
        with self.db.session() as s:
            orphans = requeue_orphans(s, self.host, counted=not self.in_own_process)
            adopted = adopt_jobs(s, card.sha256)
        if orphans:
            log.info("requeued %d jobs held by a stopped process on this host", orphans)
        if adopted:
            log.info("%d jobs queued for other weights are now this model's", adopted)
        self.engine.warm_up()  # the first image does not wait for decoding processes to start
        super().start()

    def stop(self) -> None:
        super().stop()
        self.engine.close()

    def _wait_for_batch(self) -> bool:
        """True when there is work: a full batch, or the oldest job has waited max_wait_ms."""
        cfg = self.cfg
        while True:
            with self.db.session() as s:
                count, oldest = backlog(s, self.identity.sha256)
            if count == 0:
                return False
            waited = (utcnow() - oldest).total_seconds() if oldest else float("inf")
            left = cfg.max_wait_ms / 1000.0 - waited
            if count >= cfg.batch_size or left <= 0 or self.stopping.is_set():
                return True
            self.wake.wait(timeout=min(left, 0.05))
            self.wake.clear()

    def run_once(self) -> int:
        """Claim and process one batch; returns how many jobs were claimed."""
        if not self._wait_for_batch():
            return 0
        cfg = self.cfg
        sha = self.identity.sha256
        with self.db.session() as s:
            fail_exhausted(s, cfg.max_attempts)  # logged and audited as they fail
            jobs = claim_jobs(
                s, self.owner, cfg.batch_size, self.lease, cfg.max_attempts, model_sha256=sha
            )
            # A job whose instance is `inferred` lost its worker after the model: the stored
            # age is reused, the model does not run again.
            known = {
                job.id: age
                for job in jobs
                if job.instance.state == InstanceState.INFERRED
                and (age := stored_age(s, job.instance_id, sha)) is not None
            }
            todo = [(job, Path(job.instance.path)) for job in jobs if job.id not in known]
            reuse = [(job, Path(job.instance.path)) for job in jobs if job.id in known]
        if not jobs:  # another worker claimed them first
            return 0
        claimed = utcnow()
        for job in jobs:
            STAGE_SECONDS.labels("queue").observe((claimed - job.created_at).total_seconds())
        if todo:
            started = time.perf_counter()
            outcomes = list(self.engine.run(path for _, path in todo))
            INFERENCE_SECONDS.observe(time.perf_counter() - started)
            BATCH_SIZE.observe(len(todo))
            for (job, _), outcome in zip(todo, outcomes, strict=True):
                for stage, seconds in outcome.seconds.items():
                    STAGE_SECONDS.labels(stage).observe(seconds)
                if outcome.error is not None or outcome.header is None or outcome.xray_age is None:
                    self._fail(job, outcome.error or "not a DICOM file")
                    continue
                findings = self._findings(outcome.header, outcome.xray_age)
                if self._inferred(job, findings):
                    self._report_timed(job, outcome.header, findings)
        for job, path in reuse:
            header = read_header(path)
            self._report_timed(job, header, self._findings(header, known[job.id]))
        return len(jobs)

    def _report_timed(self, job: Job, header: Dataset, findings: Findings) -> None:
        started = time.perf_counter()
        self._report(job, header, findings)
        STAGE_SECONDS.labels("report").observe(time.perf_counter() - started)

    def _held(self, s: Session, job_id: int) -> Job | None:
        job = held_job(s, job_id, self.owner)
        if job is None:
            log.warning("job %d: lease lost to another worker; its outcome is not recorded twice",
                        job_id)  # fmt: skip
        return job

    def _fail(self, job: Job, reason: str, summary: str | None = None) -> None:
        """Record ``reason`` (database and audit log); the application log gets ``summary``
        instead where the reason may quote header values, which can identify the patient."""
        with self.db.session() as s:
            held = self._held(s, job.id)
            if held is None:
                return
            INFERRED.labels("failed").inc()
            fail_job(s, held, reason, summary)

    def _inferred(self, claimed: Job, f: Findings) -> bool:
        """Commit the model's output (``inferred``) before any report is built, so a crash
        from here on does not run the model again; False if the job is no longer ours."""
        with self.db.session() as s:
            held = self._held(s, claimed.id)
            if held is None:
                return False
            ages = Ages(f.xray_age, f.chronological_age, f.age_gap, f.corrected_age_gap)
            record_inferred(s, held.instance, self.identity, ages)
        return True

    def _findings(self, header: Dataset, age: float) -> Findings:
        return Findings(age, chronological_age(header), self.model.card)

    def _report(self, claimed: Job, header: Dataset, findings: Findings) -> None:
        if self.reports.section.secondary_capture:  # the summary image plots the earlier ones
            with self.db.session() as s:
                earlier = earlier_ages(s, claimed.instance_id, self.identity.sha256)
            findings = replace(
                findings,
                study_date=parse_da(header.get("StudyDate")),
                earlier=tuple(EarlierAge(*row) for row in earlier),
            )
        try:
            built = build_reports(header, findings, self.reports.section, self.reports.ae_title)
        except ValueError as e:  # highdicom's validation of what the source header gave it
            self._fail(
                claimed,
                f"report cannot be built: {e}",
                f"report cannot be built ({type(e).__name__}; the reason is in the database)",
            )
            return
        try:
            stored = []
            for obj in built.objects:
                path = self.store.store_report(obj.sop_instance_uid, obj.data)
                stored.append(StoredObject(obj.kind, obj.sop_instance_uid, str(path)))
        except OSError as e:
            self._fail(claimed, f"report cannot be stored: {e}")
            return
        with self.db.session() as s:
            held = self._held(s, claimed.id)
            if held is None:
                return
            INFERRED.labels("reported").inc()
            sha = self.identity.sha256
            record_reports(s, held.instance, sha, stored, self.reports.destinations)
            finish_job(s, held)
        self.on_reported()


def make_engine(model: AgeModel, cfg: ModelSection, batch_size: int | None = None) -> Engine:
    """The batched engine of ``model`` under ``[model]`` (``batch_size`` overriding its
    batch size), with the device decoder it allows: the node's and ``xrayage infer``'s."""
    decoder = device_decoder(model.device, cfg.device_decode)
    return Engine(
        model, batch_size or cfg.batch_size, cfg.preprocess_workers, decoder, cfg.decode_memory_mb
    )


def read_header(path: Path) -> Dataset:
    """The header of a stored image as the decoding processes hand it over: its long values
    (Pixel Data, a large private element) left on disk, never read into this process."""
    return small_header(load_dataset(path))
