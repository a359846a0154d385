"""``xrayage validation``: the model's agreement with this site's chronological ages."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from ai.presets import model_card, resolve_weights
from node.cli.support import ConfigOption, Format, open_database, print_rows, user_errors
from node.config import ConfigError, load_settings
from node.results.validation import Validation


class By(StrEnum):
    all = "all"
    month = "month"
    study_month = "study-month"
    device = "device"
    view = "view"


COLUMNS = (
    "period", "group", "images", "patients", "mae", "bias", "r", "loa_low", "loa_high", "note",
)  # fmt: skip


@user_errors
def validation(
    by: Annotated[
        By, typer.Option(help="all, month (of the analysis), study-month, device or view")
    ] = By.all,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    config: ConfigOption = None,
) -> None:
    """MAE, bias, Pearson r and limits of agreement of the current model on this site's
    images (each row counts images and patients): over the rolling window, or per calendar
    month of the analysis (--by month) or of the study (--by study-month)."""
    settings = load_settings(config)
    if not settings.model.weights:
        raise ConfigError("no [model] weights: validation figures are those of a model")
    card = model_card(resolve_weights(settings.model.weights, settings.model.cache_dir))
    db = open_database(settings)
    try:
        figures = Validation(db, card, settings.validation).figures(by.value)  # type: ignore[arg-type]
    finally:
        db.dispose()
    if card.untrained:
        typer.echo(
            f"warning: model {card.name} has UNTRAINED weights: these figures are not an age "
            "model's agreement",
            err=True,
        )
    rows = [a.as_dict() for a in figures]
    print_rows(rows, COLUMNS, format, "groups")
    stated = f"stated MAE {card.reference_mae} years on {card.reference_set}"
    if format == Format.table:
        typer.echo(
            f"model {card.name} {card.version}: "
            + (stated if card.reference_mae else "no stated MAE")
        )
