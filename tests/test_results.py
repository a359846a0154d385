"""Results as data: real chest CRs (edited ages, sexes and devices) through a real node, then
``xrayage results`` in each format, pseudonymised or not, ``/api/results`` paged, the SR held
to the row, the exports audited, and one log line per step of each image."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from node.results.export import COLUMNS
from node.service import NodeService
from storage import AuditEvent, InstanceState, Result
from tests.conftest import node_in_process, require, small_chests, storescu
from tests.servers import XRAYAGE, free_port, wait_until
from tests.test_cli import run
from tests.test_end_to_end import _nums
from tests.test_summary_image import PLOT_ROWS

TOKEN = "results-token-for-tests"
Reported = tuple[NodeService, Path, str]


@pytest.fixture
def reported(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[Reported]:
    """A node that has reported three chest CRs of two patients, with its config file and the
    base URL of its API."""
    caplog.set_level(logging.INFO)
    http = free_port()
    with node_in_process(
        tmp_path, model={"weights": str(weights)}, http={"port": http, "tokens": {"lab": TOKEN}}
    ) as node:
        common = {"ViewPosition": "PA", "StudyDate": "20261101"}
        images = small_chests(
            chest_ds, tmp_path / "a", 2, "a", PatientID="PAT-A", PatientAge="061Y",
            PatientSex="F", Manufacturer="ACME", ManufacturerModelName="CR-1", **common,
        ) + small_chests(
            chest_ds, tmp_path / "b", 1, "b", PatientID="PAT-B", PatientAge="045Y",
            PatientSex="M", Manufacturer="OTHER", ManufacturerModelName="DX-9", **common,
        )  # fmt: skip
        brighter = pydicom.dcmread(images[-1])  # another image, another X-ray age
        brighter.PixelData = (brighter.pixel_array // 2 + 100).astype("uint16").tobytes()
        brighter.save_as(images[-1])
        assert storescu(node.settings.node.port, *images).returncode == 0

        def states() -> list[InstanceState]:
            with node.db.session() as s:
                return [r.instance.state for r in s.scalars(select(Result))]

        wait_until(lambda: states() == [InstanceState.REPORTED] * 3, 120, "three reports")
        config = tmp_path / "node.toml"
        config.write_text(
            f'[storage]\npath = "{tmp_path / "data"}"\n[model]\nweights = "{weights}"\n'
        )
        yield node, config, f"http://127.0.0.1:{http}"


def _csv(config: Path, *args: str) -> tuple[list[str], list[dict[str, str]]]:
    out = run("results", "-f", "csv", "-c", str(config), *args)
    assert out.returncode == 0, out.stderr
    reader = csv.DictReader(io.StringIO(out.stdout))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_rows_have_the_exact_columns_and_the_srs_values(reported: Reported) -> None:
    node, config, _ = reported
    columns, rows = _csv(config)
    assert columns == list(COLUMNS)
    assert [r["patient_id"] for r in rows] == ["PAT-B", "PAT-A", "PAT-A"]  # newest first
    assert {r["untrained"] for r in rows} == {"True"}  # the test weights' card says so
    table = run("results", "-c", str(config))
    assert "warning: 3 of these rows are from UNTRAINED weights" in table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 120  # fits a terminal
    b = rows[0]
    assert (b["patient_sex"], b["manufacturer"], b["manufacturer_model_name"]) == (
        "M", "OTHER", "DX-9",
    )  # fmt: skip
    assert (b["study_date"], b["view_position"], b["state"]) == ("2026-11-01", "PA", "reported")
    assert float(b["chronological_age"]) == 45.0
    assert b["reported_at"].endswith("Z") and len(b["weights_sha256"]) == 64
    with node.db.session() as s:
        sr_paths = {r.instance.sop_instance_uid: r.sr_path for r in s.scalars(select(Result))}
    for row in rows:  # the SR says what the row says: both come from the stored values
        said = _nums(pydicom.dcmread(sr_paths[row["sop_instance_uid"]]))
        assert said["X-ray age"][0] == pytest.approx(float(row["xray_age"]), abs=1e-9)
        assert said["Age"][0] == pytest.approx(float(row["chronological_age"]))
        gap = said["X-ray age minus chronological age"][0]
        assert gap == pytest.approx(float(row["age_gap"]), abs=1e-9)
        assert float(row["age_gap"]) == pytest.approx(
            float(row["xray_age"]) - float(row["chronological_age"]), abs=0.006
        )
    assert [r["patient_id"] for r in _csv(config, "--patient-id", "PAT-A")[1]] == ["PAT-A"] * 2
    assert _csv(config, "--state", "delivered")[1] == []
    with node.db.session() as s:  # the summary image plots the patient's earlier X-ray ages
        plotted = sorted(
            (r.instance.patient_id, bool(pydicom.dcmread(r.sc_path).pixel_array[PLOT_ROWS].any()))
            for r in s.scalars(select(Result))
        )
    assert plotted == [("PAT-A", False), ("PAT-A", True), ("PAT-B", False)]
    assert len(_csv(config, "--limit", "1")[1]) == 1


def test_a_pseudonymised_export_keeps_the_links_and_hides_the_identifiers(
    reported: Reported, tmp_path: Path
) -> None:
    node, config, _ = reported
    key, other = tmp_path / "key", tmp_path / "other-key"
    key.write_bytes(bytes(range(32)))
    other.write_bytes(bytes(range(1, 33)))
    plain = _csv(config)[1]
    first = _csv(config, "--pseudonymise-key-file", str(key))[1]
    again = _csv(config, "--pseudonymise-key-file", str(key))[1]
    elsewhere = _csv(config, "--pseudonymise-key-file", str(other))[1]
    assert first == again  # same key, same pseudonyms
    for name in ("patient_id", "accession_number", "study_instance_uid", "sop_instance_uid"):
        assert {r[name] for r in first}.isdisjoint({r[name] for r in plain if r[name]}), name
        assert [r[name] for r in first] != [r[name] for r in elsewhere], name
    assert first[1]["patient_id"] == first[2]["patient_id"] != first[0]["patient_id"]
    assert all(r["sop_instance_uid"].startswith("2.25.") for r in first)
    assert [r["xray_age"] for r in first] == [r["xray_age"] for r in plain]
    with node.db.session() as s:
        exports = s.scalars(
            select(AuditEvent.detail).where(AuditEvent.event == "export").order_by(AuditEvent.id)
        ).all()
    assert exports[0] == "results: 3 rows with patient identifiers (disclosure)"
    assert exports[1:4] == ["results: 3 rows pseudonymised"] * 3


def test_json_and_parquet_carry_the_same_rows(reported: Reported, tmp_path: Path) -> None:
    _, config, _ = reported
    out = run("results", "-f", "json", "-c", str(config))
    rows = json.loads(out.stdout)
    assert [list(r) for r in rows] == [list(COLUMNS)] * 3
    parquet = tmp_path / "r.parquet"
    with parquet.open("wb") as f:
        command = [str(XRAYAGE), "results", "-f", "parquet", "-c", str(config)]
        done = subprocess.run(command, stdout=f, timeout=120)
    assert done.returncode == 0
    table = pq.read_table(parquet)
    assert table.column_names == list(COLUMNS)
    assert table.column("xray_age").to_pylist() == [r["xray_age"] for r in rows]


def test_bad_options_are_one_line(reported: Reported, tmp_path: Path) -> None:
    _, config, _ = reported
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    for args, said in [
        (("--state", "done"), "--state: 'done' is not a state"),
        (("--since", "2026-13-45"), "--since: '2026-13-45' is not a date"),
        (("--pseudonymise-key-file", str(tmp_path / "none")), str(tmp_path / "none")),
        (("--pseudonymise-key-file", str(short)), "31 bytes, at least 32"),
    ]:
        out = run("results", "-c", str(config), *args)
        assert out.returncode == 2, args
        assert out.stderr.startswith("xrayage: error: ") and said in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and out.stdout == ""


def test_the_api_pages_the_same_rows_with_a_token(reported: Reported) -> None:
    _, config, base = reported
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{base}/api/results", timeout=10).status_code == 401
    page = requests.get(f"{base}/api/results?limit=2", headers=headers, timeout=10).json()
    assert page["columns"] == list(COLUMNS) and len(page["results"]) == 2
    rest = requests.get(page["next"], headers=headers, timeout=10).json()
    assert len(rest["results"]) == 1 and rest["next"] is None
    by_uid = {r["sop_instance_uid"]: r for r in _csv(config)[1]}
    for row in page["results"] + rest["results"]:
        assert str(row["xray_age"]) == by_uid[row["sop_instance_uid"]]["xray_age"]
    listed = requests.get(f"{base}/api/instances", headers=headers, timeout=10).json()
    assert {i["sop_instance_uid"]: str(i["xray_age"]) for i in listed["instances"]} == {
        uid: r["xray_age"] for uid, r in by_uid.items()
    }


def test_each_step_of_each_image_is_one_log_line(
    reported: Reported, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [r.getMessage() for r in caplog.get_records("setup")]
    _, config, _ = reported
    for row in _csv(config)[1]:
        uid = row["sop_instance_uid"]
        mine = [line for line in lines if line.startswith(uid)]
        assert mine[0] == f"{uid} received from STORESCU (push)"
        assert [line.split(":")[0] for line in mine[1:]] == [
            f"{uid} queued",
            f"{uid} inferred",
            f"{uid} reported",
        ]
        assert mine[-1].endswith(f"x-ray age {row['xray_age']} a")
        assert not any("PAT-" in line for line in mine)
    warned = [line for line in lines if line.startswith("no [[destinations]]")]
    assert warned and "stay `reported`" in warned[0]


def test_validation_figures_are_those_of_the_rows(reported: Reported) -> None:
    _, config, base = reported
    rows = _csv(config)[1]
    out = run("validation", "-f", "json", "-c", str(config))
    assert out.returncode == 0, out.stderr
    assert "has UNTRAINED weights" in out.stderr
    (overall,) = json.loads(out.stdout)
    diffs = [float(r["xray_age"]) - float(r["chronological_age"]) for r in rows]
    assert overall["group"] == "all" and (overall["images"], overall["patients"]) == (3, 2)
    assert overall["mae"] == pytest.approx(statistics.fmean(abs(d) for d in diffs))
    assert overall["bias"] == pytest.approx(statistics.fmean(diffs))
    assert overall["r"] is None and overall["loa_high"] is None  # 3 images: too few for them
    assert overall["note"] == "r and limits of agreement need at least 10 images"
    by_device = json.loads(
        run("validation", "--by", "device", "-f", "json", "-c", str(config)).stdout
    )
    assert {(a["group"], a["images"]) for a in by_device} == {
        ("device=ACME CR-1", 2),
        ("device=OTHER DX-9", 1),
    }
    headers = {"Authorization": f"Bearer {TOKEN}"}
    api = requests.get(f"{base}/api/validation", headers=headers, timeout=10).json()
    model = overall.pop("model")  # each row names its model
    assert api["rolling"][0] == overall and api["months"][0]["images"] == 3
    assert api["model"]["untrained"] is True and api["model"]["name"] == model
    assert [m["model"]["name"] for m in api["models"]] == [model] and api["comparisons"] == []
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert f'xrayage_validation_images{{group="view=PA",model="{model}"}} 3.0' in metrics
    assert f'xrayage_validation_patients{{group="view=PA",model="{model}"}} 2.0' in metrics
    mae = f'xrayage_validation_mae_years{{group="all",model="{model}"}} {overall["mae"]}'
    assert mae in metrics


def test_the_dashboard_draws_its_plots_in_chromium(reported: Reported, tmp_path: Path) -> None:
    _, _, base = reported
    assert requests.get(f"{base}/dashboard/scatter.svg", timeout=10).status_code == 401
    options = webdriver.ChromeOptions()
    options.binary_location = require("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,3000")
    browser = webdriver.Chrome(options=options, service=Service(require("chromedriver")))
    try:
        browser.get(base + "/dashboard")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "content").is_displayed())
        plots = browser.find_elements(By.CSS_SELECTOR, "#plots img")
        assert [p.get_attribute("id") for p in plots] == [
            "plot-scatter", "plot-bland-altman", "plot-gaps", "plot-per-day", "plot-agreement",
        ]  # fmt: skip
        for plot in plots:
            WebDriverWait(browser, 10).until(
                lambda b, p=plot: b.execute_script("return arguments[0].complete", p)
            )
            shot = Image.open(io.BytesIO(plot.screenshot_as_png)).convert("L")
            shot.save(tmp_path / f"{plot.get_attribute('id')}.png")
            ink = float((np.asarray(shot) < 200).mean())
            assert shot.width > 200 and 0.01 < ink < 0.6, (plot.get_attribute("id"), ink)
        summary = browser.find_element(By.ID, "validation").text
        assert "last 30 days: 3 images of 2 patients" in summary and "MAE" in summary
        # The test weights are untrained: both pages say so above their numbers.
        banner = browser.find_element(By.ID, "untrained")
        assert banner.is_displayed() and "UNTRAINED DEMO WEIGHTS" in banner.text
        browser.get(base + "/")  # the token is kept for this tab
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "content").is_displayed())
        assert browser.find_element(By.ID, "untrained").is_displayed()
        ages = browser.find_elements(By.CSS_SELECTOR, "#instances tbody td:nth-child(3)")
        assert len(ages) == 3 and all(a.text.endswith("(untrained)") for a in ages)
    finally:
        browser.quit()
