"""Batched inference: the engine, the node's worker batching with a maximum wait, ``infer`` on
folders, and ``evaluate`` with its statistics and plots."""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from ai import AgeModel, Engine, display_values
from ai.evaluate import agreement, read_labels
from node.config import ReportConfig, load_settings
from node.infer.models import ModelSet
from node.infer.registry import live_card
from node.infer.worker import InferenceWorker
from storage import Database, FileStore, Instance, InstanceState, Job, JobState, Result
from tests.test_cli import run


@pytest.fixture(scope="module")
def model(weights: Path) -> AgeModel:
    return AgeModel.load(weights, "cpu")


def _variants(chest_ds: pydicom.Dataset, folder: Path, n: int) -> list[Path]:
    """Copies of the chest CR with fresh UIDs and windows a few grey levels apart, so the
    stand-in model gives each a different age."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = deepcopy(chest_ds)
        ds.SOPInstanceUID = generate_uid()
        ds.WindowCenter = chest_ds.WindowCenter + 200 * i
        paths.append(folder / f"img{i}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_the_engine_keeps_order_batches_and_reports_bad_files(
    model: AgeModel, chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    files = _variants(chest_ds, tmp_path, 3)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"DICM but not really")
    order = [files[0], junk, files[1], files[2]]
    batched = list(Engine(model, batch_size=3, workers=2).run(order))
    single = list(Engine(model, batch_size=1, workers=1).run(order))
    assert [o.path for o in batched] == order
    assert batched[1].error and "not a DICOM file" in batched[1].error
    ages = [o.xray_age for o in batched if o.xray_age is not None]
    assert len(set(ages)) == 3  # three windows, three answers
    assert [o.error for o in single] == [o.error for o in batched]
    assert [o.xray_age for o in single if o.xray_age] == pytest.approx(ages, abs=1e-3)


def test_the_worker_waits_for_a_full_batch(
    weights: Path, model: AgeModel, chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    """With max_wait_ms long, one queued image waits until the batch of 4 is full, and then
    all four run in one claim."""
    settings = load_settings(
        None,
        storage={"path": tmp_path},
        model={"batch_size": 4, "max_wait_ms": 600_000, "weights": str(weights), "device": "cpu"},
    )
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.create_schema()
    live_card(db, settings.model)  # the weights registered as the live model, as at a start
    models = ModelSet(db, "cpu")
    models.refresh(force=True)
    reports = ReportConfig(settings.report, "XRAYAGE", {})
    worker = InferenceWorker(settings.model, reports, db, FileStore(tmp_path / "dicom"), models)
    files = _variants(chest_ds, tmp_path / "in", 4)

    def enqueue(path: Path) -> None:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        with db.session() as s:
            inst = Instance(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                path=str(path), sha256="0" * 64, size=1, state=InstanceState.QUEUED,
            )  # fmt: skip
            s.add(inst)
            s.flush()
            s.add(Job(instance_id=inst.id, state=JobState.QUEUED))

    enqueue(files[0])
    claimed: list[int] = []
    thread = threading.Thread(target=lambda: claimed.append(worker.run_once()))
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive() and not claimed  # still waiting for more images
    for path in files[1:]:
        enqueue(path)
    worker.wake.set()
    thread.join(timeout=120)
    assert claimed == [4]
    with db.session() as s:
        assert s.query(Result).count() == 4
    db.dispose()


def test_infer_walks_folders_and_prints_csv(
    model: AgeModel, weights: Path, chest_pa: Path, chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    root = tmp_path / "archive"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".trash").mkdir()
    shutil.copy(chest_pa, root / "a" / "b" / "chest")  # DICOM files often have no suffix
    shutil.copy(chest_pa, root / ".trash" / "old.dcm")
    (root / "DICOMDIR").write_bytes(b"index")
    png = root / "a" / "nih.png"
    Image.fromarray(display_values(chest_ds)[:900, :900].astype(np.uint8)).save(png)

    out = run("infer", str(root), "--weights", str(weights), "--device", "cpu", "--csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["path"] for r in rows] == [str(root / "a" / "b" / "chest"), str(png)]
    expected = [o.xray_age for o in Engine(model).run([root / "a" / "b" / "chest", png])]
    assert [float(r["xray_age"]) for r in rows] == expected
    assert rows[0]["chronological_age"] and rows[1]["chronological_age"] == ""  # PNG: no header
    assert "not writable" not in out.stderr  # a PNG's pixels are copied, not shared read-only


def test_evaluate_writes_metrics_and_plots(
    weights: Path, chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    display = display_values(chest_ds)[:800, :800]
    labels = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender"]
    for i in range(9):  # NIH ChestX-ray14 style: PNG files and Data_Entry_2017.csv
        Image.fromarray(np.clip(display + 3 * i, 0, 255).astype(np.uint8)).save(
            images / f"{i:08d}_000.png"
        )  # two images a patient; the ninth, 10 years old, is outside the card's 18-100
        labels.append(f"{i:08d}_000.png,No Finding,0,{i // 2},{40 + 3 * i if i < 8 else 10},M")
    labels.append("99999999_000.png,No Finding,0,9,414,M")  # NIH has a few impossible ages
    table = tmp_path / "Data_Entry_2017.csv"
    table.write_text("\n".join(labels) + "\n")
    out_dir = tmp_path / "eval"

    out = run(
        "evaluate", "--labels", str(table), "--images", str(images), "--out", str(out_dir),
        "--weights", str(weights), "--device", "cpu", "--bootstrap", "500",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    metrics = json.loads((out_dir / "metrics.json").read_text())
    rows = list(csv.DictReader((out_dir / "predictions.csv").open()))
    pred = np.array([float(r["xray_age"]) for r in rows])
    true = np.array([float(r["chronological_age"]) for r in rows])
    assert metrics["n"] == 8 and metrics["labels_excluded"] == 2
    assert metrics["patients"] == 4 and metrics["bootstrap_unit"] == "patient"
    assert metrics["age_range"] == [18, 100]
    assert metrics["mae"]["value"] == pytest.approx(np.mean(np.abs(pred - true)))
    assert metrics["pearson_r"]["value"] == pytest.approx(np.corrcoef(pred, true)[0, 1])
    for name in ("mae", "mean_bias", "loa_lower", "loa_upper"):
        assert metrics[name]["ci_low"] <= metrics[name]["value"] <= metrics[name]["ci_high"]
    for plot in ("scatter.png", "bland_altman.png"):
        assert (out_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mae" in out.stdout and "UNTRAINED" in out.stderr


def test_agreement_statistics_on_known_numbers() -> None:
    true = np.arange(20, 80, dtype=float)
    m = agreement(true + 2.0, true, n_boot=200)
    assert m["mae"].value == 2.0 and m["mean_bias"].value == 2.0
    assert m["loa_lower"].value == m["loa_upper"].value == 2.0
    assert m["pearson_r"].value == pytest.approx(1.0)
    noisy = true + np.random.default_rng(1).normal(0, 5, len(true))
    m = agreement(noisy, true, n_boot=500)
    sd = np.std(noisy - true, ddof=1)
    assert m["loa_upper"].value - m["loa_lower"].value == pytest.approx(2 * 1.96 * sd)
    assert m["mae"].ci_low < m["mae"].value < m["mae"].ci_high


def test_the_bootstrap_resamples_patients_when_it_knows_them() -> None:
    """20 patients, 10 images each sharing the patient's error: the images are not 200
    independent errors, and only the patient bootstrap's interval is as wide as 20 patients'."""
    rng = np.random.default_rng(3)
    errors = np.repeat(rng.normal(0, 5, 20), 10) + rng.normal(0, 0.1, 200)
    true = rng.uniform(30, 80, 200)
    patients = [f"P{i // 10}" for i in range(200)]
    by_image = agreement(true + errors, true, n_boot=1000)["mean_bias"]
    by_patient = agreement(true + errors, true, n_boot=1000, patients=patients)["mean_bias"]
    assert by_image.value == by_patient.value
    width = lambda e: e.ci_high - e.ci_low  # noqa: E731
    assert width(by_patient) > 2.5 * width(by_image)
    expected = 2 * 1.96 * 5 / np.sqrt(20)  # about 4.4 years
    assert 0.6 * expected < width(by_patient) < 1.4 * expected


def test_jsrt_and_plain_label_tables(tmp_path: Path) -> None:
    jsrt = tmp_path / "CLNDAT_EN.txt"
    jsrt.write_text(
        "JPCLN001.IMG\t3\t15\t53\tmale\t1634\t692\tmalignant\tlung cancer\n"
        "JPCNN001.IMG\t41\tfemale\tnon-nodule\n"
    )
    assert read_labels(jsrt).ages == {"JPCLN001": 53.0, "JPCNN001": 41.0}
    plain = tmp_path / "labels.csv"
    plain.write_text("file,age\nscans/a.dcm,61\nb.png,070Y\n")
    assert read_labels(plain).ages == {"a": 61.0, "b": 70.0}
