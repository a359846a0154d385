"""``xrayage cohort`` on synthetic cohorts with planted effects: the estimates land within their
confidence intervals of the truth, the gap adds to the C-index, a null cohort's interval covers
1; exclusions are counted by reason; a node's database (pseudonymised) is read as well as an
export; bad input ends in one line and exit status 2."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli.main import app
from node.cohort.inputs import Image, Outcome, build_cohort
from node.cohort.synthetic import Truth, synthetic_cohort
from node.results.export import plain
from storage import AuditEvent, Database, Instance, InstanceState, Result

COHORT_KEYS = {
    "n_patients", "n_events", "excluded", "exposure", "cox", "ph_test", "c_index", "lr_test_p",
    "logrank_p", "km", "comorbidities",
}  # fmt: skip
COMORBIDITIES = "hypertension,atrial_fibrillation"
FULL_MODEL = "age,sex,egfr,anaemia"  # the terms of the synthetic hazard


def _write(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: plain(v) for k, v in row.items()} for row in rows)
    return path


def _cohort_files(folder: Path, truth: Truth) -> tuple[Path, Path]:
    results, outcomes = synthetic_cohort(truth)
    folder.mkdir(parents=True, exist_ok=True)
    return _write(folder / "results.csv", results), _write(folder / "outcomes.csv", outcomes)


def cohort(*args: str) -> tuple[int, str, str]:
    out = CliRunner().invoke(app, ["cohort", *args])
    return out.exit_code, out.stdout, out.stderr


def _analyse(folder: Path, truth: Truth, *args: str) -> dict[str, Any]:
    results, outcomes = _cohort_files(folder, truth)
    code, _, stderr = cohort(
        "--results", str(results), "--outcomes", str(outcomes), "--out", str(folder / "out"),
        "--index", "nearest", *args,
    )  # fmt: skip
    assert code == 0, stderr
    return dict(json.loads((folder / "out" / "cohort.json").read_text()))


def _covers(ci: Sequence[float], truth: float) -> bool:
    return ci[0] <= truth <= ci[1]


def test_planted_effects_land_within_their_intervals(tmp_path: Path) -> None:
    # One fixed seed: 95 % intervals miss now and then by design (seeds 7-14: 3 of 8 missed one
    # of the eight checks below); this seed's cohort is one where none does.
    truth = Truth(n=2000, seed=9, hr_per_year=1.06)
    s = _analyse(tmp_path, truth, "--adjust", FULL_MODEL, "--comorbidities", COMORBIDITIES)
    assert s.keys() >= COHORT_KEYS and s["synthetic"] is True
    assert s["exposure"] == "corrected_gap" and s["n_patients"] == 2000 and s["excluded"] == {}
    gap = s["cox"]["gap"]
    assert _covers(gap["ci95"], truth.hr_per_year), gap
    assert gap["p"] < 1e-3 and gap["hr_per_5_years"] == pytest.approx(gap["hr_per_year"] ** 5)
    covariates = s["cox"]["covariates"]
    assert list(covariates) == ["age", "sex", "egfr", "anaemia"]
    for name, log_hr in {"age": 0.03, "sex": 0.2, "egfr": -0.01, "anaemia": 0.3}.items():
        assert _covers(covariates[name]["ci95"], math.exp(log_hr)), (name, covariates[name])
    for name, shift in truth.shifts.items():
        c = s["comorbidities"][name]
        assert _covers(c["ci95"], shift) and c["p"] < 0.01, (name, c)
    assert s["c_index"]["with_gap"] > s["c_index"]["without_gap"] and s["lr_test_p"] < 1e-3
    assert s["logrank_p"] < 0.05 and set(s["ph_test"]) == {"corrected_gap", *covariates}
    groups = s["km"]["groups"]
    assert list(groups) == ["gap <= 0", "gap > 0"]
    assert sum(g["n"] for g in groups.values()) == 2000
    assert sum(g["events"] for g in groups.values()) == s["n_events"]
    # The model's regression to the mean is undone: the raw gap tracks age, the corrected not.
    assert s["bias_correction"]["slope"] == pytest.approx(0.7, abs=0.05)
    out = tmp_path / "out"
    for name in ("km.png", "forest.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "SYNTHETIC DEMO COHORT" in page and page.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # readable offline


def test_null_cohort_gives_an_interval_covering_one(tmp_path: Path) -> None:
    s = _analyse(tmp_path, Truth(n=1500, seed=11, hr_per_year=1.0), "--groups", "tertiles")
    assert _covers(s["cox"]["gap"]["ci95"], 1.0) and s["cox"]["gap"]["p"] > 0.05
    assert len(s["km"]["groups"]) == 3 and s["logrank_p"] > 0.05
    assert s["comorbidities"] == {} and s["cox"]["covariates"].keys() == {"age", "sex"}


def _image(pid: str, day: int, xray_age: float, age: float | None = 60.0, sex: str = "F") -> Image:
    return Image(pid, dt.date(2025, 1, day), xray_age, age, sex, "m", "1", "abc", f"{day}")


def _outcome(pid: str, days: float | None = 100, index_day: int | None = None) -> Outcome:
    index_date = dt.date(2025, 1, index_day) if index_day else None
    return Outcome(2, pid, days, None if days is None else 1, index_date, {})


def test_index_image_and_exclusions_by_reason() -> None:
    images = [_image("A", 5, 61), _image("A", 10, 62), _image("A", 20, 63)]
    outcomes = [_outcome("A", index_day=12)]
    chosen = {
        index: build_cohort(outcomes, images, index, (18, 100), None).rows[0]["xray_age"]  # type: ignore[arg-type]
        for index in ("first", "last", "nearest")
    }
    assert chosen == {"first": 61, "last": 63, "nearest": 62}
    images += [
        _image("B", 5, 70), _image("C", 5, 70, age=None), _image("D", 5, 70, age=12),
        _image("E", 5, 70, sex="O"), _image("F", 20, 70), _image("X", 5, 70),
    ]  # fmt: skip
    outcomes += [
        _outcome("B", days=None), _outcome("C"), _outcome("D"), _outcome("E"),
        _outcome("F", index_day=12), _outcome("G"),
    ]  # fmt: skip
    c = build_cohort(outcomes, images, "nearest", (18, 100), horizon_days=50)
    assert [r["patient_id"] for r in c.rows] == ["A"]
    assert (c.rows[0]["followup_days"], c.rows[0]["event"]) == (50, 0)  # censored at 50 days
    assert c.excluded == [
        ("B", "no follow-up"),
        ("C", "no index_date"),
        ("D", "no index_date"),
        ("E", "no index_date"),
        ("F", "no result on or before index_date"),
        ("G", "no result"),
    ]
    c = build_cohort(outcomes, images, "first", (18, 100), None)
    assert dict(c.excluded) == {
        "B": "no follow-up",
        "C": "no chronological age",
        "D": "age outside the model's range 18-100",
        "E": "sex not M or F",
        "G": "no result",
    }
    assert c.results_without_outcomes == 1  # X


def test_exclusions_reach_the_outputs(tmp_path: Path) -> None:
    results, outcomes = synthetic_cohort(Truth(n=300, seed=5))
    outcomes[0]["followup_days"] = ""
    outcomes[1]["egfr"] = ""
    results = [r for r in results if r["patient_id"] != outcomes[2]["patient_id"]]
    args = ["--results", str(_write(tmp_path / "r.csv", results))]
    args += ["--outcomes", str(_write(tmp_path / "o.csv", outcomes)), "--out", str(tmp_path / "o")]
    code, stdout, stderr = cohort(*args, "--adjust", "age,sex,egfr")
    assert code == 0, stderr
    s = json.loads((tmp_path / "o" / "cohort.json").read_text())
    assert s["excluded"] == {"no follow-up": 1, "no egfr": 1, "no result": 1}
    assert s["n_patients"] == 297 and "297 patients" in stdout
    listed = (tmp_path / "o" / "excluded.csv").read_text().splitlines()
    assert listed[0] == "patient_id,reason" and len(listed) == 4
    assert f"{outcomes[1]['patient_id']},no egfr" in listed


def test_database_results_pseudonymised_join_the_outcomes(tmp_path: Path) -> None:
    """The node's own database as the source: with a key, both sides are pseudonymised and
    nothing written names a patient."""
    results, outcomes = synthetic_cohort(Truth(n=120, seed=2))
    db = Database.sqlite_in(tmp_path / "data")
    db.create_schema()
    with db.session() as s:
        for i, r in enumerate(results):
            instance = Instance(
                sop_instance_uid=r["sop_instance_uid"], sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                patient_id=r["patient_id"], patient_sex=r["patient_sex"],
                study_date=r["study_date"], path=f"x/{i}", sha256="0" * 64, size=1,
                state=InstanceState.DELIVERED,
            )  # fmt: skip
            s.add(instance)
            s.flush()
            result = Result(
                instance_id=instance.id, model_sha256="0" * 64, model_name="synthetic",
                model_version="1", xray_age=r["xray_age"], chronological_age=r["chronological_age"],
            )  # fmt: skip
            s.add(result)
    outcomes[0]["event"] = ""  # excluded, and listed under its pseudonym
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n')
    key = tmp_path / "site.key"
    key.write_bytes(b"k" * 32)
    out = tmp_path / "out"
    code, _, stderr = cohort(
        "--config", str(config), "--outcomes", str(_write(tmp_path / "o.csv", outcomes)),
        "--out", str(out), "--pseudonymise-key-file", str(key), "--index", "last",
    )  # fmt: skip
    assert code == 0, stderr
    s = json.loads((out / "cohort.json").read_text())
    assert s["n_patients"] == 119 and s["excluded"] == {"no follow-up": 1}
    assert s["model"] == f"synthetic 1 {'0' * 64}" and s["synthetic"] is False
    (listed,) = list(csv.DictReader((out / "excluded.csv").open()))
    assert re.fullmatch("[0-9a-f]{32}", listed["patient_id"])
    for path in out.iterdir():
        assert b"SYNTHETIC-" not in path.read_bytes(), path
    with db.session() as session:  # read as an export is: audited
        (audited,) = session.scalars(select(AuditEvent).where(AuditEvent.event == "export"))
    assert audited.detail == f"results: {len(results)} rows pseudonymised"
    assert audited.actor.endswith(" cohort")


def test_demo_writes_a_labelled_synthetic_cohort_and_its_analysis(tmp_path: Path) -> None:
    code, stdout, stderr = cohort("--demo", str(tmp_path / "demo"))
    assert code == 0, stderr
    assert stdout.startswith("SYNTHETIC demo cohort: not patient data")
    assert (tmp_path / "demo" / "SYNTHETIC.txt").is_file()
    s = json.loads((tmp_path / "demo" / "report" / "cohort.json").read_text())
    assert s["synthetic"] and set(s["comorbidities"]) == set(COMORBIDITIES.split(","))


def _bad(tmp_path: Path, outcomes: list[dict[str, Any]], *args: str, results: Any = None) -> str:
    results_rows, _ = synthetic_cohort(Truth(n=len(outcomes), seed=3))
    code, stdout, stderr = cohort(
        "--results", str(_write(tmp_path / "r.csv", results or results_rows)),
        "--outcomes", str(_write(tmp_path / "o.csv", outcomes)), "--out", str(tmp_path / "o"),
        *args,
    )  # fmt: skip
    assert code == 2 and stderr.startswith("xrayage: error: "), (code, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    return stderr


@pytest.mark.parametrize(
    ("edit", "args", "message"),
    [
        (lambda o: [{k: v for k, v in r.items() if k != "event"} for r in o], (),
         r"no column event"),
        (lambda o: [{**r, "followup_days": -5} if i == 3 else r for i, r in enumerate(o)], (),
         r"line 5 \(patient_id 'SYNTHETIC-00004'\): followup_days -5 is negative"),
        (lambda o: [{**r, "event": "2"} if i == 0 else r for i, r in enumerate(o)], (),
         r"line 2 \(patient_id 'SYNTHETIC-00001'\): event '2' is not 0 or 1"),
        (lambda o: [{**r, "egfr": "high"} if i == 1 else r for i, r in enumerate(o)],
         ("--adjust", "age,sex,egfr"), r"line 3 .*: egfr 'high' is not a number"),
        (lambda o: o, ("--adjust", "age,sex,bmi"), r"no column 'bmi'"),
        (lambda o: [{**r, "anaemia": "yes"} for r in o], ("--adjust", "age,sex,anaemia"),
         r"--adjust: column 'anaemia' is constant"),
        (lambda o: [{**r, "event": int(i < 7)} for i, r in enumerate(o)], (),
         r"only 7 events among 60 analysable patients: at least 10"),
        (lambda o: o, ("--index", "nearest", "--groups", "deciles"), r"--groups: 'deciles'"),
        (lambda o: [{k: v for k, v in r.items() if k != "index_date"} for r in o],
         ("--index", "nearest"), r"--index nearest: .* has no index_date column"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_row_or_column(
    tmp_path: Path, edit: Any, args: tuple[str, ...], message: str
) -> None:
    _, outcomes = synthetic_cohort(Truth(n=60, seed=3))
    assert re.search(message, _bad(tmp_path, edit(outcomes), *args))


def test_results_of_two_models_need_a_choice(tmp_path: Path) -> None:
    results, outcomes = synthetic_cohort(Truth(n=60, seed=3))
    results += [{**r, "model_name": "other", "weights_sha256": "f" * 64} for r in results]
    assert "choose one with --model" in _bad(tmp_path, outcomes, results=results)
    code, _, stderr = cohort(
        "--results", str(tmp_path / "r.csv"), "--outcomes", str(tmp_path / "o.csv"),
        "--out", str(tmp_path / "o"), "--model", "other",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads((tmp_path / "o" / "cohort.json").read_text())["model"].startswith("other")
