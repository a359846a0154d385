"""``xrayage infer`` and ``xrayage evaluate``: the node's preprocessing and model on files."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Column, Table

from ai.evaluate import agreement, plot_agreement, read_labels
from node.cli.support import (
    ConfigOption,
    DeviceOption,
    UsageError,
    WeightsOption,
    load_model,
    parse_age_range,
    user_errors,
)
from node.config import ModelSection, load_settings
from node.dicom.header import chronological_age
from node.results.spreadsheet import write_csv

if TYPE_CHECKING:
    from ai.engine import Outcome
    from ai.model import AgeModel

BatchOption = Annotated[int | None, typer.Option(help="images per batch (default: config)")]


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders recursively, without hidden files and DICOMDIR indexes."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and p.name != "DICOMDIR"
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return files


def _run(
    model: AgeModel, files: list[Path], batch_size: int, cfg: ModelSection
) -> Iterator[Outcome]:
    """The engine's outcomes with a progress bar on a terminal's stderr."""
    from ai.processes import keep_freed_memory  # torch loads here, not for every command
    from node.infer.worker import make_engine

    keep_freed_memory()  # the model runs in this process (ai/processes.py)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("X-ray age", total=len(files))
        with make_engine(model, cfg, batch_size) as engine:
            for outcome in engine.run(files):
                progress.advance(task)
                yield outcome


def _row(outcome: Outcome, model: AgeModel) -> dict[str, Any]:
    card = model.card
    row: dict[str, Any] = {"path": str(outcome.path), "xray_age": outcome.xray_age}
    row["chronological_age"] = chronological_age(outcome.header) if outcome.header else None
    row["error"] = outcome.error
    row.update(
        model=card.name, model_version=card.version, model_sha256=card.sha256,
        untrained=card.untrained,
    )  # fmt: skip
    return row


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    write_csv(buf, list(rows[0]), rows)
    return buf.getvalue()


@user_errors
def infer(
    paths: Annotated[list[Path], typer.Argument(help="DICOM or image files, or folders")],
    weights: WeightsOption = None,
    device: DeviceOption = None,
    batch_size: BatchOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
    config: ConfigOption = None,
) -> None:
    """Estimate X-ray age for files and folders (recursive), with the node's preprocessing and
    model, no service. Exit status 1 when some file could not be analysed."""
    if as_json and as_csv:
        raise UsageError("--json and --csv exclude each other")
    settings = load_settings(config)
    model = load_model(settings, weights, device)
    files = collect_files(paths)
    if not files:
        raise UsageError("no files found")
    batch = batch_size or settings.model.batch_size
    rows = [_row(o, model) for o in _run(model, files, batch, settings.model)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif as_csv:
        sys.stdout.write(_csv(rows))
    else:
        table = Table(
            Column("file", overflow="fold"), "X-ray age (years)", "chronological age",
            Column("note", overflow="fold"),
        )  # fmt: skip
        for r in rows:
            age, xa = r["chronological_age"], r["xray_age"]
            table.add_row(
                r["path"],
                f"{xa:.2f}" if xa is not None else "-",
                f"{age:.1f}" if age is not None else "-",
                r["error"] or "",
            )
        # Into a pipe or a file, paths whole on one line; on a terminal, folded to its width.
        Console(width=None if sys.stdout.isatty() else 4096).print(table)
    if model.card.untrained:
        typer.echo("note: UNTRAINED weights - these numbers are not age estimates", err=True)
    if any(r["error"] for r in rows):
        raise typer.Exit(1)


@user_errors
def evaluate(
    labels: Annotated[
        Path,
        typer.Option(help="CSV of file,age (or NIH Data_Entry_2017.csv, or a JSRT table)"),
    ],
    images: Annotated[Path, typer.Option(help="folder of the images, searched recursively")],
    out: Annotated[Path, typer.Option(help="folder for plots and tables")] = Path(
        "xrayage-evaluation"
    ),
    weights: WeightsOption = None,
    device: DeviceOption = None,
    batch_size: BatchOption = None,
    bootstrap: Annotated[int, typer.Option(min=100, help="bootstrap resamples")] = 2000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    age_range: Annotated[
        str | None, typer.Option(help="LOW,HIGH years (default: the model card's)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Agreement of X-ray age with chronological age: MAE, Pearson r, mean bias and 95 % limits
    of agreement, with bootstrap 95 % CIs (resampling patients when the labels have a patient
    column, as NIH's Patient ID); writes scatter and Bland-Altman plots as PNG."""
    if not images.is_dir():
        raise UsageError(f"not a folder: {images}")
    wanted = parse_age_range(age_range)
    settings = load_settings(config)
    model = load_model(settings, weights, device)
    low, high = wanted or model.card.age_range
    table = read_labels(labels).within(low, high)
    files = [p for p in collect_files([images]) if p.stem in table.ages]
    if not files:
        raise UsageError(f"no file under {images} matches a name in {labels}")
    batch = batch_size or settings.model.batch_size
    outcomes = list(_run(model, files, batch, settings.model))
    done = [o for o in outcomes if o.xray_age is not None]
    predicted = [o.xray_age for o in done]
    actual = [table.ages[o.path.stem] for o in done]
    patients = [table.patients[o.path.stem] for o in done] if table.patients else None
    metrics = agreement(predicted, actual, bootstrap, seed, patients)  # type: ignore[arg-type]

    out.mkdir(parents=True, exist_ok=True)
    rows = [{**_row(o, model), "chronological_age": table.ages[o.path.stem]} for o in outcomes]
    (out / "predictions.csv").write_text(_csv(rows))
    summary = {
        "n": len(done),
        "patients": len(set(patients)) if patients is not None else None,
        "bootstrap_unit": "patient" if patients is not None else "image",
        "age_range": [low, high],
        "failed": len(outcomes) - len(done),
        "labels_without_image": len(table.ages) - len({p.stem for p in files}),
        "labels_excluded": len(table.excluded),
        "model": model.card.name,
        "model_sha256": model.card.sha256,
        "bootstrap": bootstrap,
        **{k: vars(v) for k, v in metrics.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    plots = plot_agreement(predicted, actual, out)  # type: ignore[arg-type]

    unit = f", {summary['patients']} patients" if patients is not None else ""
    result = Table(
        "metric", "value", "95 % CI", title=f"{len(done)} images{unit}, {model.card.name}"
    )
    for name, est in metrics.items():
        result.add_row(name, f"{est.value:.3f}", f"{est.ci_low:.3f} to {est.ci_high:.3f}")
    Console().print(result)
    typer.echo(
        f"wrote {out / 'predictions.csv'}, {out / 'metrics.json'}, " + ", ".join(map(str, plots))
    )
    if model.card.untrained:
        typer.echo("note: UNTRAINED weights - these numbers are not age estimates", err=True)
    if summary["failed"]:
        typer.echo(
            f"note: {summary['failed']} images could not be analysed (see predictions.csv)",
            err=True,
        )
