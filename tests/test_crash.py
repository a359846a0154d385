"""Crash safety with real parts: DCMTK storescu streams radiographs over several associations,
the node is killed with SIGKILL at random moments and restarted, Orthanc is the PACS.

What an administrator relies on: every instance that got Success ends with exactly one SR in
the PACS, nothing acknowledged is lost, no partial file is left behind, and jobs a dead process
held are taken back.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from ai.card import file_sha256
from node.report.uids import ReportUIDs
from storage import Database, Delivery, DeliveryKind, DeliveryState, Job, JobState
from storage.deliveries import requeue_orphan_deliveries
from storage.queue import requeue_orphans
from storage.tables import Instance, InstanceState, utcnow
from tests.conftest import STORESCU, node_config, require, small_chests
from tests.servers import NodeProcess, Orthanc, free_port, wait_until

IMAGES = 200
ASSOCIATIONS = 4
KILLS = 3


def _start_senders(port: int, files: list[Path]) -> list[subprocess.Popen[str]]:
    """One storescu per association, each with its share of the files."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return [
        subprocess.Popen(
            [STORESCU, "-v", "-aet", "MODALITY", "-aec", "XRAYAGE", "127.0.0.1", str(port)]
            + [str(f) for f in files[i::ASSOCIATIONS]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(ASSOCIATIONS)
        if files[i::ASSOCIATIONS]
    ]


def _acknowledged(log: str) -> set[Path]:
    """Files for which storescu -v logged a Success response."""
    done, sending = set(), None
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            sending = Path(line.removeprefix("I: Sending file: "))
        elif line.startswith("I: Received Store Response (Success)") and sending is not None:
            done.add(sending)
    return done


def test_kill_9_during_ingest_loses_nothing_and_duplicates_no_report(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    require("Orthanc")
    require(STORESCU)
    seed = random.randrange(2**32)
    print(f"kill moments from random seed {seed}")  # shown by pytest on failure
    rng = random.Random(seed)
    files = small_chests(chest_ds, tmp_path / "images", IMAGES)
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    pacs.start(allowed={"XRAYAGE": "xrayage"})
    port = free_port()
    config = node_config(tmp_path, port, weights, pacs, report="secondary_capture = false")
    node = NodeProcess(config, port, tmp_path / "node.log")
    acked: set[Path] = set()
    try:
        for _ in range(KILLS):
            node.start()
            senders = _start_senders(port, [f for f in files if f not in acked])
            # Sending all takes about 2 s here: a kill lands while receiving, or later while
            # jobs are inferred and reports delivered.
            time.sleep(rng.uniform(0.2, 3.0))
            assert node.proc is not None
            node.proc.kill()  # SIGKILL: no handler runs, nothing is flushed
            node.proc.wait()
            for sender in senders:
                acked |= _acknowledged(sender.communicate(timeout=60)[0])
        node.start()
        # The PACS resends what was never acknowledged, some of it stored before the kill.
        rest = [f for f in files if f not in acked]
        for sender in _start_senders(port, rest):
            out = sender.communicate(timeout=300)[0]
            assert sender.returncode == 0, out
            acked |= _acknowledged(out)
        assert acked == set(files)

        expected = {
            ReportUIDs(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID),
                       file_sha256(weights)).sr_instance
            for f in files
        }  # fmt: skip
        srs = wait_until(
            lambda: (found := pacs.sr_uids()) and len(found) >= IMAGES and found,
            600,
            f"{IMAGES} SRs in Orthanc",
            interval=2,
        )
        assert sorted(srs) == sorted(expected)  # one SR per acknowledged image, none twice
        leftovers = [p for p in (tmp_path / "data").rglob("*") if p.name.endswith(".part")]
        assert leftovers == []
        db = Database.sqlite_in(tmp_path / "data")
        with db.session() as s:
            states = {i.state for i in s.scalars(select(Instance))}
        db.dispose()
        assert states <= {InstanceState.REPORTED, InstanceState.DELIVERED}
    finally:
        node.stop()
        pacs.stop()


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


FAR = utcnow().replace(year=utcnow().year + 1)  # a lease that does not expire in the test


def test_a_restart_takes_back_at_once_the_jobs_of_a_dead_process_on_its_host(
    tmp_path: Path,
) -> None:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    dead = _dead_pid()
    owners = {
        f"ward:{dead}": JobState.QUEUED,  # dead, on this host: taken back
        "ward:1": JobState.RUNNING,  # alive (PID 1): its lease still holds
        f"elsewhere:{dead}": JobState.RUNNING,  # another host: wait for its lease
    }
    with db.session() as s:
        for n, owner in enumerate(owners):
            inst = Instance(sop_instance_uid=f"1.2.{n}", sop_class_uid="1.2", path="x",
                            sha256="0", size=0, state=InstanceState.QUEUED)  # fmt: skip
            s.add(inst)
            s.flush()
            s.add(Job(instance_id=inst.id, state=JobState.RUNNING, owner=owner, lease_until=FAR))
    with db.session() as s:
        assert requeue_orphans(s, "ward") == 1
    with db.session() as s:
        assert {j.owner or f"ward:{dead}": j.state for j in s.scalars(select(Job))} == owners
    db.dispose()


def test_a_restart_makes_the_deliveries_of_a_dead_process_on_its_host_due_at_once(
    tmp_path: Path,
) -> None:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    dead = _dead_pid()
    owners = [f"ward:{dead}", "ward:1", f"elsewhere:{dead}"]  # as for jobs above
    with db.session() as s:
        inst = Instance(sop_instance_uid="1.2.9", sop_class_uid="1.2", path="x",
                        sha256="0", size=0, state=InstanceState.REPORTED)  # fmt: skip
        s.add(inst)
        s.flush()
        for n, owner in enumerate(owners):
            s.add(Delivery(instance_id=inst.id, destination="pacs", kind=DeliveryKind.SR,
                           sop_instance_uid=f"2.{n}",
                           path="x", state=DeliveryState.PENDING, owner=owner,
                           next_attempt_at=FAR))  # fmt: skip
    with db.session() as s:
        assert requeue_orphan_deliveries(s, "ward") == 1
    with db.session() as s:
        due = {d.sop_instance_uid: d.next_attempt_at < FAR for d in s.scalars(select(Delivery))}
    assert due == {"2.0": True, "2.1": False, "2.2": False}
    db.dispose()
