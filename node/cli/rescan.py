"""``xrayage rescan``: a retro-scan now, for a range of study dates, with a progress bar."""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import socket
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ai import resolve_weights
from ai.card import ModelCard
from ai.presets import model_card
from node.cli.support import ConfigOption, UsageError, open_database, user_errors
from node.config import ConfigError, Settings, load_settings
from node.retro.plan import SeriesPlan
from node.retro.runner import Budget, RetroScanner
from storage import Database, record_event


def _date(value: str | None, name: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None


def _node_listening(settings: Settings) -> None:
    """C-MOVE sends the images to the running node: say so plainly when it is not running."""
    node = settings.node
    host = "127.0.0.1" if node.host in ("0.0.0.0", "::") else node.host
    try:
        socket.create_connection((host, node.port), timeout=3).close()
    except OSError:
        raise UsageError(
            f"no node listening on {host}:{node.port}: start `xrayage serve` first "
            '(C-MOVE sends the images to it), or set [retro] retrieve = "get"'
        ) from None


@user_errors
def rescan(
    date_from: Annotated[
        str | None, typer.Option("--from", help="first study date, YYYY-MM-DD")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", help="last study date (default: --from)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="list what would be fetched; change nothing")
    ] = False,
    resume: Annotated[bool, typer.Option(help="resume paused or interrupted scans")] = False,
    config: ConfigOption = None,
) -> None:
    """Retro-scan the archive ([retro] peer) now: fetch the chest radiographs not yet reported."""
    settings = load_settings(config)
    logging.getLogger("xrayage.retro").setLevel(logging.ERROR)  # the outcome is printed below
    first, last = _date(date_from, "--from"), _date(date_to, "--to")
    if resume == (first is not None):
        raise UsageError("give --from DATE [--to DATE], or --resume")
    last = last or first
    if first is not None and last is not None and last < first:
        raise UsageError("--to is before --from")
    if settings.retro.peer is None:
        raise ConfigError("no [retro] peer in the config: which archive should be scanned?")
    if not settings.model.weights:
        raise ConfigError("no [model] weights: a scan fetches what this model has not reported")
    card = model_card(resolve_weights(settings.model.weights, settings.model.cache_dir))
    db = open_database(settings)
    actor = f"cli:{getpass.getuser()}"
    try:
        with _progress() as progress:
            task = progress.add_task("studies", total=None, fetched=0)
            scanner = RetroScanner(
                retro=settings.retro, gate=settings.gate, own_ae=settings.node.ae_title, db=db,
                model_sha256=card.sha256, store_handler=_store_handler(settings, db, card),
                on_progress=lambda done, total, fetched: progress.update(
                    task, completed=done, total=total, fetched=fetched
                ),
            )  # fmt: skip
            if dry_run:
                assert first is not None and last is not None
                plans = scanner.dry_run(first, last)
            else:
                if settings.retro.retrieve == "move":
                    _node_listening(settings)
                ids = scanner.resumable() if resume else [scanner.start(actor, first, last)]  # type: ignore[arg-type]
                budget = Budget(settings.retro.max_images_per_night)
                scans = []
                for scan_id in ids:
                    if resume:
                        scanner.resume(scan_id, actor)
                    scans.append(scanner.run(scan_id, actor, budget, None))
        if dry_run:
            _show_plan(plans)
            with db.session() as s:
                record_event(
                    s, "retro-scan", actor=actor,
                    detail=f"dry run, studies {first}..{last}: would fetch "
                    f"{sum(p.count for p in plans)}",
                )  # fmt: skip
            return
        if not scans:
            typer.echo("no paused or interrupted scans")
        for scan in scans:
            typer.echo(
                f"scan {scan.id} {scan.state.value} ({scan.detail}): fetched {scan.fetched}, "
                f"already done {scan.already_done}, failed {scan.failed}"
            )
        if any((scan.detail or "").startswith("archive:") for scan in scans):
            raise typer.Exit(1)
    finally:
        db.dispose()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[fetched]} images fetched"), TimeElapsedColumn(),
    )  # fmt: skip


def _store_handler(settings: Settings, db: Database, card: ModelCard):  # type: ignore[no-untyped-def]
    """For C-GET, this process receives the images, through the node's own receive path."""
    if settings.retro.retrieve != "get":
        return None
    from node.service import receiver_for

    return receiver_for(settings, db, settings.storage.open_file_store(), card).handle_store


def _show_plan(plans: list[SeriesPlan]) -> None:
    table = Table("study date", "study", "series", "fetch", "already done", "queue again", box=None)
    for p in plans:
        table.add_row(
            p.study_date or "", p.study_uid, p.series_uid,
            f"{p.series_size}+ (series whole)" if p.series_size else str(len(p.fetch)),
            str(p.already_done), str(len(p.again)),
        )  # fmt: skip
    Console(width=240).print(table)
    typer.echo(
        f"would fetch {sum(p.count for p in plans)} instances from "
        f"{sum(1 for p in plans if p.count)} series; "
        f"{sum(p.already_done for p in plans)} already done"
    )
