"""Retro-scans: find the archive's chest radiographs that this model has not reported, fetch them.

Query/Retrieve, Study Root (PS3.4 Annex C): C-FIND at STUDY level for studies in a date range
with CR or DX among their modalities (range matching on StudyDate, C.2.2.2.5; ModalitiesInStudy
is matched by the peers that support it, and the SERIES level filters again), then SERIES
(Modality, BodyPartExamined, NumberOfSeriesRelatedInstances). A study of which the node holds
nothing, all of whose series are chest CR/DX, is wanted whole: such studies are retrieved
together, up to 32 in one STUDY-level request with a list of UIDs (C.4.2.2.1), with no
IMAGE-level query; a chest series of such a study beside other series is retrieved at SERIES
level. Otherwise IMAGE (SOP Instance and Class UIDs) says what is missing, retrieved at IMAGE
level with a list of UIDs. Retrieval is a C-MOVE to this node's own AE
title, so the images arrive through the receive path like any routed one, or a C-GET on the
query association for peers that cannot route back; either way they are marked ``retro``.
``[retro] max_concurrent_moves`` retrievers each hold one association for study after study.

The scan's studies are its cursor in the database (:mod:`storage.scans`): a study is marked done
only once all of it was handled, so a scan stopped by the window's end, the nightly image budget
or a crash resumes with the studies left, and fetches nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import GateSection, Peer, RetroSection
from node.dicom.scu import on_connect
from node.dicom.statuses import CANCEL, MATCH_PENDING, SUCCESS
from node.dicom.tls import client_context
from storage import Database
from storage.scans import (
    ScanState,
    close_scan,
    count_retrieved,
    list_studies,
    open_scan,
    pending_studies,
    requeue,
    resumable_scans,
    study_done,
    study_known,
    take_over,
    triage,
)
from storage.tables import RetroScan, RetroStudy

log = logging.getLogger("xrayage.retro")

MODALITIES = ("CR", "DX")
# What the gate can pass: DX For Processing and everything else is left in the archive.
RETRIEVED_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation)
# PS3.4 C.4.2.1.5 / C.4.3.1.5: the failure statuses a peer gives for a whole retrieve.
RETRIEVE_FAILURES = {
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown: the peer must know this node's AE title and address",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
}


class ArchiveError(Exception):
    """The query/retrieve peer could not be reached or refused a request."""


StoreHandler = Callable[[evt.Event], int]


class Archive:
    """The query/retrieve peer, seen through Study Root C-FIND and C-MOVE or C-GET."""

    def __init__(
        self, retro: RetroSection, own_ae: str, store_handler: StoreHandler | None = None
    ) -> None:
        if retro.peer is None:
            raise ValueError("no [retro] peer configured")
        self.peer: Peer = retro.peer
        self.own_ae = own_ae
        self.use_get = retro.retrieve == "get"
        self.store_handler = store_handler
        self.timeout = retro.timeout_seconds
        self.tls = client_context(self.peer.tls, self.peer.host) if self.peer.tls else None

    @contextmanager
    def association(self) -> Iterator[Association]:
        ae = AE(ae_title=self.own_ae)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = self.timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        roles, handlers = [], [(evt.EVT_CONN_OPEN, on_connect)]
        if self.use_get:
            if self.store_handler is None:
                raise ValueError("C-GET needs a store handler")
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for sop_class in RETRIEVED_CLASSES:
                ae.add_requested_context(sop_class)
                roles.append(build_role(sop_class, scp_role=True))
            handlers.append((evt.EVT_C_STORE, self.store_handler))
        else:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        peer = self.peer
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
            evt_handlers=handlers, tls_args=self.tls,
        )  # fmt: skip
        if not assoc.is_established:
            raise ArchiveError(
                f"no association with {peer.ae_title}@{peer.host}:{peer.port} "
                "(refused, or not reachable)"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def find(self, assoc: Association, level: str, **keys: str) -> tuple[list[Dataset], bool]:
        """The matches, and whether they are all of them: a peer that stops at its result limit
        ends with Cancel (0xFE00, "matching terminated", PS3.4 C.4.1.1.4) after the matches it
        sent (Orthanc's ``LimitFindResults``/``LimitFindInstances``, DCMTK's ``--max-results``).
        """
        query = self._query(assoc, level, keys)
        matches = []
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise ArchiveError(f"C-FIND at {level} level: no response (timed out)")
            if code in MATCH_PENDING and identifier is not None:
                matches.append(identifier)
            elif code == CANCEL and matches:
                return matches, False
            elif code != SUCCESS:
                raise ArchiveError(f"C-FIND at {level} level failed: status 0x{code:04X}")
        return matches, True

    def retrieve(
        self, assoc: Association, study_uid: str, series_uid: str, sop_uids: list[str] | None
    ) -> tuple[int, int]:
        """Fetch these instances, or the whole series (``sop_uids`` None); returns how many
        arrived and how many failed."""
        if sop_uids is None:
            return self._retrieve(assoc, "SERIES", StudyInstanceUID=study_uid,
                                  SeriesInstanceUID=series_uid)  # fmt: skip
        ok, _ = self._retrieve(
            assoc, "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
            SOPInstanceUID=sop_uids,
        )  # fmt: skip
        return ok, len(sop_uids) - ok

    def retrieve_studies(self, assoc: Association, study_uids: list[str]) -> tuple[int, int]:
        """Fetch whole studies with one request (a list of UIDs at STUDY level, PS3.4
        C.4.2.2.1): one association from the archive for all of them, as ``movescu`` gets."""
        return self._retrieve(assoc, "STUDY", StudyInstanceUID=study_uids)

    def _query(self, assoc: Association, level: str, keys: dict[str, str | list[str]]) -> Dataset:
        """The identifier; ArchiveError if the association was ended meanwhile (by the peer,
        or by a network timeout): pynetdicom would raise RuntimeError on it."""
        if not assoc.is_established:
            peer = self.peer
            raise ArchiveError(
                f"the association with {peer.ae_title}@{peer.host}:{peer.port} ended "
                "(closed by the archive, or the network timed out)"
            )
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        return query

    def _retrieve(self, assoc: Association, level: str, **keys: str | list[str]) -> tuple[int, int]:
        query = self._query(assoc, level, keys)
        responses = (
            assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if self.use_get
            else assoc.send_c_move(query, self.own_ae, StudyRootQueryRetrieveInformationModelMove)
        )
        final = None
        for status, _ in responses:
            final = status
        code = getattr(final, "Status", None)
        what = "C-GET" if self.use_get else "C-MOVE"
        if code is None:
            raise ArchiveError(f"{what}: no response (timed out)")
        done = int(final.get("NumberOfCompletedSuboperations", 0))  # type: ignore[union-attr]
        warned = int(final.get("NumberOfWarningSuboperations", 0))  # type: ignore[union-attr]
        refused = (code & 0xF000) in (0xA000, 0xC000) and done + warned == 0
        if code in RETRIEVE_FAILURES or refused:
            raise ArchiveError(
                f"{what} refused: 0x{code:04X} {RETRIEVE_FAILURES.get(code, 'unable to process')}"
            )
        return done + warned, int(final.get("NumberOfFailedSuboperations", 0))  # type: ignore[union-attr]


@dataclass
class SeriesPlan:
    """What a scan does with one series of the archive."""

    study_uid: str
    study_date: str | None
    series_uid: str
    fetch: list[str]
    already_done: int
    again: list[int]  # instances reported by another model: queued again from the stored file
    # Retrieved at SERIES level, ``whole`` instances at least, the gate sorting them: when the
    # node holds nothing of the study (no need to list the instances), or when the archive
    # listed fewer than the series holds (``listed``: its C-FIND result limit).
    whole: int = 0
    listed: int | None = None

    @property
    def count(self) -> int:
        """Instances this plan fetches."""
        return self.whole or len(self.fetch)


@dataclass
class Budget:
    """Images a run may still fetch (``[retro] max_images_per_night``), shared by its threads."""

    left: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, wanted: int, all_or_none: bool = False) -> int:
        """How many of ``wanted`` images may be fetched (none when ``all_or_none`` and fewer)."""
        with self.lock:
            granted = min(wanted, max(self.left, 0))
            if all_or_none and granted < wanted:
                return 0
            self.left -= granted
            return granted

    def give(self, images: int) -> None:
        """Give back images taken but not fetched."""
        with self.lock:
            self.left += images


Progress = Callable[[int, int, int], None]  # studies done, studies in the scan, images fetched
# Studies wanted whole that one STUDY-level retrieve asks for: one association from the archive
# for all of them (a C-MOVE), where one retrieve per study costs one each.
STUDIES_PER_RETRIEVE = 32


class RetroScanner:
    """Scans ``[retro] peer`` for the frontal chest radiographs (``[gate] body_parts``) that
    the model ``model_sha256`` has not reported, and fetches them to ``own_ae``."""

    def __init__(
        self,
        retro: RetroSection,
        gate: GateSection,
        own_ae: str,
        db: Database,
        model_sha256: str,
        store_handler: StoreHandler | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.retro = retro
        self.body_parts = {b.upper() for b in gate.body_parts}
        self.db = db
        self.model_sha256 = model_sha256
        self.archive = Archive(retro, own_ae, store_handler)
        self.on_progress = on_progress or (lambda *_: None)
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}"
        self.stopping = threading.Event()

    # -- planning ---------------------------------------------------------------------------
    def find_studies(
        self, assoc: Association, date_from: dt.date, date_to: dt.date
    ) -> list[tuple[str, str | None]]:
        found, complete = self.archive.find(
            assoc, "STUDY",
            StudyDate=f"{date_from:%Y%m%d}-{date_to:%Y%m%d}",
            ModalitiesInStudy="\\".join(MODALITIES),
            StudyInstanceUID="",
        )  # fmt: skip
        if not complete:
            raise ArchiveError(
                f"the archive ended the study list at {len(found)} studies (its C-FIND result "
                "limit): scan fewer days at a time"
            )
        return sorted(
            {(str(d.StudyInstanceUID), str(d.get("StudyDate") or "") or None) for d in found},
            key=lambda s: (s[1] or "", s[0]),
        )

    def plan_study(
        self, assoc: Association, study_uid: str, study_date: str | None
    ) -> tuple[list[SeriesPlan], bool]:
        """The series of a study that may hold frontal chest radiographs, triaged; and whether
        the study is wanted whole (the node holds nothing of it, and every series is one to
        fetch whole)."""
        body_parts = self.body_parts
        plans = []
        with self.db.session() as s:
            known = study_known(s, study_uid)
        found, complete = self.archive.find(
            assoc, "SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
            Modality="", BodyPartExamined="", NumberOfSeriesRelatedInstances="",
        )  # fmt: skip
        if not complete:  # which series are missing cannot be known: said, not guessed
            raise ArchiveError(
                f"the archive ended the series list of study {study_uid} at {len(found)} series "
                "(its C-FIND result limit): raise that limit"
            )
        whole = not known and bool(found)
        for series in found:
            body_part = str(series.get("BodyPartExamined") or "").upper()
            if series.get("Modality") not in MODALITIES or (
                body_part and body_part not in body_parts
            ):
                whole = False
                continue  # no body part: fetched, and the gate decides from the full header
            series_uid = str(series.SeriesInstanceUID)
            count = str(series.get("NumberOfSeriesRelatedInstances") or "").strip()  # optional
            size = int(count) if count.isdigit() else None
            if not known and size:
                # Every instance is wanted (nothing of the study is here, nothing can be fetched
                # twice): one SERIES-level retrieve, no IMAGE-level C-FIND.
                plans.append(SeriesPlan(study_uid, study_date, series_uid, [], 0, [], size))
                continue
            whole = False
            plan = self.plan_series(assoc, study_uid, study_date, series_uid, size)
            if plan is not None:
                plans.append(plan)
        return plans, whole

    def plan_series(
        self,
        assoc: Association,
        study_uid: str,
        study_date: str | None,
        series_uid: str,
        size: int | None,
    ) -> SeriesPlan | None:
        """A series planned from its IMAGE-level list (None: nothing in it to fetch)."""
        images, complete = self.archive.find(
            assoc, "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
            SOPInstanceUID="", SOPClassUID="",
        )  # fmt: skip
        if not complete or (size is not None and len(images) < size):
            whole = max(size or 0, len(images))
            return SeriesPlan(study_uid, study_date, series_uid, [], 0, [], whole, len(images))
        wanted = [
            str(i.SOPInstanceUID)
            for i in images
            if i.get("SOPClassUID") in (None, "", *RETRIEVED_CLASSES)
        ]
        if not wanted:
            return None
        with self.db.session() as s:
            fetch, done, again = triage(s, wanted, self.model_sha256)
            return SeriesPlan(study_uid, study_date, series_uid, fetch, done, [i.id for i in again])

    def dry_run(self, date_from: dt.date, date_to: dt.date) -> list[SeriesPlan]:
        """What a scan of these dates would do, changing nothing."""
        plans: list[SeriesPlan] = []
        with self.archive.association() as assoc:
            studies = self.find_studies(assoc, date_from, date_to)
            for i, (uid, date) in enumerate(studies, 1):
                plans.extend(self.plan_study(assoc, uid, date)[0])
                self.on_progress(i, len(studies), 0)
        return plans

    # -- running ----------------------------------------------------------------------------
    def start(self, trigger: str, date_from: dt.date, date_to: dt.date) -> int:
        with self.db.session() as s:
            return open_scan(s, trigger, date_from, date_to, self.model_sha256, self.owner).id

    def resumable(self) -> list[int]:
        with self.db.session() as s:
            return [scan.id for scan in resumable_scans(s, self.host)]

    def resume(self, scan_id: int, actor: str) -> None:
        with self.db.session() as s:
            take_over(s, s.get_one(RetroScan, scan_id), self.owner, actor)

    def run(
        self, scan_id: int, actor: str, budget: Budget, deadline: dt.datetime | None
    ) -> RetroScan:
        """Work through a scan's pending studies until done, or until the deadline, the budget or
        a stop; the scan is then finished or paused (and resumable)."""
        fetched = 0
        try:
            with self.db.session() as s:
                scan = s.get_one(RetroScan, scan_id)
                planned, date_from, date_to = scan.planned, scan.date_from, scan.date_to
            if not planned:
                with self.archive.association() as assoc:
                    studies = self.find_studies(assoc, date_from, date_to)
                with self.db.session() as s:
                    list_studies(s, scan_id, studies)
            with self.db.session() as s:
                pending = pending_studies(s, scan_id)
                total = len(s.get_one(RetroScan, scan_id).studies)
            done = total - len(pending)
            self.on_progress(done, total, 0)
            stopped: list[str] = []
            lock = threading.Lock()
            studies = iter(pending)

            def tally(got: int, complete: int) -> None:
                nonlocal done, fetched
                with lock:
                    fetched += got
                    done += complete
                    self.on_progress(done, total, fetched)

            def work() -> None:
                """One retriever: one association, reused for study after study; studies
                wanted whole are gathered and fetched STUDIES_PER_RETRIEVE at a time."""
                whole: list[tuple[RetroStudy, int]] = []
                with self.archive.association() as assoc:
                    while True:
                        with lock:
                            study = next(studies, None)
                        why = None if study is None else self._stop_reason(budget, deadline)
                        if study is None or why or len(whole) == STUDIES_PER_RETRIEVE:
                            if not why and not self._retrieve_whole(assoc, whole, budget, tally):
                                stopped.append("nightly image budget spent")
                            whole = []  # after a stop they stay pending, to resume
                        if why:
                            stopped.append(why)
                        if study is None or why:
                            return
                        plans, wanted_whole = self.plan_study(
                            assoc, study.study_instance_uid, study.study_date
                        )
                        if wanted_whole:
                            whole.append((study, sum(p.whole for p in plans)))
                            continue
                        got, complete = self._study(assoc, study, budget, plans)
                        tally(got, complete)
                        if not complete:
                            stopped.append("nightly image budget spent")

            workers = min(self.retro.max_concurrent_moves, len(pending))
            with ThreadPoolExecutor(max(workers, 1)) as pool:
                futures = [pool.submit(work) for _ in range(workers)]
                try:
                    for future in futures:
                        future.result()
                except KeyboardInterrupt:  # Ctrl-C on `xrayage rescan`: pause, resumable
                    self.stopping.set()
                    for future in futures:
                        future.result()
            state, why, ok = (
                (ScanState.PAUSED, stopped[0], True)
                if stopped
                else (ScanState.FINISHED, "done", True)
            )
        except ArchiveError as e:
            log.warning("retro-scan %d: %s", scan_id, e)
            state, why, ok = ScanState.PAUSED, f"archive: {e}", False
        with self.db.session() as s:
            return close_scan(s, scan_id, state, why, actor, ok=ok)

    def _stop_reason(self, budget: Budget, deadline: dt.datetime | None) -> str | None:
        if self.stopping.is_set():
            return "stopped"
        if deadline is not None and dt.datetime.now(dt.UTC) >= deadline:
            return "window ended"
        if budget.left <= 0:
            return "nightly image budget spent"
        return None

    def _retrieve_whole(
        self,
        assoc: Association,
        batch: list[tuple[RetroStudy, int]],
        budget: Budget,
        tally: Callable[[int, int], None],
    ) -> bool:
        """Fetch studies wanted whole (with their sizes) in one STUDY-level retrieve, as many as
        tonight's budget takes whole; the rest, or all of them if the archive reports a failure
        (which study lacks what, it does not say), study by study. Whether all were handled."""
        fits, rest = [], []
        for study, size in batch:
            (fits if budget.take(size, all_or_none=True) else rest).append((study, size))
        if fits:
            expected = sum(size for _, size in fits)
            ok, bad = self.archive.retrieve_studies(assoc, [s.study_instance_uid for s, _ in fits])
            if bad == 0 and ok >= expected:
                with self.db.session() as s:
                    for study, size in fits:
                        count_retrieved(s, study.id, size, 0)
                        study_done(s, study.id, 0, None)
                tally(ok, len(fits))
            else:  # planned again one by one: what did arrive is known to the node now
                budget.give(max(expected - ok, 0))
                rest = fits + rest
        complete = True
        for study, _ in rest:
            got, handled = self._study(assoc, study, budget)
            tally(got, handled)
            complete = complete and handled
        return complete

    def _study(
        self,
        assoc: Association,
        study: RetroStudy,
        budget: Budget,
        plans: list[SeriesPlan] | None = None,
    ) -> tuple[int, bool]:
        """Fetch what a study lacks; returns the images fetched and whether all of it was handled
        (only then is the study marked done)."""
        fetched = done = again = 0
        notes = []
        if plans is None:
            plans, _ = self.plan_study(assoc, study.study_instance_uid, study.study_date)
        for planned in plans:
            plan: SeriesPlan | None = planned
            if planned.listed is None and planned.whole and budget.left < planned.whole:
                # Tonight's budget cannot take the whole series: list it, to fetch part of it.
                plan = self.plan_series(
                    assoc, planned.study_uid, planned.study_date, planned.series_uid,
                    planned.whole,
                )  # fmt: skip
                if plan is None:
                    continue
            done += plan.already_done
            if plan.again:
                with self.db.session() as s:
                    requeue(s, plan.again, "retro-scan")
                again += len(plan.again)
            granted = budget.take(plan.count, all_or_none=bool(plan.whole))
            if granted:
                uids = None if plan.whole else plan.fetch[:granted]
                ok, bad = self.archive.retrieve(assoc, plan.study_uid, plan.series_uid, uids)
                with self.db.session() as s:
                    count_retrieved(s, study.id, ok, bad)
                fetched += ok
                if plan.listed is not None:
                    notes.append(
                        f"series {plan.series_uid}: the archive listed {plan.listed} of "
                        f"{plan.whole}+ instances; retrieved whole"
                    )
                if bad:
                    notes.append(f"series {plan.series_uid}: {bad} not retrieved")
            if granted < plan.count:
                return fetched, False
        if again:
            notes.insert(0, f"{again} queued again from the store")
        with self.db.session() as s:
            study_done(s, study.id, done, "; ".join(notes) or None)
        return fetched, True

    def nightly(self) -> None:
        """The scheduled run: resume what earlier nights left, then scan the last ``days_back``
        days, all within tonight's window and image budget."""
        retro = self.retro
        now = dt.datetime.now().astimezone()
        deadline = next_at(now, retro.window_end)
        budget = Budget(retro.max_images_per_night)
        for scan_id in self.resumable():
            self.resume(scan_id, "schedule")
            if self.run(scan_id, "schedule", budget, deadline).state != ScanState.FINISHED:
                return
        today = now.date()
        scan_id = self.start("schedule", today - dt.timedelta(days=retro.days_back - 1), today)
        self.run(scan_id, "schedule", budget, deadline)


def next_at(after: dt.datetime, at: dt.time) -> dt.datetime:
    """The first time of day ``at`` after ``after`` (in ``after``'s time zone)."""
    candidate = after.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return candidate if candidate > after else candidate + dt.timedelta(days=1)
