"""The inference worker: queued jobs -> model -> result -> SR (+ SC) -> deliveries.

One thread per process holds the model, loaded once. Jobs are claimed in batches under a lease;
if the process dies, the lease expires and the jobs are claimed again. Every step is idempotent:
results are unique per (instance, model SHA-256), report UIDs are derived from the same pair,
and deliveries are unique per (object, destination), so redoing a job replaces, never doubles.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import torch
from pydicom.dataset import Dataset
from sqlalchemy import select

from ai import AgeModel, PreprocessError, load_dataset, preprocess
from node.capture import build_sc
from node.config import Settings
from node.findings import Findings
from node.patient_age import chronological_age
from node.report import build_sr
from node.uids import ReportUIDs
from node.worker_thread import WorkerThread
from storage import (
    Database,
    Delivery,
    DeliveryState,
    FileStore,
    InstanceState,
    Job,
    JobState,
    Result,
    record_event,
)
from storage.queue import claim_jobs

log = logging.getLogger("xrayage.pipeline")

LEASE = dt.timedelta(minutes=5)


@dataclass
class _Prepared:
    job: Job
    header: Dataset
    tensor: torch.Tensor


class InferenceWorker(WorkerThread):
    idle_seconds = 2.0

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: FileStore,
        model: AgeModel,
        on_reported: Callable[[], None] | None = None,
    ) -> None:
        super().__init__("xrayage-infer")
        self.on_reported = on_reported or (lambda: None)
        self.settings = settings
        self.db = db
        self.store = store
        self.model = model
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def run_once(self) -> int:
        """Claim and process one batch; returns how many jobs were claimed."""
        with self.db.session() as s:
            jobs = claim_jobs(s, self.owner, self.settings.model.batch_size, LEASE)
            for job in jobs:
                s.refresh(job, ["instance"])
        if not jobs:
            return 0
        prepared = [p for job in jobs if (p := self._prepare(job)) is not None]
        if prepared:
            ages = self.model.predict(torch.stack([p.tensor for p in prepared]))
            for p, age in zip(prepared, ages, strict=True):
                self._report(p, age)
        return len(jobs)

    def _fail(self, job: Job, reason: str) -> None:
        log.warning("job %d failed: %s", job.id, reason)
        with self.db.session() as s:
            job = s.get_one(Job, job.id)
            job.state, job.error = JobState.FAILED, reason
            inst = job.instance
            inst.state, inst.reason = InstanceState.FAILED, reason
            record_event(s, "failed", outcome="failure", instance=inst, detail=reason)

    def _prepare(self, job: Job) -> _Prepared | None:
        try:
            ds = load_dataset(Path(job.instance.path))
            tensor = preprocess(ds, self.model.card.input_size)
        except PreprocessError as e:
            self._fail(job, str(e))
            return None
        del ds.PixelData  # the report needs the header only
        return _Prepared(job, ds, tensor)

    def _report(self, p: _Prepared, age: float) -> None:
        card = self.model.card
        findings = Findings(age, chronological_age(p.header), card)
        uids = ReportUIDs(p.header.SOPInstanceUID, card.sha256)
        rep = self.settings.report
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # highdicom on odd source names
                sr = build_sr(
                    p.header,
                    findings,
                    uids,
                    self.settings.node.ae_title,
                    rep.sr_series_number,
                    rep.institution_name,
                )
                sc = (
                    build_sc(p.header, findings, uids, rep.sc_series_number)
                    if rep.secondary_capture
                    else None
                )
            objects = [(uids.sr_instance, _encode(sr))]
            if sc is not None:
                objects.append((uids.sc_instance, _encode(sc)))
            paths = [self.store.store_report(uid, data) for uid, data in objects]
        except (ValueError, TypeError, AttributeError) as e:  # highdicom validation errors
            self._fail(p.job, f"report cannot be built: {e}")
            return
        except OSError as e:
            self._fail(p.job, f"report cannot be stored: {e}")
            return

        with self.db.session() as s:
            job = s.get_one(Job, p.job.id)
            inst = job.instance
            result = s.scalar(
                select(Result).where(
                    Result.instance_id == inst.id, Result.model_sha256 == card.sha256
                )
            )
            if result is None:
                result = Result(
                    instance_id=inst.id,
                    model_sha256=card.sha256,
                    model_name=card.name,
                    model_version=card.version,
                    xray_age=age,
                )
                s.add(result)
            result.xray_age = age
            result.chronological_age = findings.chronological_age
            result.sr_sop_instance_uid, result.sr_path = uids.sr_instance, str(paths[0])
            if sc is not None:
                result.sc_sop_instance_uid, result.sc_path = uids.sc_instance, str(paths[1])
            record_event(
                s,
                "inferred",
                instance=inst,
                detail=f"x-ray age {age} a, model {card.name} {card.version} sha256 {card.sha256}",
            )
            inst.state, inst.reason = InstanceState.REPORTED, None
            record_event(s, "reported", instance=inst, detail=f"SR {uids.sr_instance}")
            for dest in self.settings.destinations:
                for (uid, _), path in zip(objects, paths, strict=True):
                    known = s.scalar(
                        select(Delivery).where(
                            Delivery.sop_instance_uid == uid, Delivery.destination == dest.name
                        )
                    )
                    if known is None:
                        s.add(
                            Delivery(
                                instance_id=inst.id,
                                destination=dest.name,
                                sop_instance_uid=uid,
                                path=str(path),
                                state=DeliveryState.PENDING,
                            )
                        )
            job.state, job.lease_until = JobState.DONE, None
        self.on_reported()


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
