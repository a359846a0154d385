"""A candidate model beside the live one: shadow jobs on the same images, results stored and never
sent, validation side by side, promotion refused then forced, backfill; every command audited."""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import func, select, update

from ai.untrained import build_untrained_model
from node.results.compare import compare
from storage import AuditEvent, Database, Instance, InstanceState, Job, JobState
from storage.models import (
    Weights,
    add_model,
    configure,
    find_model,
    live_model,
    retire_model,
    set_role,
)
from storage.queue import adopt_jobs, claim_jobs, queue_backfill, queue_job, roles
from storage.results import AgePair
from storage.tables import Model, ModelRole, Result
from tests.conftest import node_config, small_chests, storescu
from tests.servers import XRAYAGE, NodeProcess, Orthanc, free_port, wait_until
from xrayage.errors import UserError

LEASE = dt.timedelta(minutes=5)


def _weights(sha: str, name: str) -> Weights:
    return Weights(name, "1", sha * 64, f"/models/{name}.pt", json.dumps({"name": name}))


def _instance(s: object, uid: str) -> Instance:
    inst = Instance(sop_instance_uid=uid, sop_class_uid="1.2", path="/x", sha256="0" * 64,
                    size=1, state=InstanceState.RECEIVED)  # fmt: skip
    s.add(inst)  # type: ignore[attr-defined]
    s.flush()  # type: ignore[attr-defined]
    return inst


def test_the_config_names_the_live_model_when_it_changes_and_a_promotion_stands(
    tmp_path: Path,
) -> None:
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    a, b, c = _weights("a", "alpha"), _weights("b", "beta"), _weights("c", "gamma")
    with db.session() as s:
        assert configure(s, a) is not None  # a fresh node: the config's weights are live
        add_model(s, b, ModelRole.SHADOW, "cli:test")
        with pytest.raises(UserError, match="already named 'beta'"):
            add_model(s, Weights("beta", "2", "d" * 64, "/x", "{}"), ModelRole.SHADOW, "cli:t")
    with db.session() as s:
        set_role(s, find_model(s, "beta"), ModelRole.LIVE, "cli:test", "promoted")
    with db.session() as s:  # the same config at the next start: the promotion stands
        assert configure(s, a) is None
        assert live_model(s).name == "beta"  # type: ignore[union-attr]
    with db.session() as s:  # other weights in the config: they are live
        configure(s, c)
        assert {m.name: m.role for m in s.scalars(select(Model))} == {
            "alpha": ModelRole.RETIRED, "beta": ModelRole.RETIRED, "gamma": ModelRole.LIVE,
        }  # fmt: skip
        events = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "model")).all()
    assert "model beta 1 retired: gamma is live" in events
    db.dispose()


def test_each_image_gets_a_job_per_model_claimed_together_and_roles_hand_jobs_over(
    tmp_path: Path,
) -> None:
    """One job for the live model and one for the shadow; a claim takes the image with both
    (decoded once); a backfill waits for received images. Promoting the shadow re-points the
    old live model's queued job of an image waiting for its reports and cancels the one of an
    image the new live model already runs; retiring a shadow cancels its queued jobs."""
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    with db.session() as s:
        configure(s, _weights("a", "alpha"))
        early = _instance(s, "1.2.3.0")
        queue_job(s, early)  # before the shadow: alpha's job only
        add_model(s, _weights("b", "beta"), ModelRole.SHADOW, "cli:test")
        first, second = (_instance(s, f"1.2.3.{n}") for n in (1, 2))
        queue_job(s, first)
        queue_job(s, second)
        done = _instance(s, "1.2.3.3")
        done.state = InstanceState.REPORTED
        assert roles(s) == ("a" * 64, ["b" * 64])
    with db.session() as s:
        assert queue_backfill(s, "b" * 64, done.received_at) == 1
    with db.session() as s:  # the early image alone: its one job; then the next with both
        assert [j.instance_id for j in claim_jobs(s, "h:1", 1, LEASE, models=["a" * 64])] == [
            early.id
        ]
        claimed = claim_jobs(s, "h:1", 1, LEASE, models=["a" * 64, "b" * 64])
        assert [(j.instance_id, j.model_sha256) for j in claimed] == [
            (first.id, "a" * 64),
            (first.id, "b" * 64),
        ]
    with db.session() as s:  # the received image before the backfill's
        claimed = claim_jobs(s, "h:1", 1, LEASE, models=["b" * 64])
        assert [j.instance_id for j in claimed] == [second.id]
        later = _instance(s, "1.2.3.4")
        queue_job(s, later)  # alpha's job queued, beta's too
        s.execute(update(Job).where(Job.instance_id == early.id).values(state=JobState.QUEUED))
        s.execute(
            update(Job)
            .where(Job.instance_id == later.id, Job.model_sha256 == "b" * 64)
            .values(state=JobState.DONE)
        )  # beta already ran on it as a shadow
    with db.session() as s:
        set_role(s, find_model(s, "beta"), ModelRole.LIVE, "cli:test", "promoted")
    with db.session() as s:
        jobs = {(j.instance_id, j.model_sha256[:1], j.state) for j in s.scalars(select(Job))}  # type: ignore[index]
    assert (early.id, "b", JobState.QUEUED) in jobs  # re-pointed: it makes the reports
    assert (second.id, "a", JobState.CANCELLED) in jobs  # beta runs it already
    assert (later.id, "a", JobState.QUEUED) not in jobs
    assert len([j for j in jobs if j[0] == later.id and j[1:] == ("b", JobState.QUEUED)]) == 1
    with db.session() as s:
        assert adopt_jobs(s) == 0  # handed over once
        add_model(s, _weights("c", "gamma"), ModelRole.SHADOW, "cli:test")
        queue_job(s, _instance(s, "1.2.3.5"))
        retire_model(s, find_model(s, "gamma"), "cli:test")
        assert s.scalars(select(Job.state).where(Job.model_sha256 == "c" * 64)).all() == [
            JobState.CANCELLED
        ]
        with pytest.raises(UserError, match="beta is live: promote another model first"):
            retire_model(s, find_model(s, "beta"), "cli:test")
    db.dispose()


