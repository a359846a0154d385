"""The X-ray aging rate: the least-squares slope of a patient's X-ray ages on their study dates,
computed over the images up to each row's, in every export (``xrayage results``, its
``--per-patient`` view, ``/api/results``); none without two images a year apart."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from node.http.app import create_app
from node.results.aging import MIN_SPAN_DAYS, aging_rate
from storage import Database, Instance, InstanceState, Result
from tests.test_cli import run

# Patient A: X-ray age rising about 1.5 years a year over four images, which arrive out of
# study-date order (the rate and the latest image follow the study dates); B: two images two
# months apart (no rate); C: one image.
IMAGES = [
    ("A", dt.date(2020, 1, 1), 60.0), ("A", dt.date(2025, 7, 2), 68.0),
    ("A", dt.date(2022, 1, 1), 63.2), ("A", dt.date(2024, 1, 1), 66.0),
    ("B", dt.date(2025, 1, 1), 50.0), ("B", dt.date(2025, 3, 1), 55.0),
    ("C", dt.date(2025, 1, 1), 40.0),
]  # fmt: skip
SHA = "ab" * 32


@pytest.fixture
def config(tmp_path: Path) -> Path:
    db = Database.sqlite_in(tmp_path / "data")
    db.create_schema()
    with db.session() as s:
        for n, (pid, when, age) in enumerate(IMAGES):
            inst = Instance(
                sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                path="-", sha256="-", size=0, state=InstanceState.REPORTED, patient_id=pid,
                study_date=when,
            )  # fmt: skip
            s.add(inst)
            s.flush()
            s.add(Result(instance_id=inst.id, model_name="m", model_version="1",
                         model_sha256=SHA, xray_age=age, chronological_age=age - 5))  # fmt: skip
    db.dispose()
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n')
    return path


def _expected(points: list[tuple[dt.date, float]]) -> float:
    years = [(d - points[0][0]).days / 365.25 for d, _ in points]
    return float(np.polyfit(years, [a for _, a in points], 1)[0])


def test_the_rate_and_its_bounds() -> None:
    a = sorted((d, x) for p, d, x in IMAGES if p == "A")
    rate = aging_rate(a)
    assert rate is not None and rate.images == 4 and rate.se is not None
    assert rate.rate == pytest.approx(_expected(a))
    assert rate.at(a[0][0]) == pytest.approx(rate.intercept)
    two = aging_rate(a[:2])
    assert two is not None and two.se is None  # an exact line: no residual to estimate from
    assert aging_rate([(dt.date(2025, 1, 1), 50.0), (dt.date(2025, 3, 1), 55.0)]) is None
    assert aging_rate([(dt.date(2025, 1, 1), 50.0)]) is None
    assert MIN_SPAN_DAYS == 365


def test_each_exported_row_has_the_rate_up_to_it(config: Path) -> None:
    out = run("results", "-f", "json", "-c", str(config))
    assert out.returncode == 0, out.stderr
    rows = {(r["patient_id"], r["study_date"]): r for r in json.loads(out.stdout)}
    a = sorted((d, x) for p, d, x in IMAGES if p == "A")
    assert rows[("A", "2020-01-01")]["aging_rate"] is None  # the first: nothing before it
    assert rows[("A", "2022-01-01")]["aging_rate"] == pytest.approx(_expected(a[:2]))
    assert rows[("A", "2024-01-01")]["aging_rate"] == pytest.approx(_expected(a[:3]))
    newest = rows[("A", "2025-07-02")]
    assert newest["aging_rate"] == pytest.approx(_expected(a))
    assert newest["aging_rate_images"] == 4 and newest["aging_rate_se"] > 0
    assert rows[("B", "2025-03-01")]["aging_rate"] is None  # two months: no rate
    assert rows[("C", "2025-01-01")]["aging_rate_images"] is None


def test_per_patient_rows_and_the_api(config: Path) -> None:
    out = run("results", "--per-patient", "-f", "json", "-c", str(config))
    assert out.returncode == 0, out.stderr
    patients = {r["patient_id"]: r for r in json.loads(out.stdout)}
    assert set(patients) == {"A", "B", "C"}
    a = patients["A"]
    assert (a["images"], a["first_study_date"], a["study_date"]) == (4, "2020-01-01", "2025-07-02")
    assert a["aging_rate_images"] == 4 and a["xray_age"] == 68.0
    assert patients["B"]["aging_rate"] is None and patients["B"]["images"] == 2
    table = run("results", "--per-patient", "-c", str(config))
    assert table.returncode == 0 and table.stdout.rstrip().endswith("3 patients")
    assert max(len(line) for line in table.stdout.splitlines()) <= 120  # a terminal's width
    parquet = run("results", "--per-patient", "-f", "parquet", "-c", str(config))
    assert parquet.returncode == 2 and "--per-patient" in parquet.stderr

    db = Database.sqlite_in(config.parent / "data")
    client = TestClient(create_app(db, {"lab": "token-for-the-aging-rate"}))
    page = client.get(
        "/api/results?patient_id=A", headers={"Authorization": "Bearer token-for-the-aging-rate"}
    ).json()
    assert {"aging_rate", "aging_rate_se", "aging_rate_images"} <= set(page["columns"])
    latest = next(r for r in page["results"] if r["study_date"] == "2025-07-02")
    assert latest["aging_rate"] == pytest.approx(a["aging_rate"]) and len(page["results"]) == 4
    db.dispose()
