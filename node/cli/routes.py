"""``xrayage routes FILE``: where an image's results would go, and why, before it is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError

from ai.card import ModelCard
from ai.presets import model_card, resolve_weights
from node.cli.support import (
    ConfigOption,
    Format,
    UsageError,
    open_database,
    print_rows,
    user_errors,
)
from node.cli.validation import model_card_named
from node.config import ConfigError, Settings, load_settings
from node.delivery.routes import ImageFacts, refusal
from node.gate import Gate
from node.report.identity import is_own_output

COLUMNS = ("destination", "protocol", "takes", "decision")


def _card(settings: Settings, model: str | None) -> ModelCard:
    try:
        db = open_database(settings)
    except ConfigError:  # a node never started: what [model] weights names
        if model is not None or not settings.model.weights:
            raise
        return model_card(resolve_weights(settings.model.weights, settings.model.cache_dir))
    try:
        return model_card_named(db, settings, model)
    finally:
        db.dispose()


@user_errors
def routes(
    file: Annotated[Path, typer.Argument(help="a DICOM image", dir_okay=False)],
    calling_ae: Annotated[
        str | None, typer.Option(help="the AE title that would send it (default: none)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="the model that would age it (default: the live one)")
    ] = None,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    config: ConfigOption = None,
) -> None:
    """Whether the gate would analyse FILE, and for each destination what it would be sent
    of the result (SR, SC, FHIR Observation, HL7 ORU) or why nothing: its `when` conditions
    on the calling AE, the Station Name and the model."""
    settings = load_settings(config)
    try:
        header = pydicom.dcmread(file, defer_size="1 KB")
    except (InvalidDicomError, OSError) as e:
        raise UsageError(f"{file}: not a readable DICOM file ({e})") from None
    card = _card(settings, model)
    decision = Gate(settings.gate, card.age_range, is_own_output).decide(header)
    if format == Format.table:
        if decision.analyse:
            typer.echo(f"{file}: analysed by the gate, aged by model {card.name}")
        else:
            typer.echo(f"{file}: skipped by the gate ({decision.reason}): no result to send")
    facts = ImageFacts(calling_ae, header.get("StationName"), not card.untrained)
    rows = []
    for dest in settings.destinations:
        why = refusal(dest, facts)
        if not decision.analyse:
            why = f"nothing: the gate skips the image ({decision.reason})"
        rows.append({
            "destination": dest.name,
            "protocol": dest.protocol,
            "takes": ", ".join(sorted(dest.takes)),
            "decision": f"not sent: {why}" if why else "sent",
        })  # fmt: skip
    print_rows(rows, COLUMNS, format, "destinations")