def test_the_paired_comparison_resamples_patients() -> None:
    """Ten patients of five images; the candidate is 1 year further off on every image of
    half of them: difference 0.5, and an interval that comes from ten clusters, not fifty."""

    def pair(i: int, p: int, age: float) -> AgePair:
        return AgePair(age, 50.0, None, None, None, dt.datetime(2026, 1, 1), f"P{p}", None, i)

    ref = [pair(5 * p + k, p, 52.0) for p in range(10) for k in range(5)]
    cand = [pair(5 * p + k, p, 53.0 if p % 2 else 52.0) for p in range(10) for k in range(5)]
    c = compare("live", "candidate", ref, cand)
    assert (c.images, c.patients, c.difference) == (50, 10, 0.5) and c.worse
    assert c.ci95 is not None and c.ci95[0] >= 0.0 and c.ci95[1] <= 1.0
    assert c.ci95[1] - c.ci95[0] > 0.4  # an image bootstrap would give about half of it


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(XRAYAGE), *args], capture_output=True, text=True, timeout=300)


def _patients(chest_ds: pydicom.Dataset, folder: Path, n: int, start: int = 0) -> list[Path]:
    return [
        path
        for i in range(start, start + n)
        for path in small_chests(
            chest_ds,
            folder,
            1,
            prefix=f"p{i}-",
            PatientID=f"P{i}",
            PatientBirthDate=f"{1940 + i}0101",
        )
    ]


