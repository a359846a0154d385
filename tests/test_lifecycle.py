"""The lifecycle: one transition table, one function for every change, `inferred` committed, and
the poison ceiling on jobs whose worker dies."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from ai.presets import model_card
from storage import AuditEvent, Database, Instance, InstanceState, Job, JobState, Result
from storage.lifecycle import INSTANCE_TRANSITIONS, IllegalTransition, change_state
from storage.queue import claim_jobs, fail_exhausted, requeue_orphans, requeue_owner
from tests.conftest import node_config, node_in_process, small_chests, storescu
from tests.servers import XRAYAGE, NodeProcess, PostgreSQL, echo, free_port, wait_until

README = Path(__file__).resolve().parents[1] / "README.md"
LEASE = dt.timedelta(minutes=5)


def test_the_transition_table_is_the_readme_state_diagram() -> None:
    section = README.read_text().split("## What happens to an image", 1)[1]
    section = section.split("A delivery is", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (\w+) \| [^|]+ \|$", section, flags=re.MULTILINE)
    documented = {(a, b) for a, b in rows if a != "from"}
    table = {(a.value, b.value) for a, targets in INSTANCE_TRANSITIONS.items() for b in targets}
    assert documented == table
    # the diagram's main line and "failed reachable from each step" (except the terminal skip)
    for step in ("received", "queued", "inferred", "reported"):
        assert (step, "failed") in table
    for a, b in [("received", "queued"), ("queued", "inferred"), ("inferred", "reported"),
                 ("reported", "delivered"), ("received", "skipped")]:  # fmt: skip
        assert (a, b) in table


def _instances(db: Database, n: int, state: InstanceState = InstanceState.QUEUED) -> list[int]:
    with db.session() as s:
        rows = [
            Instance(
                sop_instance_uid=f"1.2.3.{i}",
                sop_class_uid="1.2",
                path="x",
                sha256="0",
                size=0,
                state=state,
            )
            for i in range(n)
        ]
        s.add_all(rows)
        s.flush()
        for inst in rows:
            s.add(Job(instance_id=inst.id, state=JobState.QUEUED))
        return [inst.id for inst in rows]


def test_an_illegal_move_is_refused_loudly_and_a_legal_one_is_audited(tmp_path: Path) -> None:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    (inst_id,) = _instances(db, 1)
    with pytest.raises(IllegalTransition, match="queued -> delivered"), db.session() as s:
        change_state(s, s.get_one(Instance, inst_id), InstanceState.DELIVERED)
    with db.session() as s:
        inst = s.get_one(Instance, inst_id)
        assert inst.state == InstanceState.QUEUED  # the refused move was rolled back
        change_state(s, inst, InstanceState.FAILED, reason="decoder said no")
    with db.session() as s:
        event = s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        assert event is not None
        assert (event.event, event.outcome, event.detail) == (
            "failed",
            "failure",
            "decoder said no",
        )
        assert s.get_one(Instance, inst_id).reason == "decoder said no"
    db.dispose()


def test_an_image_that_kills_its_worker_fails_after_max_attempts_and_costs_others_nothing(
    tmp_path: Path,
) -> None:
    """Each claim's worker dies (a dead PID on this host); its supervisor, or a restart of a
    node that reads images in its own process, gives its jobs back. The jobs of the first,
    batched claim are then claimed alone; the poison one ends failed at the ceiling, the others
    are claimed once more each and done."""
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    poison, *others = _instances(db, 3)
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"ward:{dead.pid}"

    def claim(limit: int = 8) -> list[int]:
        with db.session() as s:
            claimed = claim_jobs(s, owner, limit, LEASE, max_attempts=3, models=["m"], live="m")
            return [j.instance_id for j in claimed]

    deaths = iter([
        lambda s: requeue_owner(s, owner, f"worker process {owner} died"),  # the supervisor
        lambda s: requeue_orphans(s, "ward"),  # a restart, inference in the node's process
        lambda s: requeue_owner(s, owner, f"worker process {owner} died"),
    ])  # fmt: skip

    def die() -> None:
        with db.session() as s:
            next(deaths)(s)

    assert claim() == [poison, *others]  # one batch
    die()
    for _ in range(2):  # alone, twice more: it kills its worker each time
        assert claim() == [poison]
        die()
    with db.session() as s:
        ended = fail_exhausted(s, 3)
    assert [reason for _, reason in ended] == [
        f"worker process died 3 times on this image (last: worker process {owner} died)"
    ]
    assert claim() == [others[0]]  # suspects still one at a time, each on its second attempt
    assert claim() == [others[1]]
    with db.session() as s:
        inst = s.get_one(Instance, poison)
        assert inst.state == InstanceState.FAILED
        assert inst.reason is not None and "died 3 times" in inst.reason
        assert s.scalar(select(Job.attempts).where(Job.instance_id == others[0])) == 2
        audited = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "failed")).all()
        assert audited == [inst.reason]
    db.dispose()


def test_restarts_of_a_node_cost_the_images_in_flight_no_attempt(tmp_path: Path) -> None:
    """An inference process that ended with its node (``kill -9`` of ``serve``, three times
    during a backlog) was not killed by its images: they stay in batches, and none reaches the
    poison ceiling."""
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    images = _instances(db, 3)
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"ward:{dead.pid}"
    for _ in range(3):
        with db.session() as s:
            claimed = claim_jobs(s, owner, 8, LEASE, max_attempts=3, models=["m"], live="m")
            assert [j.instance_id for j in claimed] == images  # one batch, not one at a time
        with db.session() as s:
            assert requeue_orphans(s, "ward", counted=False) == 3
    with db.session() as s:
        assert fail_exhausted(s, 3) == []
        assert set(s.scalars(select(Job.attempts))) == {0}
    db.dispose()


def test_an_instance_inferred_before_its_worker_died_is_reported_without_the_model_again(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    """The stored age (42.0) is one the untrained model never gives this image: if the model
    ran again, the result (and the SR) would carry its own age instead."""
    (image,) = small_chests(chest_ds, tmp_path / "images", 1)
    with node_in_process(tmp_path, report={"secondary_capture": False}) as node:  # no model
        assert storescu(node.settings.node.port, image).returncode == 0
    db = Database.sqlite_in(tmp_path / "data")
    dead = subprocess.Popen(["true"])
    dead.wait()
    sha = model_card(weights).sha256
    with db.session() as s:
        inst = s.scalars(select(Instance)).one()
        job = s.scalars(select(Job)).one()
        job.state, job.attempts = JobState.RUNNING, 1
        job.owner, job.lease_until = f"{socket.gethostname()}:{dead.pid}", None
        s.add(Result(instance_id=inst.id, model_name="m", model_version="1", model_sha256=sha,
                     xray_age=42.0))  # fmt: skip
        change_state(s, inst, InstanceState.INFERRED)
    db.dispose()
    with node_in_process(
        tmp_path, model={"weights": str(weights)}, report={"secondary_capture": False}
    ) as node:

        def reported() -> bool:
            with node.db.session() as s:
                return s.scalars(select(Instance.state)).one() == InstanceState.REPORTED

        wait_until(reported, 60, "the inferred instance reported")
        with node.db.session() as s:
            result = s.scalars(select(Result)).one()
            assert result.xray_age == 42.0
            assert result.sr_path is not None
            inferred = s.scalars(select(AuditEvent).where(AuditEvent.event == "inferred")).all()
            assert len(inferred) == 1  # the one before the "crash"; the model did not run again
        sr = pydicom.dcmread(result.sr_path)
        ages = [float(e.value) for e in sr.iterall() if e.keyword == "NumericValue"]
        assert 42.0 in ages


def test_a_second_serve_on_the_same_data_folder_exits_2_naming_folder_and_pid(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = node_config(tmp_path, port, None, None)
    first = NodeProcess(config, port, tmp_path / "first.log")
    first.start()
    try:
        assert first.proc is not None
        second = subprocess.run(
            [str(XRAYAGE), "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"xrayage: error: data folder {tmp_path / 'data'} is in use by another xrayage serve "
            f"(PID {first.proc.pid}); stop it first, or give this one its own [storage] path"
        ]
        assert echo(port)  # the first one is untouched
    finally:
        first.stop()
    with Database.sqlite_in(tmp_path / "data").session() as s:  # one start, one stop audited
        nodes = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "node")).all()
    assert len(nodes) == 2


def test_a_second_scheduler_on_postgresql_says_so_and_waits_for_the_first(
    tmp_path: Path, postgresql: PostgreSQL, caplog: pytest.LogCaptureFixture
) -> None:
    url = postgresql.create_database("schedulers")
    upgraded = subprocess.run(
        [str(XRAYAGE), "db", "upgrade"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "XRAYAGE_STORAGE__DATABASE_URL": url},
    )  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr
    storage = {"database_url": url}
    with node_in_process(tmp_path / "a", role="schedule", storage=storage) as first:
        assert first.scheduler is not None and first.scheduler.scheduler.running
        second_cm = node_in_process(tmp_path / "b", role="schedule", storage=storage)
        second = second_cm.__enter__()
        try:
            assert second.scheduler is not None
            assert not second.scheduler.scheduler.running
            assert "another process schedules for this database" in caplog.text
            receiving = node_in_process(tmp_path / "c", role="receive", storage=storage)
            with receiving as receiver:  # the roles that may be many are unaffected
                assert echo(receiver.settings.node.port)
        except BaseException:
            second_cm.__exit__(None, None, None)
            raise
    try:  # the first stopped: the second takes over
        wait_until(lambda: second.scheduler.scheduler.running, 30, "the second scheduler")
    finally:
        second_cm.__exit__(None, None, None)


def test_jobs_and_scans_have_their_tables_and_illegal_moves_are_refused(tmp_path: Path) -> None:
    """Every kind of state has its table in storage/lifecycle.py; each refuses what it lacks,
    one row at a time (change_state) and as a set (move_rows leaves rows that may not move)."""
    from storage.lifecycle import (
        JOB_TRANSITIONS,
        LIFECYCLES,
        MODEL_TRANSITIONS,
        SCAN_TRANSITIONS,
        move_rows,
    )
    from storage.scans import close_scan, open_scan, take_over
    from storage.tables import Delivery, Model, RetroScan, ScanState

    assert set(LIFECYCLES) == {Instance, Job, Delivery, RetroScan, Model}
    for table in (JOB_TRANSITIONS, SCAN_TRANSITIONS, MODEL_TRANSITIONS):
        assert all(targets <= set(table) for targets in table.values())
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    (inst_id,) = _instances(db, 1)
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.instance_id == inst_id)).one()
        job_id = job.id
        change_state(s, job, JobState.RUNNING)
        change_state(s, job, JobState.DONE)
    refused = pytest.raises(IllegalTransition, match=r"jobs row \d+: done -> running")
    with refused, db.session() as s:
        change_state(s, s.get_one(Job, job_id), JobState.RUNNING)
    with db.session() as s:  # a done job is never given back to the queue
        assert move_rows(s, Job, Job.id == job_id, JobState.QUEUED) == []
        assert s.get_one(Job, job_id).state == JobState.DONE
    with db.session() as s:
        scan = open_scan(s, "test", dt.date(2026, 11, 1), dt.date(2026, 11, 2), "m", "h:1")
        scan_id = scan.id
        close_scan(s, scan_id, ScanState.FINISHED, "done", "test")
    with pytest.raises(IllegalTransition, match="finished -> running"), db.session() as s:
        take_over(s, s.get_one(RetroScan, scan_id), "h:2", "test")
    with db.session() as s:
        scans = select(AuditEvent).where(AuditEvent.event == "retro-scan")
        events = [e.detail for e in s.scalars(scans)]
    assert events == [
        "scan 1 started: studies 2026-11-01..2026-11-02",
        "scan 1 finished: done; fetched 0, already done 0, failed 0",
    ]
    db.dispose()
