"""Retro-scans run: find the archive's chest radiographs that this model has not reported and
fetch them, with ``[retro] max_concurrent_moves`` retrievers, each holding one association for
study after study, within a night's window and image budget.

The client is :mod:`node.retro.archive`, the plan :mod:`node.retro.plan`. The scan's studies
are its cursor in the database (:mod:`storage.scans`): a study is marked done only once all of
it was handled, so a scan stopped by the window's end, the nightly image budget or a crash
resumes with the studies left, and fetches nothing twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pynetdicom.association import Association

from node.config import GateSection, RetroSection
from node.retro.archive import MODALITIES, Archive, ArchiveError, StoreHandler
from node.retro.plan import (
    STUDIES_PER_RETRIEVE,
    SeriesPlan,
    SeriesToList,
    outline_study,
    partial_listing,
    wanted_instances,
)
from storage import Database
from storage.owners import this_process
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


@dataclass(frozen=True)
class StudyPlan:
    """A study's series plans, and whether the whole study is wanted (``study_size`` images)."""

    series: list[SeriesPlan]
    whole_study: bool
    study_size: int


class RetroScanner:
    """Scans ``[retro] peer`` for the frontal chest radiographs (``[gate] body_parts``) that
    the model ``model_sha256`` has not reported, and fetches them to ``own_ae``."""

    def __init__(
        self,
        *,
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
        self.archive = Archive(retro=retro, own_ae=own_ae, store_handler=store_handler)
        self.on_progress = on_progress or (lambda *_: None)
        me = this_process()
        self.host, self.owner = me.host, str(me)
        self.stopping = threading.Event()

    # -- planning: the archive's answers and the database, through node.retro.plan ---------
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

    def plan_study(self, assoc: Association, study_uid: str, study_date: str | None) -> StudyPlan:
        """The series of a study that may hold frontal chest radiographs, triaged."""
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
        outline = outline_study(
            study_uid=study_uid, study_date=study_date, series=found,
            body_parts=self.body_parts, known=known,
        )  # fmt: skip
        plans = list(outline.whole_series)
        for series in outline.to_list:
            plan = self.plan_series(assoc, study_uid, study_date, series)
            if plan is not None:
                plans.append(plan)
        return StudyPlan(plans, outline.whole_study, outline.study_size)

    def plan_series(
        self, assoc: Association, study_uid: str, study_date: str | None, series: SeriesToList
    ) -> SeriesPlan | None:
        """A series planned from its IMAGE-level list (None: nothing in it to fetch)."""
        images, complete = self.archive.find(
            assoc, "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series.series_uid,
            SOPInstanceUID="", SOPClassUID="",
        )  # fmt: skip
        partial = partial_listing(
            study_uid=study_uid, study_date=study_date, series=series, images=images,
            complete=complete,
        )  # fmt: skip
        if partial is not None:
            return partial
        wanted = wanted_instances(images)
        if not wanted:
            return None
        with self.db.session() as s:
            fetch, done, again = triage(s, wanted, self.model_sha256)
            return SeriesPlan(
                study_uid=study_uid, study_date=study_date, series_uid=series.series_uid,
                fetch=fetch, already_done=done, again=[i.id for i in again],
            )  # fmt: skip

    def dry_run(self, date_from: dt.date, date_to: dt.date) -> list[SeriesPlan]:
        """What a scan of these dates would do, changing nothing."""
        plans: list[SeriesPlan] = []
        with self.archive.association() as assoc:
            studies = self.find_studies(assoc, date_from, date_to)
            for i, (uid, date) in enumerate(studies, 1):
                plans.extend(self.plan_study(assoc, uid, date).series)
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
                gathered: list[tuple[RetroStudy, int]] = []
                with self.archive.association() as assoc:
                    while True:
                        with lock:
                            study = next(studies, None)
                        why = None if study is None else self._stop_reason(budget, deadline)
                        if study is None or why or len(gathered) == STUDIES_PER_RETRIEVE:
                            if not why and not self._retrieve_whole(assoc, gathered, budget, tally):
                                stopped.append("nightly image budget spent")
                            gathered = []  # after a stop they stay pending, to resume
                        if why:
                            stopped.append(why)
                        if study is None or why:
                            return
                        plan = self.plan_study(assoc, study.study_instance_uid, study.study_date)
                        if plan.whole_study:
                            gathered.append((study, plan.study_size))
                            continue
                        got, complete = self._study(assoc, study, budget, plan.series)
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
            plans = self.plan_study(assoc, study.study_instance_uid, study.study_date).series
        for planned in plans:
            plan: SeriesPlan | None = planned
            if planned.listed is None and planned.series_size and budget.left < planned.count:
                # Tonight's budget cannot take the whole series: list it, to fetch part of it.
                plan = self.plan_series(
                    assoc, planned.study_uid, planned.study_date,
                    SeriesToList(series_uid=planned.series_uid, size=planned.series_size),
                )  # fmt: skip
                if plan is None:
                    continue
            done += plan.already_done
            if plan.again:
                with self.db.session() as s:
                    requeue(s, plan.again, "retro-scan")
                again += len(plan.again)
            granted = budget.take(plan.count, all_or_none=bool(plan.series_size))
            if granted:
                uids = None if plan.series_size else plan.fetch[:granted]
                ok, bad = self.archive.retrieve(assoc, plan.study_uid, plan.series_uid, uids)
                with self.db.session() as s:
                    count_retrieved(s, study.id, ok, bad)
                fetched += ok
                if plan.listed is not None:
                    notes.append(
                        f"series {plan.series_uid}: the archive listed {plan.listed} of "
                        f"{plan.series_size}+ instances; retrieved whole"
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
