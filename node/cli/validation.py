"""``xrayage validation``: a model's agreement with this site's chronological ages, or two
models side by side with their paired comparison (``--compare A B``)."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer

from ai.card import ModelCard
from ai.presets import model_card, resolve_weights
from node.cli.support import ConfigOption, Format, open_database, print_rows, user_errors
from node.config import ConfigError, Settings, load_settings
from node.infer.registry import card_of
from node.results.compare import Comparison
from node.results.validation import Validation, paired
from storage import Database
from storage.models import find_model, live_model


class By(StrEnum):
    all = "all"
    month = "month"
    study_month = "study-month"
    device = "device"
    view = "view"


COLUMNS = (
    "model", "period", "group", "images", "patients", "mae", "bias", "r", "loa_low",
    "loa_high", "note",
)  # fmt: skip
COMPARISON = (
    "reference", "candidate", "images", "patients", "mae_reference", "mae_candidate",
    "difference", "ci95",
)  # fmt: skip


def model_card_named(db: Database, settings: Settings, name: str | None) -> ModelCard:
    """The card of the model ``name`` (a name or SHA-256 prefix, ``xrayage model list``); no
    name: the live model's, or on a node never started, what ``[model] weights`` names."""
    with db.session() as s:
        if name is not None:
            return card_of(find_model(s, name))
        live = live_model(s)
        if live is not None:
            return card_of(live)
    if not settings.model.weights:
        raise ConfigError("no [model] weights and no live model: validation figures are a model's")
    return model_card(resolve_weights(settings.model.weights, settings.model.cache_dir))


@user_errors
def validation(
    by: Annotated[
        By, typer.Option(help="all, month (of the analysis), study-month, device or view")
    ] = By.all,
    model: Annotated[
        str | None, typer.Option(help="a model's name or SHA-256 prefix (default: the live one)")
    ] = None,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(
            help="two models (reference, candidate): both models' figures and the paired "
            "comparison on the images both analysed",
            metavar="A B",
        ),
    ] = None,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    config: ConfigOption = None,
) -> None:
    """MAE, bias, Pearson r and limits of agreement of a model on this site's images (each row
    counts images and patients): over the rolling window, or per calendar month of the analysis
    (--by month) or of the study (--by study-month). With --compare, of two models, then the
    mean difference of their absolute errors on the same images, with a 95 % interval from a
    bootstrap by patient."""
    settings = load_settings(config)
    db = open_database(settings)
    try:
        names = list(compare) if compare else [model]
        found = [Validation(db, model_card_named(db, settings, n), settings.validation)
                 for n in names]  # fmt: skip
        rows = [
            {"model": v.card.name, **a.as_dict()}
            for v in found
            for a in v.figures(by.value)  # type: ignore[arg-type]
        ]
        comparison = paired(*found) if compare else None
    finally:
        db.dispose()
    for v in found:
        if v.card.untrained:
            typer.echo(
                f"warning: model {v.card.name} has UNTRAINED weights: these figures are not an "
                "age model's agreement",
                err=True,
            )
    if comparison is not None and format == Format.json:  # both, in one document
        typer.echo(json.dumps({"figures": rows, "comparison": comparison.as_dict()}, indent=1))
        return
    if comparison is not None and format == Format.csv:  # the paired comparison's one row
        print_rows([_flat(comparison)], COMPARISON, format, "comparisons")
        return
    print_rows(rows, COLUMNS, format, "groups")
    if format != Format.table:
        return
    for v in found:
        card = v.card
        stated = f"stated MAE {card.reference_mae} years on {card.reference_set}"
        typer.echo(
            f"model {card.name} {card.version}: "
            + (stated if card.reference_mae else "no stated MAE")
        )
    if comparison is not None:
        typer.echo(comparison.sentence())


def _flat(comparison: Comparison) -> dict[str, object]:
    values: dict[str, object] = comparison.as_dict()
    ci = comparison.ci95
    values["ci95"] = f"{ci[0]:.4f} {ci[1]:.4f}" if ci else None
    return values