def test_a_shadow_model_runs_beside_the_live_one_and_is_promoted(
    tmp_path: Path, orthanc: Orthanc, weights: Path, chest_ds: pydicom.Dataset
) -> None:
    candidate = tmp_path / "candidate" / "seresnet.pt"
    build_untrained_model(candidate, seed=99)  # other weights: other ages on the same images
    port = free_port()
    config = node_config(tmp_path, port, weights, orthanc,
                         validation="promote_min_patients = 50")  # fmt: skip
    node = NodeProcess(config, port, tmp_path / "node.log", http_port=free_port())
    node.start()
    db = Database(f"sqlite:///{tmp_path / 'data' / 'xrayage.db'}")
    try:
        added = _run("model", "add", str(candidate), "--name", "candidate", "--shadow",
                     "-c", str(config))  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "is shadow" in added.stdout and "MB of weights" in added.stdout
        again = _run("model", "add", str(candidate), "--shadow", "-c", str(config))
        assert again.returncode == 2 and "already named" not in again.stderr  # the same weights
        assert again.stderr.startswith("xrayage: error: model candidate is already shadow")
        wait_until(lambda: "candidate (shadow)" in node.log.read_text(), 60, "the node to load it")

        images = _patients(chest_ds, tmp_path / "in", 6)
        assert storescu(port, *images).returncode == 0

        def both_done() -> bool:
            with db.session() as s:
                waiting = Job.state.in_((JobState.QUEUED, JobState.RUNNING))
                left = s.scalar(select(Job.id).where(waiting))
                delivered = s.scalars(select(Instance.state)).all()
                return left is None and set(delivered) == {InstanceState.DELIVERED}

        wait_until(both_done, 240, "both models' jobs and the deliveries")
        with db.session() as s:
            rows = s.execute(select(Result.model_name, Result.xray_age, Result.reported_at)).all()
        by_model = {name: [r for r in rows if r[0] == name] for name in {r[0] for r in rows}}
        live_name = "xrayage-untrained-seresnet"
        assert {k: len(v) for k, v in by_model.items()} == {live_name: 6, "candidate": 6}
        assert all(r[2] is not None for r in by_model[live_name])  # reported
        assert all(r[2] is None for r in by_model["candidate"])  # stored, never sent
        assert {r[1] for r in by_model[live_name]} != {r[1] for r in by_model["candidate"]}
        assert len(orthanc.find({"Modality": "SR", "PatientID": "P0"})) == 1  # the live one's

        token = (tmp_path / "data" / "http-token").read_text().strip()
        api = requests.get(
            f"http://127.0.0.1:{node.http_port}/api/validation",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ).json()
        assert [m["model"]["name"] for m in api["models"]] == [live_name, "candidate"]
        assert api["model"]["name"] == live_name  # the live model's at the top level
        assert api["comparisons"][0]["candidate"] == "candidate"
        assert api["comparisons"][0]["images"] == 6
        gauges = node.metrics()
        assert gauges['xrayage_validation_images{group="all",model="candidate"}'] == 6.0
        assert gauges[f'xrayage_validation_images{{group="all",model="{live_name}"}}'] == 6.0

        compared = _run("validation", "--compare", live_name, "candidate", "-f", "json",
                        "-c", str(config))  # fmt: skip
        assert compared.returncode == 0, compared.stderr
        doc = json.loads(compared.stdout)
        assert doc["comparison"]["images"] == 6 and doc["comparison"]["patients"] == 6
        assert {f["model"] for f in doc["figures"]} == {live_name, "candidate"}

        refused = _run("model", "promote", "candidate", "-c", str(config))
        assert refused.returncode == 2
        assert "on the same 6 images of 6 patients" in refused.stdout
        assert refused.stderr.startswith(
            "xrayage: error: model candidate not promoted: compared on 6 patients, fewer than 50"
        )
        forced = _run("model", "promote", "candidate", "--force", "-c", str(config))
        assert forced.returncode == 0, forced.stderr
        wait_until(lambda: "candidate (live)" in node.log.read_text(), 60, "the node to switch")

        (late,) = _patients(chest_ds, tmp_path / "late", 1, start=10)
        assert storescu(port, late).returncode == 0
        srs = wait_until(lambda: orthanc.find({"Modality": "SR", "PatientID": "P10"}), 120,
                         "the new live model's SR")  # fmt: skip
        assert _sr_model(pydicom.dcmread(io.BytesIO(orthanc.file(srs[0]["ID"])))) == "candidate"
        assert len(orthanc.find({"Modality": "SR", "PatientID": "P0"})) == 1  # sent stay sent

        listed = json.loads(_run("model", "list", "-f", "json", "-c", str(config)).stdout)
        assert {m["name"]: (m["role"], m["images"]) for m in listed} == {
            live_name: ("retired", 6), "candidate": ("live", 7),
        }  # fmt: skip
        with db.session() as s:
            audited = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "model")).all()
        assert any("candidate" in a and "shadow: added from" in a for a in audited)
        assert any("candidate" in a and "forced: compared on 6 patients" in a for a in audited)
        assert any(f"{live_name} seed1234 retired: candidate is live" in a for a in audited)

        # The retired model back as a shadow, run on the one past image it has not seen.
        back = _run("model", "add", str(weights), "--shadow", "-c", str(config))
        assert back.returncode == 0, back.stderr
        wait_until(lambda: f"{live_name} (shadow)" in node.log.read_text(), 60, "it loaded")
        filled = _run("model", "backfill", live_name, "--since", "2000-01-01", "-c", str(config))
        assert filled.returncode == 0, filled.stderr
        assert filled.stdout.startswith(f"1 images queued for model {live_name}")
        with db.session() as s:  # --wait returned: the node has run it
            assert s.scalar(select(func.count(Result.id)).where(
                Result.model_name == live_name)) == 7  # fmt: skip
        retired = _run("model", "retire", live_name, "-c", str(config))
        assert retired.returncode == 0 and retired.stdout.strip() == f"model {live_name} is retired"
        with db.session() as s:
            audited = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "model")).all()
        assert any(f"backfill of model {live_name}: 1 images" in a for a in audited)
        assert audited[-1] == f"model {live_name} seed1234 retired"
    finally:
        node.stop()
        db.dispose()


def _sr_model(sr: pydicom.Dataset) -> str | None:
    """The algorithm name (TID 4019) the SR carries."""
    found = []

    def walk(items):  # type: ignore[no-untyped-def]
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "TEXT" and name == "Algorithm Name":
                found.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found[0] if found else None
