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
from node.cohort.analysis import Plan, analyse
from node.cohort.inputs import Image, Outcome, Selection, build_cohort, image
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
    index = () if "--index" in args else ("--index", "nearest")
    code, stdout, stderr = cohort(
        "--results", str(results), "--outcomes", str(outcomes), "--out", str(folder / "out"),
        *index, *args,
    )  # fmt: skip
    assert code == 0, stderr
    (folder / "stdout").write_text(stdout)
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
        (index, origin): build_cohort(
            outcomes,
            images,
            Selection(index, index_date=origin),  # type: ignore[arg-type]
        ).rows[0]["xray_age"]
        for index in ("first", "last", "nearest")
        for origin in (True, False)
        if origin or index != "nearest"
    }
    # From index_date (the 12th), the image of the 20th never indexes: it is after the origin.
    assert chosen == {
        ("first", True): 61, ("last", True): 62, ("nearest", True): 62,
        ("first", False): 61, ("last", False): 63,
    }  # fmt: skip
    images += [
        _image("B", 5, 70), _image("C", 5, 70, age=None), _image("D", 5, 70, age=12),
        _image("E", 5, 70, sex="O"), _image("F", 20, 70), _image("X", 5, 70),
    ]  # fmt: skip
    outcomes += [
        _outcome("B", days=None), _outcome("C", index_day=6), _outcome("D", index_day=6),
        _outcome("E", index_day=6), _outcome("F", index_day=12), _outcome("G"), _outcome("H"),
    ]  # fmt: skip
    images.append(_image("H", 1, 70))
    c = build_cohort(outcomes, images, Selection("nearest", horizon_days=50, index_date=True))
    assert [r["patient_id"] for r in c.rows] == ["A"]
    assert (c.rows[0]["followup_days"], c.rows[0]["event"]) == (50, 0)  # censored at 50 days
    assert c.excluded == [
        ("B", "no follow-up"),
        ("C", "no chronological age"),
        ("D", "age outside the model's range 18-100"),
        ("E", "sex not M or F"),
        ("F", "no result on or before index_date"),
        ("G", "no result"),
        ("H", "no index_date"),
    ]
    c = build_cohort(outcomes, images, Selection("first"))
    assert dict(c.excluded) == {
        "B": "no follow-up",
        "C": "no chronological age",
        "D": "age outside the model's range 18-100",
        "E": "sex not M or F",
        "G": "no result",
    }
    assert c.results_without_outcomes == 1  # X


def test_an_image_too_long_before_index_date_is_excluded_and_age_is_at_the_origin() -> None:
    """Today's rule took any earlier image, years before; now the lag is bounded, and the age
    (a Cox covariate) is the age at the index date, the gap the image's own."""
    images = [
        Image("OLD", dt.date(2020, 1, 1), 70.0, 60.0, "F", "m", "1", "abc", "1"),
        Image("NEW", dt.date(2025, 1, 1), 70.0, 60.0, "M", "m", "1", "abc", "2"),
    ]
    outcomes = [
        Outcome(2, "OLD", 100, 1, dt.date(2025, 7, 1), {}),
        Outcome(3, "NEW", 100, 1, dt.date(2025, 7, 1), {}),
    ]
    c = build_cohort(outcomes, images, Selection("nearest", index_date=True))
    assert c.excluded == [("OLD", "no result within 365 days before index_date")]
    (row,) = c.rows
    assert row["lag_days"] == 181 and row["age_at_image"] == 60.0
    assert row["age"] == pytest.approx(60.0 + 181 / 365.25)
    wide = build_cohort(outcomes, images, Selection("nearest", index_date=True, max_lag_days=2100))
    assert [r["patient_id"] for r in wide.rows] == ["OLD", "NEW"] and wide.excluded == []


