"""The cohort analysis on disk: ``cohort.json``, ``km.png``, ``forest.png``, ``excluded.csv``
and ``report.html``, one page with the tables and the plots inlined, readable offline by a
clinician (nothing is fetched from anywhere)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from node.cohort.analysis import Analysis
from node.cohort.inputs import Cohort
from node.cohort.plots import SYNTHETIC_NOTE, forest_png, km_png
from node.results.spreadsheet import write_csv

OUTPUTS = ("cohort.json", "km.png", "forest.png", "excluded.csv", "report.html")


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def _ci(ci: Sequence[float]) -> str:
    return f"{ci[0]:.3f} to {ci[1]:.3f}"


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_num(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _page(s: dict[str, Any], km: bytes, forest: bytes) -> str:
    cox, gap = s["cox"], s["cox"]["gap"]
    gap_name = "gap" if s["exposure"] == "gap" else "corrected_gap"
    banner = f'<p class="synthetic">{SYNTHETIC_NOTE}</p>' if s["synthetic"] else ""
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in s["warnings"])
    origin, lags = s["time_origin"], s["time_origin"]["lag_days"]
    when = (
        f"Follow-up is counted from each patient's index_date; the index image is the "
        f"{'first' if origin['index'] == 'first' else 'latest'} result on or before it and at "
        f"most {origin['max_lag_days']} days before it (lag: median {_num(lags['median'])}, "
        f"quartiles {_num(lags['q1'])}-{_num(lags['q3'])}, at most {_num(lags['max'])} days). "
        "Age is the age at the index date."
        if origin["origin"] == "index_date"
        else "The outcomes have no index_date: follow-up is counted from the index image, and "
        "age is the age at it."
    )
    rate_rows = []
    if "aging_rate" in cox:
        rate = cox["aging_rate"]
        beyond = rate["adjusted_for_corrected_gap"]
        rate_rows = [
            ("aging_rate per year of X-ray age a year", rate["hr_per_unit"], _ci(rate["ci95"]),
             rate["p"]),
            ("aging_rate, also adjusted for corrected_gap", beyond["hr_per_unit"],
             _ci(beyond["ci95"]), beyond["p"]),
        ]  # fmt: skip
    sections = [
        banner,
        "<h1>X-ray age and outcomes: cohort analysis</h1>",
        f"<p>Model: {html.escape(str(s['model']))}. {s['n_patients']} patients, "
        f"{s['n_events']} events. Exposure: <code>{html.escape(s['exposure_definition'])}"
        "</code>. An observational association, not a diagnosis.</p>",
        f"<p>{html.escape(when)}</p>",
        f"<ul class='warnings'>{warnings}</ul>" if warnings else "",
        "<h2>Time to event (Cox proportional hazards)</h2>",
        f"<p>Adjusted for: {html.escape(', '.join(cox['adjusted_for']) or 'nothing')}.</p>",
        _table(
            ("term", "hazard ratio", "95 % CI", "p"),
            [
                *rate_rows,
                (f"{gap_name} per year", gap["hr_per_year"], _ci(gap["ci95"]), gap["p"]),
                (
                    f"{gap_name} per 5 years",
                    gap["hr_per_5_years"],
                    _ci(gap["ci95_per_5_years"]),
                    gap["p"],
                ),
                *((n, c["hr"], _ci(c["ci95"]), c["p"]) for n, c in cox["covariates"].items()),
            ],
        ),
        "<h3>Does X-ray age add information?</h3>",
        _table(
            ("", "value"),
            [
                ("Harrell's C, model without the gap", s["c_index"]["without_gap"]),
                ("Harrell's C, model with the gap", s["c_index"]["with_gap"]),
                ("likelihood-ratio test of adding the gap, p", s["lr_test_p"]),
            ],
        ),
        "<h3>Proportional-hazards assumption (Schoenfeld residuals)</h3>",
        _table(("term", "p"), sorted(s["ph_test"].items())),
        "<h2>Kaplan-Meier</h2>",
        _img(km, "Kaplan-Meier curves"),
        _table(
            ("group", "patients", "events", "median days"),
            [(n, g["n"], g["events"], g["median_days"]) for n, g in s["km"]["groups"].items()],
        ),
        f"<p>Log-rank p = {_num(s['logrank_p'])}.</p>",
        "<h2>Comorbidities and the age gap</h2>",
        (
            _table(
                ("comorbidity", "difference in gap, years", "95 % CI", "p"),
                [
                    (n, c["estimate_years"], _ci(c["ci95"]), c["p"])
                    for n, c in s["comorbidities"].items()
                ],
            )
            if s["comorbidities"]
            else "<p>No comorbidity columns were given (--comorbidities).</p>"
        ),
        _img(forest, "Forest plot"),
        "<h2>Patients not analysed</h2>",
        _table(("reason", "patients"), sorted(s["excluded"].items()))
        if s["excluded"]
        else "<p>None.</p>",
        f"<p>Results without a row in the outcomes table: {s['results_without_outcomes']}. "
        "The excluded patients are listed in excluded.csv.</p>",
    ]
    style = (
        "body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "img{max-width:100%}.synthetic{background:#fde68a;padding:.5em;"
        "font-weight:bold}.warnings{color:#8a4b00}"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>xrayage cohort analysis</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )


def write(out: Path, cohort: Cohort, analysis: Analysis) -> list[Path]:
    """Write the outputs into ``out`` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    km, forest = km_png(analysis), forest_png(analysis)
    (out / "cohort.json").write_text(json.dumps(analysis.summary, indent=1) + "\n")
    (out / "km.png").write_bytes(km)
    (out / "forest.png").write_bytes(forest)
    with (out / "excluded.csv").open("w", newline="") as f:
        write_csv(f, ("patient_id", "reason"), cohort.excluded)
    (out / "report.html").write_text(_page(analysis.summary, km, forest))
    return [out / name for name in OUTPUTS]
