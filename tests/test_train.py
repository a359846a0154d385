"""``xrayage train`` on a synthetic set whose images carry a learnable age signal: it learns,
it resumes, its files load in ``xrayage infer``, and its age-gap correction reaches the SR."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ai.card import ModelCard, load_card
from ai.errors import LabelsError
from ai.train import (
    fit_gap_correction,
    labelled_examples,
    nih_examples,
    split_by_patient,
)
from node.report.findings import Findings
from node.report.sr import CORRECTED_DIFFERENCE, build_sr
from node.report.uids import ReportUIDs
from tests.conftest import dciodvfy_errors
from tests.servers import XRAYAGE

SIZE = 96


def picture(age: float, rng: np.random.Generator) -> np.ndarray:
    """A bright vertical band whose width grows with age (8 px at 20 years, 64 px at 80), on a
    noisy background: brightness, contrast and a few degrees of rotation leave it readable."""
    image = rng.normal(60, 12, (SIZE, SIZE))
    width = round(8 + (age - 20) / 60 * 56)
    left = (SIZE - width) // 2
    image[8:-8, left : left + width] += 120
    return np.clip(image, 0, 255).astype(np.uint8)


def dicom_file(path: Path, pixels: np.ndarray, patient: str) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.Modality = patient, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 patients, 3 images each at one age from 20 to 80; a few patients' as DICOM (their
    Patient ID is in the file), the rest PNG with a patient_id column."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(7)
    rows = []
    for p in range(90):
        age = float(rng.uniform(20, 80))
        for k in range(3):
            pixels = picture(age, rng)
            if p < 4:
                name = f"p{p:03d}_{k}.dcm"
                dicom_file(root / name, pixels, f"P{p:03d}")
                rows.append((name, f"{age:.1f}", ""))
            else:
                name = f"p{p:03d}_{k}.png"
                Image.fromarray(pixels).save(root / name)
                rows.append((name, f"{age:.1f}", f"P{p:03d}"))
    rows.append(("p999_0.png", "414", "P999"))  # NIH-style impossible age: left out
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "age", "patient_id"])
        writer.writerows(rows)
    return root


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(XRAYAGE), *map(str, args)], capture_output=True, text=True, timeout=600
    )


def train_args(data: Path, out: Path, epochs: int) -> list[str | Path]:
    return [
        "train", "--labels", data / "labels.csv", "--images", data, "--out", out,
        "--arch", "seresnet18", "--input-size", "48", "--epochs", str(epochs),
        "--batch-size", "32", "--lr", "3e-3", "--val-fraction", "0.2", "--workers", "0",
        "--device", "cpu",
    ]  # fmt: skip


def history(out: Path) -> list[dict[str, str]]:
    with (out / "history.csv").open() as f:
        return list(csv.DictReader(f))


def test_examples_are_split_by_patient_and_bad_rows_left_out(synthetic: Path) -> None:
    examples = labelled_examples(synthetic / "labels.csv", synthetic)
    assert len(examples.items) == 270
    assert examples.excluded == ["labels.csv:272: implausible age 414"]
    # DICOM files without a patient_id column are grouped by their Patient ID
    assert {e.patient for e in examples.items if e.path.suffix == ".dcm"} == {
        "P000", "P001", "P002", "P003"
    }  # fmt: skip
    train, val = split_by_patient(examples.items, 0.2, seed=0)
    assert len(train) + len(val) == 270 and len({e.patient for e in val}) == 18
    assert not {e.patient for e in train} & {e.patient for e in val}


def test_nih_table_keeps_frontal_views_with_plausible_ages(tmp_path: Path) -> None:
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images_001/images" / name)
    table = tmp_path / "Data_Entry_2017.csv"
    table.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position\n"
        "a.png,No Finding,0,1,58,M,PA\nb.png,Effusion,1,1,414,M,AP\n"
        "c.png,No Finding,0,2,40,F,LL\nd.png,No Finding,0,3,33,F,AP\ne.png,x,0,4,50,F,PA\n"
    )
    examples = nih_examples(table, tmp_path)
    assert [(e.path.name, e.age, e.patient) for e in examples.items] == [
        ("a.png", 58.0, "1"), ("d.png", 33.0, "3")
    ]  # fmt: skip
    assert [r.split(": ", 1)[1] for r in examples.excluded] == [
        "implausible age 414", "view 'LL' is not frontal", "e.png not found under " + str(tmp_path)
    ]  # fmt: skip
    with pytest.raises(LabelsError, match="no column patient id"):
        table.write_text("Image Index,Patient Age,View Position\na.png,58,PA\n")
        nih_examples(table, tmp_path)


def test_training_learns_resumes_and_its_files_load_in_infer(
    synthetic: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    first = run(*train_args(synthetic, out, epochs=2), "--torchscript")
    assert first.returncode == 0, first.stderr
    assert [r["epoch"] for r in history(out)] == ["1", "2"]
    # resuming continues from the checkpoint: epochs 3.. only, the same validation set
    second = run(*train_args(synthetic, out, epochs=5), "--resume", "--torchscript")
    assert second.returncode == 0, second.stderr
    rows = history(out)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 6)]
    assert "epoch 1:" not in second.stdout and "epoch 3:" in second.stdout
    assert (out / "history.png").stat().st_size > 0

    examples = labelled_examples(synthetic / "labels.csv", synthetic)
    train, val = split_by_patient(examples.items, 0.2, seed=0)
    ages = np.array([e.age for e in val])
    constant_mae = float(np.mean(np.abs(ages - np.mean([e.age for e in train]))))
    best = min(float(r["val_mae"]) for r in rows)
    assert best < constant_mae / 2, (best, constant_mae)

    card = load_card(out / "model.safetensors", required=True)
    assert card.architecture == "seresnet18" and card.input_size == 48
    assert card.gap_correction is not None and f"{best:.2f}" in " ".join(card.notes)

    # both files load unchanged in `xrayage infer` and agree with each other
    probe = [e.path for e in val[:4]]
    answers = []
    for weights in (out / "model.safetensors", out / "model-torchscript.pt"):
        result = run("infer", "--weights", weights, "--device", "cpu", "--json", *probe)
        assert result.returncode == 0, result.stderr
        answers.append([row["xray_age"] for row in json.loads(result.stdout)])
    assert np.allclose(answers[0], answers[1], atol=1e-3)
    assert np.mean(np.abs(np.array(answers[0]) - ages[:4])) < constant_mae


def test_resume_without_a_checkpoint_is_one_line(synthetic: Path, tmp_path: Path) -> None:
    result = run(*train_args(synthetic, tmp_path / "none", epochs=1), "--resume")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"xrayage: error: {tmp_path / 'none' / 'checkpoint.pt'}: no checkpoint to resume from"
    )


def numbers(items: pydicom.Sequence) -> dict[str, float]:
    """NUM content items anywhere in an SR content tree, by concept code."""
    found = {}
    for item in items:
        if item.ValueType == "NUM":
            code = item.ConceptNameCodeSequence[0].CodeValue
            found[code] = float(item.MeasuredValueSequence[0].NumericValue)
        found |= numbers(item.get("ContentSequence", []))
    return found


def test_gap_correction_removes_the_trend_and_reaches_the_report(
    chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    # estimates shrunk towards 50: the raw gap falls with age, the corrected one does not
    actual = np.linspace(20, 80, 31)
    predicted = 50 + 0.6 * (actual - 50)
    slope, intercept = fit_gap_correction(predicted, actual)
    assert slope == pytest.approx(-0.4) and intercept == pytest.approx(20.0)
    card = ModelCard(name="t", sha256="0" * 64, gap_correction=(slope, intercept))
    corrected = [
        Findings(float(p), float(a), card).corrected_age_gap
        for p, a in zip(predicted, actual, strict=True)
    ]
    assert np.allclose(corrected, 0, atol=0.01)

    sr = build_sr(chest_ds, Findings(70.0, 60.0, card), ReportUIDs("1.2.3", card.sha256), "X", 1)
    values = numbers(sr.ContentSequence)
    # raw gap 10; expected at 60 years: -0.4 * 60 + 20 = -4; so 14 once corrected
    assert values["XA-002"] == 10.0 and values[CORRECTED_DIFFERENCE.value] == 14.0
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    # without a correction in the card, no corrected gap is claimed
    plain = build_sr(chest_ds, Findings(70.0, 60.0, ModelCard(name="t", sha256="0" * 64)),
                     ReportUIDs("1.2.3", "0" * 64), "X", 1)  # fmt: skip
    assert CORRECTED_DIFFERENCE.value not in numbers(plain.ContentSequence)


def test_fine_tuning_needs_safetensors_of_the_same_architecture(
    synthetic: Path, tmp_path: Path
) -> None:
    torchscript = tmp_path / "model.pt"
    torchscript.write_bytes(b"not really")
    result = run(*train_args(synthetic, tmp_path / "ft", epochs=1), "--weights", torchscript)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("xrayage: error: ") and "starts from safetensors weights" in last