def test_images_after_the_origin_no_longer_bias_the_hazard_ratio(tmp_path: Path) -> None:
    """Planted: every patient also has an image after their follow-up ended, 6 years
    older-looking in those with the event (the disease shaping the image: reverse causation).
    Indexing the last image regardless of index_date, as before, inflates the hazard ratio far
    beyond the truth (1.05 per year); counted from index_date, the truth is recovered."""
    truth = Truth(n=2000, seed=9, hr_per_year=1.05, after_event_shift=6.0)
    s = _analyse(tmp_path, truth, "--index", "last")
    assert s["time_origin"]["origin"] == "index_date" and s["n_patients"] == 2000
    assert _covers(s["cox"]["gap"]["ci95"], truth.hr_per_year), s["cox"]["gap"]
    results, outcomes = synthetic_cohort(truth)
    naive = build_cohort(
        [Outcome(2, o["patient_id"], o["followup_days"], o["event"], None, {}) for o in outcomes],
        [image(r, "-") for r in results],
        Selection("last"),  # follow-up from the last image: the rule before index_date counted
    )
    biased = analyse(naive, Plan())
    assert biased.summary["cox"]["gap"]["ci95"][0] > s["cox"]["gap"]["ci95"][1] > 1.05
    lags = s["time_origin"]["lag_days"]
    assert lags["median"] == 0 and s["time_origin"]["max_lag_days"] == 365


def test_the_aging_rate_as_exposure_recovers_its_planted_hazard(tmp_path: Path) -> None:
    """Planted: each patient's X-ray age rises at a rate of their own (SD 1 year per year
    around 0.7), with a hazard ratio of 1.3 per unit; patients without two images a year apart
    have no rate and are excluded with the reason."""
    truth = Truth(n=3000, seed=4, hr_per_year=1.05, rate_sd=1.0, hr_per_rate=1.3)
    s = _analyse(tmp_path, truth, "--index", "last", "--exposure", "aging_rate")
    rate = s["cox"]["aging_rate"]
    assert _covers(rate["ci95"], truth.hr_per_rate) and rate["p"] < 1e-6, rate
    assert _covers(rate["adjusted_for_corrected_gap"]["ci95"], truth.hr_per_rate)
    assert _covers(s["cox"]["gap"]["ci95"], truth.hr_per_year)  # the gap beside it
    (reason,) = s["excluded"]
    assert reason.startswith("no aging rate") and s["n_patients"] + s["excluded"][reason] == 3000
    assert list(s["km"]["groups"]) == ["rate <= 1", "rate > 1"]
    assert "least-squares slope of X-ray age on study date" in s["exposure_definition"]
    assert "aging_rate: hazard ratio" in (tmp_path / "stdout").read_text()


def test_the_correction_is_chosen_and_said(tmp_path: Path) -> None:
    """``card``: the results' corrected_age_gap (what the SR said); ``cohort``: refitted here.
    The report names the formula the code used."""
    by_cohort = _analyse(tmp_path / "a", Truth(n=600, seed=5))
    by_card = _analyse(tmp_path / "b", Truth(n=600, seed=5), "--correction", "card")
    assert (by_cohort["correction"], by_card["correction"]) == ("cohort", "card")
    results, _ = synthetic_cohort(Truth(n=600, seed=5))
    index_images = [r for r in results if r["sop_instance_uid"].endswith("0")]
    expected = sum(r["corrected_age_gap"] for r in index_images) / len(index_images)
    assert by_card["gaps"]["corrected_gap"]["mean"] == pytest.approx(expected)
    assert abs(by_cohort["gaps"]["corrected_gap"]["mean"]) < 1e-9  # a residual: mean 0
    assert "model card's gap correction" in by_card["exposure_definition"]
    slope = f"{by_cohort['bias_correction']['slope']:.3f} x age at the image"
    assert slope in by_cohort["exposure_definition"]
    for folder, said in ((tmp_path / "a", "in this cohort"), (tmp_path / "b", "model card")):
        assert said in (folder / "out" / "report.html").read_text()
    results = [{**r, "corrected_age_gap": None} for r in results]
    _, outcomes = synthetic_cohort(Truth(n=600, seed=5))
    (tmp_path / "c").mkdir()
    message = _bad(tmp_path / "c", outcomes, "--correction", "card", results=results)
    assert "--correction card: no result has a corrected_age_gap" in message


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
