"""Retro-scans against a real Orthanc holding studies on several dates: chest and not chest, one
already reported by the node, one outside the dates asked for."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.config import load_settings
from node.retro.archive import ArchiveError
from node.retro.runner import Budget, RetroScanner
from node.schedule import detach
from node.service import NodeService
from storage import Database, Instance, InstanceState
from storage.scans import (
    count_retrieved,
    list_studies,
    open_scan,
    pending_studies,
    resumable_scans,
    study_done,
)
from storage.tables import RetroScan, ScanState
from tests.conftest import node_config, require, small_chests, storescu
from tests.servers import NodeProcess, Orthanc, free_port, wait_until
from tests.test_cli import run

DATES = "--from", "2026-11-01", "--to", "2026-11-30"


def _study(ds: pydicom.Dataset, folder: Path, date: str, patient: str, n: int) -> list[Path]:
    """A study of ``n`` small images (an eighth of the size) on ``date``, with fresh UIDs."""
    return small_chests(
        ds, folder, n, prefix=patient, StudyDate=date, SeriesDate=date, ContentDate=date,
        PatientID=patient, StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
    )  # fmt: skip


class Archive:
    def __init__(self, pacs: Orthanc, node_port: int, studies: dict[str, list[Path]]) -> None:
        self.pacs, self.node_port, self.studies = pacs, node_port, studies

    def uids(self, name: str) -> set[str]:
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.studies[name]
        }

    def retro(self, **extra: str) -> str:
        peer = f'ae_title = "{self.pacs.aet}", host = "127.0.0.1", port = {self.pacs.dicom_port}'
        keys = {
            "peer": f"{{ {peer} }}",
            "max_concurrent_moves": "1",
        } | extra
        return "\n".join(f"{k} = {v}" for k, v in keys.items())


@pytest.fixture(scope="module")
def archive(
    tmp_path_factory: pytest.TempPathFactory, chest_pa: Path, extremity: Path
) -> Iterator[Archive]:
    require("Orthanc")
    folder = tmp_path_factory.mktemp("archive")
    pacs = Orthanc(folder / "orthanc", free_port(), free_port())
    node_port = free_port()
    pacs.start(allowed={"XRAYAGE": "xrayage", "STORESCU": "storescu"}, ports={"XRAYAGE": node_port})
    chest, knee = pydicom.dcmread(chest_pa), pydicom.dcmread(extremity)
    studies = {
        "chest": _study(chest, folder, "20261110", "P-CHEST", 2),
        "knee": _study(knee, folder, "20261111", "P-KNEE", 1),
        "reported": _study(chest, folder, "20261112", "P-DONE", 1),
        "older": _study(chest, folder, "20261001", "P-OLD", 1),
    }
    pacs.upload(*(p for paths in studies.values() for p in paths))
    yield Archive(pacs, node_port, studies)
    pacs.stop()


def _instances(folder: Path) -> dict[str, Instance]:
    db = Database.sqlite_in(folder / "data")
    try:
        with db.session() as s:
            return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    finally:
        db.dispose()


def test_a_scan_fetches_only_unreported_chests_and_a_second_adds_none(
    tmp_path: Path, archive: Archive, weights: Path
) -> None:
    pacs = archive.pacs
    config = node_config(tmp_path, archive.node_port, weights, pacs, retro=archive.retro())
    node = NodeProcess(config, archive.node_port, tmp_path / "node.log")
    node.start()
    try:
        # One study reached the node the usual way and is reported already.
        assert storescu(archive.node_port, *archive.studies["reported"]).returncode == 0
        wait_until(lambda: len(pacs.sr_uids()) == 1, 120, "the routed image's SR")

        dry = run("rescan", *DATES, "--dry-run", "-c", str(config))
        assert dry.returncode == 0, dry.stderr
        assert "would fetch 2 instances from 1 series; 1 already done" in dry.stdout
        assert not [i for i in _instances(tmp_path).values() if i.origin == "retro"]

        first = run("rescan", *DATES, "-c", str(config))
        assert first.returncode == 0, first.stderr
        assert "finished (done): fetched 2, already done 1, failed 0" in first.stdout
        wait_until(lambda: len(pacs.sr_uids()) == 3, 120, "the two fetched images' SRs")
        fetched = {u for u, i in _instances(tmp_path).items() if i.origin == "retro"}
        assert fetched == archive.uids("chest")  # not the knee, not the October study
        assert archive.uids("knee").isdisjoint(_instances(tmp_path))

        second = run("rescan", *DATES, "-c", str(config))
        assert "fetched 0, already done 3, failed 0" in second.stdout, second.stdout
        assert len(pacs.sr_uids()) == 3

        events = json.loads(
            run("audit", "--event", "retro-scan", "-f", "json", "-c", str(config)).stdout
        )
        details = [e["detail"] for e in events]
        assert any(d.startswith("dry run") for d in details)
        assert sum("finished: done" in d for d in details) == 2
        assert all(e["actor"].startswith("cli:") for e in events)
    finally:
        node.stop()


def test_the_image_budget_pauses_a_c_get_scan_and_resume_continues_it(
    tmp_path: Path, archive: Archive, weights: Path
) -> None:
    """C-GET: this process receives; a budget of one image a night pauses the scan after each."""
    config = node_config(
        tmp_path, free_port(), weights, None,
        retro=archive.retro(retrieve='"get"', max_images_per_night="1"),
    )  # fmt: skip
    Database.sqlite_in(tmp_path / "data").create_schema()  # as a node's first start leaves it
    outputs = [run("rescan", *DATES, "-c", str(config)).stdout.strip().splitlines()[-1]]
    while "paused" in outputs[-1] and len(outputs) < 6:
        resumed = run("rescan", "--resume", "-c", str(config))
        outputs.append(resumed.stdout.strip().splitlines()[-1])
    assert outputs == [
        "scan 1 paused (nightly image budget spent): fetched 1, already done 0, failed 0",
        "scan 1 paused (nightly image budget spent): fetched 2, already done 0, failed 0",
        "scan 1 finished (done): fetched 3, already done 0, failed 0",
    ]
    retro = {u: i for u, i in _instances(tmp_path).items() if i.origin == "retro"}
    assert set(retro) == archive.uids("chest") | archive.uids("reported")
    assert all(i.state == InstanceState.QUEUED for i in retro.values())  # no node running here


def test_a_scan_left_running_by_a_dead_process_is_resumable(tmp_path: Path) -> None:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    with db.session() as s:
        for owner in ("host:111", "host:222", "other:333"):
            s.add(
                RetroScan(
                    trigger="schedule",
                    date_from=dt.date(2026, 11, 1),
                    date_to=dt.date(2026, 11, 2),
                    model_sha256="x",
                    state=ScanState.RUNNING,
                    owner=owner,
                )
            )
    with db.session() as s:
        found = resumable_scans(s, "host", alive=lambda pid: pid == 222)
        assert [scan.owner for scan in found] == ["host:111"]


def test_a_run_missed_while_the_node_was_down_runs_once_after_restart(
    tmp_path: Path, archive: Archive, weights: Path
) -> None:
    settings = load_settings(
        None,
        node={"host": "127.0.0.1", "port": free_port()},
        storage={"path": tmp_path / "data"},
        model={"weights": str(weights), "device": "cpu"},
        retro={
            "peer": {
                "ae_title": archive.pacs.aet,
                "host": "127.0.0.1",
                "port": archive.pacs.dicom_port,
            },
            "retrieve": "get",
            "days_back": 36500,
        },
    )

    def scheduled_scans(service: NodeService) -> list[RetroScan]:
        with service.db.session() as s:
            return list(s.scalars(select(RetroScan).where(RetroScan.trigger == "schedule")))

    service = NodeService(settings)
    service.start()
    nightly = service.scheduler.next_run("retro-scan")
    assert nightly is not None and (nightly.hour, nightly.minute) == (22, 0)
    service.stop()

    # While the node is down, tonight's run comes due: move the stored run into the past.
    offline = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=settings.database_url)}
    )
    offline.start(paused=True)
    offline.modify_job(
        "retro-scan", next_run_time=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    )
    detach(offline)
    offline.shutdown()

    service = NodeService(settings)
    service.start()
    try:
        scans = wait_until(
            lambda: [s for s in scheduled_scans(service) if s.state == ScanState.FINISHED],
            120, "the missed scan to run",
        )  # fmt: skip
        assert scans[0].fetched == 4  # every chest image: days_back covers them all
        assert service.scheduler.next_run("retro-scan") == nightly
    finally:
        service.stop()

    service = NodeService(settings)
    service.start()
    try:
        wait_until(
            lambda: service.scheduler.next_run("retro-scan") is not None, 10, "the scheduler"
        )
        assert len(scheduled_scans(service)) == 1  # not run again
    finally:
        service.stop()


def test_an_unreachable_archive_or_a_stopped_node_is_said_plainly(
    tmp_path: Path, weights: Path
) -> None:
    closed = free_port()
    peer = f'peer = {{ ae_title = "PACS", host = "127.0.0.1", port = {closed} }}'
    Database.sqlite_in(tmp_path / "move" / "data").create_schema()
    moving = node_config(tmp_path / "move", free_port(), weights, None, retro=peer)
    out = run("rescan", *DATES, "-c", str(moving))
    assert out.returncode == 2 and "no node listening on 127.0.0.1:" in out.stderr, out.stderr

    Database.sqlite_in(tmp_path / "get" / "data").create_schema()
    getting = node_config(tmp_path / "get", free_port(), weights, None,
                          retro=peer + '\nretrieve = "get"')  # fmt: skip
    out = run("rescan", *DATES, "-c", str(getting))
    assert out.returncode == 1
    assert (
        out.stdout.strip()
        .splitlines()[-1]
        .startswith(f"scan 1 paused (archive: no association with PACS@127.0.0.1:{closed}")
    ), out.stdout


def _scanner(tmp_path: Path, pacs: Orthanc) -> tuple[Database, RetroScanner]:
    """A scanner of ``pacs`` with a fresh database, built in-process."""
    settings = load_settings(
        None, storage={"path": tmp_path},
        retro={"peer": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
    )  # fmt: skip
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    return db, RetroScanner(
        retro=settings.retro, gate=settings.gate, own_ae="XRAYAGE", db=db, model_sha256="0" * 64
    )


def test_a_move_the_archive_cannot_complete_pauses_the_scan_with_its_status(
    tmp_path: Path, archive: Archive, weights: Path
) -> None:
    """No node listens where the archive sends (the node's port is closed in this test)."""
    db, scanner = _scanner(tmp_path, archive.pacs)
    scan_id = scanner.start("test", dt.date(2026, 11, 10), dt.date(2026, 11, 10))
    scan = scanner.run(scan_id, "test", Budget(10), None)
    assert scan.state == ScanState.PAUSED and scan.fetched == 0
    assert re.match(r"archive: C-MOVE refused: 0x[AC][0-9A-F]{3} ", scan.detail or ""), scan.detail
    with db.session() as s:
        assert resumable_scans(s, socket.gethostname()) != []
    db.dispose()


def test_an_association_the_archive_ended_is_said_plainly(
    tmp_path: Path, archive: Archive
) -> None:
    """A retriever's association ended under it (the archive closed it, or a network timeout):
    an ArchiveError naming the archive, which pauses the scan, never pynetdicom's RuntimeError."""
    pacs = archive.pacs
    db, scanner = _scanner(tmp_path, pacs)
    ended = f"the association with {pacs.aet}@127.0.0.1:{pacs.dicom_port} ended"
    with scanner.archive.association() as assoc:
        assoc.abort()
        with pytest.raises(ArchiveError, match=ended):
            scanner.archive.find(assoc, "STUDY", StudyInstanceUID="")
        with pytest.raises(ArchiveError, match=ended):
            scanner.archive.retrieve_studies(assoc, ["1.2.3"])
    db.dispose()


def test_an_archive_that_caps_its_answers_is_not_half_scanned(
    tmp_path: Path, chest_pa: Path, weights: Path
) -> None:
    """Orthanc answering at most two studies or series and one instance per C-FIND (a cap many
    PACS have): a study or series list cut short pauses the scan and says so; a series of a
    study the node holds nothing of is retrieved whole (its SERIES-level count says two), with
    no IMAGE-level list to be cut short."""
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    pacs.start({"XRAYAGE": "xrayage"}, options={"LimitFindResults": 2, "LimitFindInstances": 1})
    try:
        chest = pydicom.dcmread(chest_pa)
        capped = _study(chest, tmp_path, "20261110", "P-CAP", 2)
        pacs.upload(
            *capped, *(_study(chest, tmp_path, d, d, 1)[0] for d in ("20261111", "20261112"))
        )
        peer = f'peer = {{ ae_title = "{pacs.aet}", host = "127.0.0.1", port = {pacs.dicom_port} }}'
        config = node_config(
            tmp_path, free_port(), weights, None, retro=f'{peer}\nretrieve = "get"'
        )
        Database.sqlite_in(tmp_path / "data").create_schema()

        month = run("rescan", *DATES, "-c", str(config))
        assert month.returncode == 1
        assert (
            "scan 1 paused (archive: the archive ended the study list at 2 studies" in month.stdout
        )

        day = "--from", "2026-11-10", "--to", "2026-11-10"
        dry = run("rescan", *day, "--dry-run", "-c", str(config))
        assert "2+ (series whole)" in dry.stdout and "would fetch 2 instances" in dry.stdout
        out = run("rescan", *day, "-c", str(config))
        assert "scan 2 finished (done): fetched 2, already done 0, failed 0" in out.stdout, (
            out.stdout
        )
        study = generate_uid()  # three series, one more than the archive lists
        pacs.upload(*(
            small_chests(chest, tmp_path / "wide", 1, prefix=f"s{i}", StudyDate="20261113",
                         StudyInstanceUID=study, SeriesInstanceUID=generate_uid())[0]
            for i in range(3)
        ))  # fmt: skip
        wide = run("rescan", "--from", "2026-11-13", "--to", "2026-11-13", "-c", str(config))
        assert wide.returncode == 1
        assert f"the archive ended the series list of study {study} at 2 series" in wide.stdout
        retro = {u for u, i in _instances(tmp_path).items() if i.origin == "retro"}
        assert retro == {str(pydicom.dcmread(p).SOPInstanceUID) for p in capped}
        db = Database.sqlite_in(tmp_path / "data")
        with db.session() as s:
            (study,) = s.get_one(RetroScan, 2).studies
            assert study.done and study.fetched == 2 and study.detail is None
        db.dispose()
    finally:
        pacs.stop()


def test_studies_fetched_at_once_each_count_in_the_scan(tmp_path: Path) -> None:
    """Two threads finishing studies of one scan: the second must not overwrite the first's
    counts with a total it read before the first committed."""
    db = Database.sqlite_in(tmp_path)
    db.prepare_schema()
    today = dt.date(2026, 11, 24)
    with db.session() as s:
        scan_id = open_scan(s, "cli", today, today, "0" * 64, "here:1").id
        list_studies(s, scan_id, [("1.2.3", None), ("1.2.4", None)])
    with db.session() as s:
        first, second = pending_studies(s, scan_id)
        first_id, second_id = first.id, second.id
    with db.session() as slow:
        # Read before the other thread's commit, and held (the session keeps it while referenced)
        stale = slow.get_one(RetroScan, scan_id)
        assert stale.fetched == 0
        with db.session() as quick:
            count_retrieved(quick, second_id, 3, 1)
            study_done(quick, second_id, 5, None)
        count_retrieved(slow, first_id, 2, 0)
        study_done(slow, first_id, 2, None)
    with db.session() as s:
        scan = s.get_one(RetroScan, scan_id)
        assert (scan.fetched, scan.failed, scan.already_done) == (5, 1, 2)
    db.dispose()
