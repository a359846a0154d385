"""``xrayage cohort``: the paper's comorbidity and outcome analyses on a site's own patients."""

from __future__ import annotations

import getpass
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from ai.card import DEFAULT_AGE_RANGE
from node.cli.support import (
    ConfigOption,
    UsageError,
    open_database,
    parse_age_range,
    user_errors,
)
from node.cohort.inputs import (
    DEFAULT_MAX_LAG_DAYS,
    FROM_RESULTS,
    CohortError,
    image,
    read_outcomes,
)
from node.config import load_settings
from node.results.spreadsheet import write_csv


def _names(value: str, option: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if len(set(names)) != len(names):
        raise UsageError(f"{option}: a column is named twice in {value!r}")
    return names


def _age_range(value: str | None, config: Path | None) -> tuple[float, float]:
    given = parse_age_range(value)
    if given is not None:
        return given
    if config is not None:
        settings = load_settings(config)
        if settings.model.weights:
            from ai.presets import model_card, resolve_weights

            card = model_card(resolve_weights(settings.model.weights, settings.model.cache_dir))
            return card.age_range
    return DEFAULT_AGE_RANGE


def _database_images(config: Path | None, key: bytes | None) -> list[Any]:
    """The node's results, read as an export is (audited, pseudonymised with ``key``)."""
    from node.results.export import export
    from storage.results import ResultsQuery

    db = open_database(load_settings(config))
    try:
        with db.session() as s:
            rows = export(s, ResultsQuery(limit=2**62), f"cli:{getpass.getuser()} cohort", key)
    finally:
        db.dispose()
    return [image(r.values, f"result {r.id}") for r in rows if r.values["patient_id"]]


def _write_demo(folder: Path) -> tuple[Path, Path]:
    from node.cohort.synthetic import synthetic_cohort
    from node.results.export import plain

    results, outcomes = synthetic_cohort()
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "results.csv", folder / "outcomes.csv"
    for path, rows in zip(paths, (results, outcomes), strict=True):
        with path.open("w", newline="") as f:
            write_csv(f, list(rows[0]), ({k: plain(v) for k, v in row.items()} for row in rows))
    (folder / "SYNTHETIC.txt").write_text(
        "A synthetic cohort made by `xrayage cohort --demo`: no patient's data. Patient IDs\n"
        "start with SYNTHETIC-; the effects were planted (node/cohort/synthetic.py).\n"
    )
    return paths


@user_errors
def cohort(
    outcomes: Annotated[
        Path | None,
        typer.Option(help="CSV keyed by patient_id with followup_days, event 0/1, covariates"),
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option(help="a results export (xrayage results -f csv); default: the database"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="folder for the outputs")] = None,
    index: Annotated[
        str,
        typer.Option(
            help="the image of each patient: first or last (up to index_date when given), "
            "nearest (the latest on or before index_date)"
        ),
    ] = "first",
    max_lag_days: Annotated[
        int, typer.Option(min=0, help="with index_date: an index image at most this much older")
    ] = DEFAULT_MAX_LAG_DAYS,
    exposure: Annotated[
        str,
        typer.Option(
            help="corrected_gap (bias-corrected gap), gap (raw) or aging_rate (X-ray age per "
            "calendar year over the patient's images)"
        ),
    ] = "corrected_gap",
    correction: Annotated[
        str,
        typer.Option(
            help="the corrected gap's bias correction: cohort (fitted on these patients) or "
            "card (the model card's, as the SR reports it)"
        ),
    ] = "cohort",
    adjust: Annotated[
        str, typer.Option(help="Cox model covariates: age, sex (from the results), COL...")
    ] = "age,sex",
    comorbidities: Annotated[str, typer.Option(help="outcomes columns, 0/1: COL,...")] = "",
    groups: Annotated[str, typer.Option(help="Kaplan-Meier groups: gap-sign or tertiles")] = (
        "gap-sign"
    ),
    horizon_days: Annotated[
        int | None, typer.Option(min=1, help="end follow-up here (later events censored)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="results of this model (name or SHA-256 prefix)")
    ] = None,
    age_range: Annotated[
        str | None, typer.Option(help="LOW,HIGH years (default: the model card's)")
    ] = None,
    pseudonymise_key_file: Annotated[
        Path | None,
        typer.Option(help="pseudonymise the outcomes' and the database's patient IDs"),
    ] = None,
    demo: Annotated[
        Path | None, typer.Option(help="write a SYNTHETIC cohort into DIR and analyse it")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Age gap against comorbidities and outcomes (Kaplan-Meier, adjusted Cox) on this site's
    patients: cohort.json, km.png, forest.png, excluded.csv and report.html in --out."""
    from node.cohort import report
    from node.cohort.analysis import Plan, analyse
    from node.cohort.inputs import Selection, build_cohort, read_results_csv
    from node.results.export import Pseudonymiser, read_key

    for option, value, allowed in (
        ("--index", index, ("first", "last", "nearest")),
        ("--exposure", exposure, ("corrected_gap", "gap", "aging_rate")),
        ("--correction", correction, ("cohort", "card")),
        ("--groups", groups, ("gap-sign", "tertiles")),
    ):
        if value not in allowed:
            raise UsageError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    if demo is not None:  # the demo's own files, analysed as the README shows
        results, outcomes = _write_demo(demo)
        out = out or demo / "report"
        index, adjust = "nearest", "age,sex,egfr,anaemia"
        comorbidities = "hypertension,atrial_fibrillation"
    if outcomes is None or out is None:
        raise UsageError("--outcomes CSV and --out DIR are needed (or --demo DIR)")
    if results is not None and config is not None:
        raise UsageError("--results and --config are two sources of results: give one")
    plan = Plan(
        exposure,  # type: ignore[arg-type]
        _names(adjust, "--adjust"),
        _names(comorbidities, "--comorbidities"),
        groups,  # type: ignore[arg-type]
        correction,  # type: ignore[arg-type]
    )
    wanted = [
        c for c in dict.fromkeys([*plan.adjust, *plan.comorbidities]) if c not in FROM_RESULTS
    ]
    rows, has_index_date = read_outcomes(outcomes, wanted)
    if index == "nearest" and not has_index_date:
        raise CohortError(f"--index nearest: {outcomes} has no index_date column")
    key = read_key(pseudonymise_key_file) if pseudonymise_key_file is not None else None
    if key is not None:
        pseudonym = Pseudonymiser(key).identifier
        rows = [replace(o, patient_id=pseudonym(o.patient_id)) for o in rows]
    images = read_results_csv(results) if results is not None else _database_images(config, key)
    needs = {"aging_rate"} if exposure == "aging_rate" else set()
    if correction == "card" and exposure != "gap":
        needs.add("card_gap")
        if not any(i.card_gap is not None for i in images):
            raise CohortError(
                "--correction card: no result has a corrected_age_gap (the model card states "
                "no bias correction); use --correction cohort"
            )
    select = Selection(
        index,  # type: ignore[arg-type]
        _age_range(age_range, config),
        horizon_days,
        model,
        index_date=has_index_date,
        max_lag_days=max_lag_days,
        needs=frozenset(needs),
    )
    chosen = build_cohort(rows, images, select)
    analysis = analyse(chosen, plan)
    paths = report.write(out, chosen, analysis)
    typer.echo("\n".join([*_summary(analysis.summary), f"wrote {', '.join(map(str, paths))}"]))


def _summary(s: dict[str, Any]) -> list[str]:
    gap, ci = s["cox"]["gap"], s["cox"]["gap"]["ci95_per_5_years"]
    origin = s["time_origin"]
    lines = [
        *(["SYNTHETIC demo cohort: not patient data"] if s["synthetic"] else []),
        f"{s['n_patients']} patients, {s['n_events']} events; not analysed: "
        + (", ".join(f"{n} {reason}" for reason, n in s["excluded"].items()) or "none"),
        (
            f"follow-up from index_date; index images a median {origin['lag_days']['median']:g} "
            f"days before it (at most {origin['max_lag_days']})"
            if origin["origin"] == "index_date"
            else "follow-up from the index image (the outcomes have no index_date)"
        ),
        f"{'corrected_gap' if s['exposure'] == 'aging_rate' else s['exposure']}"
        f"{' (correction: ' + s['correction'] + ')' if s['exposure'] != 'gap' else ''}: "
        f"hazard ratio {gap['hr_per_5_years']:.2f} per 5 years "
        f"(95 % CI {ci[0]:.2f}-{ci[1]:.2f}, p = {gap['p']:.2g}), adjusted for "
        + (", ".join(s["cox"]["adjusted_for"]) or "nothing"),
    ]
    if "aging_rate" in s["cox"]:
        rate = s["cox"]["aging_rate"]
        lines.append(
            f"aging_rate: hazard ratio {rate['hr_per_unit']:.2f} per year of X-ray age per "
            f"year (95 % CI {rate['ci95'][0]:.2f}-{rate['ci95'][1]:.2f}, p = {rate['p']:.2g})"
        )
    return [
        *lines,
        f"C-index {s['c_index']['without_gap']:.3f} without the {s['exposure']}, "
        f"{s['c_index']['with_gap']:.3f} with it (likelihood-ratio p = {s['lr_test_p']:.2g}); "
        f"log-rank p = {s['logrank_p']:.2g}",
        *(f"warning: {w}" for w in s["warnings"]),
    ]
