"""The inference worker: queued jobs -> model -> result -> SR (+ SC) -> deliveries.

One thread per process holds the active models (the live one and its shadows, node/infer/models.py),
each loaded once and warmed up, and reads the models table again every few seconds. It claims
images with their jobs for every model it holds, so each image is decoded once for all of them;
only the live model's result makes the reports. With fewer images queued than
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
from ai.engine import Request
from node.components import Signal, WorkerThread
from node.config import ModelSection, ReportConfig
from node.delivery.routes import ImageFacts, route
from node.dicom.header import chronological_age, parse_da
from node.infer.models import ModelSet, identity
from node.metrics import BATCH_SIZE, INFERENCE_SECONDS, INFERRED, STAGE_SECONDS
from node.report.build import build_reports
from node.report.findings import EarlierAge, Findings
from storage import Database, FileStore, Instance, Job, utcnow
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
    is_live,
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
        models: ModelSet,
        on_reported: Callable[[], None] | None = None,
        wake: Signal | None = None,
        in_own_process: bool = False,
    ) -> None:
        """``models``: read once already (:meth:`ModelSet.refresh`), so that weights that cannot
        be loaded end the start. ``in_own_process``: this worker runs in the node's inference
        process, which ends with the node; a predecessor's jobs found at start are not counted
        against their images (:func:`storage.queue.requeue_orphans`)."""
        super().__init__("xrayage-infer", wake)
        self.in_own_process = in_own_process
        self.on_reported = on_reported or (lambda: None)
        self.cfg = cfg
        self.reports = reports
        self.db = db
        self.store = store
        self.models = models
        self.engine = make_engine(models.first(), cfg)
        me = this_process()
        self.host, self.owner = me.host, str(me)
        self.lease = dt.timedelta(seconds=cfg.lease_seconds)

    def start(self) -> None:
        with self.db.session() as s:
            orphans = requeue_orphans(s, self.host, counted=not self.in_own_process)
            adopted = adopt_jobs(s)
        if orphans:
            log.info("requeued %d jobs held by a stopped process on this host", orphans)
        if adopted:
            log.info("%d queued jobs handed over to the models' roles", adopted)
        self.engine.warm_up()  # the first image does not wait for decoding processes to start
        super().start()

    def stop(self) -> None:
        super().stop()
        self.engine.close()

    def _refresh(self) -> None:
        """Take up ``xrayage model`` changes (the table is read every few seconds)."""
        if self.models.refresh() and self.models.loaded:
            self.engine.model = self.models.first()  # same device and input size: shared_input

    def _wait_for_batch(self) -> bool:
        """True when there is work: a full batch, or the oldest job has waited max_wait_ms."""
        cfg = self.cfg
        while True:
            with self.db.session() as s:
                count, oldest = backlog(s, list(self.models.loaded), self.models.live)
            if count == 0:
                return False
            waited = (utcnow() - oldest).total_seconds() if oldest else float("inf")
            left = cfg.max_wait_ms / 1000.0 - waited
            if count >= cfg.batch_size or left <= 0 or self.stopping.is_set():
                return True
            self.wake.wait(timeout=min(left, 0.05))
            self.wake.clear()

    def run_once(self) -> int:
        """Claim and process one batch of images, each with its jobs for every model held;
        returns how many jobs were claimed."""
        self._refresh()
        if not self.models.loaded or not self._wait_for_batch():
            return 0
        cfg = self.cfg
        with self.db.session() as s:
            fail_exhausted(s, cfg.max_attempts)  # logged and audited as they fail
            jobs = claim_jobs(
                s, self.owner, cfg.batch_size, self.lease, cfg.max_attempts,
                models=list(self.models.loaded), live=self.models.live,
            )  # fmt: skip
            # A job whose model already stored an age (its worker died after the model; or a
            # shadow's result, now live) reuses it: the model does not run again.
            known = {
                job.id: age
                for job in jobs
                if job.model_sha256 is not None
                and (age := stored_age(s, job.instance_id, job.model_sha256)) is not None
            }
            images: dict[int, tuple[Path, list[Job]]] = {}
            for job in jobs:
                images.setdefault(job.instance_id, (Path(job.instance.path), []))[1].append(job)
        if not jobs:  # another worker claimed them first
            return 0
        claimed = utcnow()
        for job in jobs:
            STAGE_SECONDS.labels("queue").observe((claimed - job.created_at).total_seconds())
        todo = [
            (path, [j for j in held if j.id not in known]) for path, held in images.values()
        ]
        todo = [(path, held) for path, held in todo if held]
        if todo:
            requests = [
                Request(path, tuple(self.models.loaded[j.model_sha256] for j in held))  # type: ignore[index]
                for path, held in todo
            ]
            started = time.perf_counter()
            outcomes = list(self.engine.run(requests))
            INFERENCE_SECONDS.observe(time.perf_counter() - started)
            BATCH_SIZE.observe(len(todo))
            for (_, held), outcome in zip(todo, outcomes, strict=True):
                for stage, seconds in outcome.seconds.items():
                    STAGE_SECONDS.labels(stage).observe(seconds)
                for job in held:
                    age = outcome.ages.get(job.model_sha256 or "")
                    if outcome.error is not None or outcome.header is None or age is None:
                        self._fail(job, outcome.error or "not a DICOM file")
                    else:
                        self._record(job, outcome.header, age)
        for path, held in images.values():
            reuse = [job for job in held if job.id in known]
            if reuse:
                header = read_header(path)
                for job in reuse:
                    self._record(job, header, known[job.id])
        return len(jobs)

    def _record(self, job: Job, header: Dataset, age: float) -> None:
        """Store a model's age; the live model's also makes the reports."""
        model = self.models.loaded[job.model_sha256]  # type: ignore[index]
        findings = Findings(age, chronological_age(header), model.card)
        if self._inferred(job, identity(model), findings):
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

    def _inferred(self, claimed: Job, model: ModelIdentity, f: Findings) -> bool:
        """Commit the model's output before any report is built, so a crash from here on does
        not run the model again. True when the reports are to be made: the job is still ours
        and its model is live now (a shadow's job ends here, its result stored)."""
        with self.db.session() as s:
            held = self._held(s, claimed.id)
            if held is None:
                return False
            live = is_live(s, held.model_sha256)
            ages = Ages(f.xray_age, f.chronological_age, f.age_gap, f.corrected_age_gap)
            record_inferred(s, held.instance, model, ages, live=live)
            if not live:
                INFERRED.labels("shadow").inc()
                finish_job(s, held)
        return live

    def _report(self, claimed: Job, header: Dataset, findings: Findings) -> None:
        sha = findings.card.sha256
        with self.db.session() as s:
            calling_ae = s.get_one(Instance, claimed.instance_id).calling_ae
            if self.reports.section.secondary_capture:  # the summary image plots the earlier
                earlier = earlier_ages(s, claimed.instance_id, sha)
                findings = replace(
                    findings,
                    study_date=parse_da(header.get("StudyDate")),
                    earlier=tuple(EarlierAge(*row) for row in earlier),
                )
        facts = ImageFacts(calling_ae, header.get("StationName"), not findings.card.untrained)
        routing = route(self.reports.destinations, facts)
        section, ae_title = self.reports.section, self.reports.ae_title
        try:
            built = build_reports(header, findings, section, ae_title, routing.ehr_kinds)
        except ValueError as e:  # highdicom's validation of what the source header gave it
            self._fail(
                claimed,
                f"report cannot be built: {e}",
                f"report cannot be built ({type(e).__name__}; the reason is in the database)",
            )
            return
        if built.unbuilt:
            routing.drop(built.unbuilt)
            log.warning(
                "instance %d: %s not built; its destinations are skipped (the reason is in the "
                "audit log)", claimed.instance_id, ", ".join(sorted(built.unbuilt)),
            )  # fmt: skip
        try:
            stored = []
            for obj in built.objects:
                path = self.store.store_report(obj.sop_instance_uid, obj.data, obj.suffix)
                stored.append(StoredObject(obj.kind, obj.sop_instance_uid, str(path)))
        except OSError as e:
            self._fail(claimed, f"report cannot be stored: {e}")
            return
        with self.db.session() as s:
            held = self._held(s, claimed.id)
            if held is None:
                return
            INFERRED.labels("reported").inc()
            record_reports(s, held.instance, sha, stored, routing.takes, routing.summary())
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
