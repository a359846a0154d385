"""Scaling out: one receiver, three inference workers and one deliverer, each its own
``xrayage serve --role`` process, share a PostgreSQL queue. 300 images are inferred exactly once
and every SR is delivered exactly once; the processes' /metrics and JSON logs say the same."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import func, select

from storage import Database, Delivery, DeliveryState, Instance, InstanceState, Job, JobState
from storage.tables import AuditEvent, Result
from tests.conftest import node_config, node_in_process, small_chests, storescu
from tests.servers import NodeProcess, Orthanc, PostgreSQL, echo, free_port, wait_until
from tests.test_cli import run

IMAGES = 300


@pytest.fixture
def cluster(
    tmp_path: Path, weights: Path, orthanc: Orthanc, postgresql: PostgreSQL
) -> tuple[Path, str]:
    url = postgresql.create_database("scale")
    config = node_config(
        tmp_path, free_port(), weights, orthanc,
        storage=f'database_url = "{url}"',
        model="batch_size = 8\nmax_wait_ms = 0",
        report="secondary_capture = false",
        logging='format = "json"',
    )  # fmt: skip
    upgraded = run("db", "upgrade", "--config", str(config))
    assert upgraded.returncode == 0, upgraded.stderr
    return config, url


def test_three_workers_share_the_queue_and_nothing_is_done_twice(
    tmp_path: Path, cluster: tuple[Path, str], chest_ds: pydicom.Dataset, orthanc: Orthanc
) -> None:
    config, url = cluster
    port = int(next(line for line in config.read_text().splitlines() if line.startswith("port"))
               .split("=")[1])  # fmt: skip
    roles = ["receive", "infer", "infer", "infer", "deliver"]
    procs = [
        NodeProcess(config, port, tmp_path / f"{i}-{role}.log", role=role, http_port=free_port())
        for i, role in enumerate(roles)
    ]
    images = small_chests(chest_ds, tmp_path / "images", IMAGES)
    db = Database(url)
    try:
        for proc in procs:
            proc.start()
        assert all(proc.ready() for proc in procs)  # /readyz of every role
        sent = storescu(port, *images)
        assert sent.returncode == 0, sent.stderr

        def delivered() -> bool:
            with db.session() as s:
                return (
                    s.scalar(select(func.count()).where(Instance.state == InstanceState.DELIVERED))
                    == IMAGES
                )

        wait_until(delivered, 300, f"{IMAGES} instances delivered", interval=1)

        with db.session() as s:
            jobs = s.scalars(select(Job)).all()
            assert len(jobs) == IMAGES
            assert {(j.state, j.attempts) for j in jobs} == {(JobState.DONE, 1)}
            owners = Counter(j.owner for j in jobs)
            assert len(owners) == 3 and min(owners.values()) > 0, owners  # all three worked
            assert s.scalar(select(func.count(Result.id))) == IMAGES
            inferred = s.scalars(
                select(AuditEvent.sop_instance_uid).where(AuditEvent.event == "inferred")
            ).all()
            assert len(inferred) == len(set(inferred)) == IMAGES
            deliveries = s.scalars(select(Delivery)).all()
            assert {(d.state, d.attempts) for d in deliveries} == {(DeliveryState.DELIVERED, 1)}
            assert len(deliveries) == IMAGES
            sent_events = s.scalar(select(func.count()).where(AuditEvent.event == "delivered"))
            assert sent_events == IMAGES
        srs = orthanc.sr_uids()
        assert len(srs) == len(set(srs)) == IMAGES

        receiver, *workers, deliverer = (proc.metrics() for proc in procs)
        assert receiver['xrayage_instances_received_total{origin="push"}'] == IMAGES
        per_worker = [m['xrayage_instances_inferred_total{outcome="reported"}'] for m in workers]
        assert sum(per_worker) == IMAGES and min(per_worker) > 0
        assert sum(m["xrayage_inference_batch_size_sum"] for m in workers) == IMAGES
        assert deliverer['xrayage_deliveries_total{destination="pacs",kind="sr"}'] == IMAGES
        assert deliverer["xrayage_queue_depth"] == 0
        assert deliverer['xrayage_instances{state="delivered"}'] == IMAGES

        # Each role times its own steps of the data path, once per instance.
        def stage(metrics: list[dict[str, float]], name: str) -> float:
            return sum(m.get(f'xrayage_stage_seconds_count{{stage="{name}"}}', 0) for m in metrics)

        assert stage([receiver], "store") == IMAGES
        for name in ("queue", "decode", "preprocess", "model", "report"):
            assert stage(workers, name) == IMAGES, name
        assert stage([deliverer], "send") == IMAGES
        assert stage([receiver, deliverer], "model") == 0
    finally:
        for proc in procs:
            proc.stop()
        db.dispose()
    # [logging] format = "json": every line of a worker's log is one JSON object
    records = [json.loads(line) for line in procs[1].log.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert any(r["message"].startswith("model ") for r in records)


def test_readyz_says_what_keeps_a_role_from_working(tmp_path: Path) -> None:
    http = free_port()
    with node_in_process(tmp_path, role="infer", http={"port": http}):
        answer = requests.get(f"http://127.0.0.1:{http}/readyz", timeout=5)
        assert answer.status_code == 503
        assert answer.json()["detail"] == "no [model] weights configured and no live model"
        assert requests.get(f"http://127.0.0.1:{http}/healthz", timeout=5).ok  # alive, not ready
    with node_in_process(tmp_path, role="receive", http={"port": http}) as service:
        assert requests.get(f"http://127.0.0.1:{http}/readyz", timeout=5).json() == {
            "status": "ready"
        }
        assert echo(service.settings.node.port)
        metrics = requests.get(f"http://127.0.0.1:{http}/metrics", timeout=5).text
        assert "\nxrayage_queue_depth 0.0\n" in metrics
