"""``xrayage model add|promote|retire|list|backfill``: the node's models and their roles.

Each change is a row of the models table (:mod:`storage.models`), audited with the person who
ran it; a running node takes it up within a minute (``REFRESH_SECONDS``), without a restart.
"""

from __future__ import annotations

import getpass
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from ai.presets import model_card, resolve_weights
from node.cli.support import (
    ConfigOption,
    Format,
    UsageError,
    open_database,
    parse_period,
    print_rows,
    user_errors,
)
from node.config import Settings, load_settings
from node.infer.registry import card_of, weights_of
from node.results.compare import Comparison
from node.results.validation import Validation, paired
from storage import Database, record_event
from storage.models import (
    add_model,
    all_models,
    find_model,
    images_seen,
    live_model,
    retire_model,
    set_role,
)
from storage.queue import BACKFILL_PRIORITY, queue_backfill
from storage.tables import Job, JobState, Model, ModelRole

NameArgument = Annotated[str, typer.Argument(help="a model's name or SHA-256 prefix")]
LIST_COLUMNS = ("name", "version", "role", "since", "images", "sha256", "path")


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _compare(db: Database, settings: Settings, live: Model, candidate: Model) -> Comparison:
    cfg = settings.validation
    return paired(Validation(db, card_of(live), cfg), Validation(db, card_of(candidate), cfg))


@user_errors
def add(
    weights: Annotated[
        str, typer.Argument(help="weights file or preset name", metavar="FILE|PRESET")
    ],
    name: Annotated[
        str | None, typer.Option(help="the name results give it (default: its card's)")
    ] = None,
    live: Annotated[
        bool, typer.Option("--live/--shadow", help="live only on a node without a live model")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Register weights as a shadow model (every image also runs through it; its results are
    stored, never sent). Refused when the weights do not load, take another input size than
    the live model, or do not fit the device's free memory beside the node's models."""
    from ai.errors import ModelLoadError  # torch: only for this command
    from ai.footprint import measure

    settings = load_settings(config)
    path = resolve_weights(weights, settings.model.cache_dir)
    db = open_database(settings)
    try:
        with db.session() as s:
            current = live_model(s)
            live_card = card_of(current) if current is not None else None
        if live and current is not None:
            raise UsageError(
                f"model {current.name} is live: add this one as a shadow and promote it "
                "(`xrayage model promote`)"
            )
        card = model_card(path)
        if live_card is not None and card.input_size != live_card.input_size:
            raise UsageError(
                f"{path}: input size {card.input_size} px, the live model's "
                f"{live_card.input_size} px: the node decodes each image once for all its models"
            )
        try:
            _, footprint = measure(path, settings.model.device, settings.model.batch_size)
        except ModelLoadError as e:
            raise UsageError(str(e)) from None
        if not footprint.fits:
            raise UsageError(
                f"{path} does not fit beside the node's models: {footprint.sentence()}"
            )
        role = ModelRole.LIVE if live else ModelRole.SHADOW
        with db.session() as s:
            model = add_model(s, weights_of(path, card, name), role, _actor())
            said = f"model {model.name} {model.version} ({model.sha256[:16]}) is {role.value}"
    finally:
        db.dispose()
    typer.echo(f"{said}; {footprint.sentence()}")
    typer.echo("a running node takes it up within a minute")


@user_errors
def promote(
    name: NameArgument,
    force: Annotated[
        bool, typer.Option(help="promote even when it is worse or compared on too few patients")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Make a model live: from then on its results make the reports (reports already sent stay
    as they are) and the live model is retired. Prints the paired comparison with the live
    model on the same images, and refuses when the candidate is worse, or compared on fewer
    than ``[validation] promote_min_patients`` patients, unless --force."""
    settings = load_settings(config)
    db = open_database(settings)
    try:
        with db.session() as s:
            candidate, current = find_model(s, name), live_model(s)
        if current is not None and candidate.id == current.id:
            raise UsageError(f"model {candidate.name} is already live")
        comparison = _compare(db, settings, current, candidate) if current else None
        said = comparison.sentence() if comparison else "no live model to compare with"
        typer.echo(said)
        least = settings.validation.promote_min_patients
        why = None
        if comparison is not None and comparison.patients < least:
            why = f"compared on {comparison.patients} patients, fewer than {least}"
        elif comparison is not None and comparison.worse:
            why = f"its absolute errors are larger by {comparison.difference:.2f} years"
        if why and not force:
            raise UsageError(
                f"model {candidate.name} not promoted: {why} ([validation] "
                "promote_min_patients; --force to promote anyway)"
            )
        with db.session() as s:
            model = s.get_one(Model, candidate.id)
            forced = f"; forced: {why}" if why else ""
            set_role(s, model, ModelRole.LIVE, _actor(),
                     f"model {model.name} {model.version} live: {said}{forced}")  # fmt: skip
    finally:
        db.dispose()
    typer.echo(f"model {candidate.name} is live; a running node takes it up within a minute")


@user_errors
def retire(name: NameArgument, config: ConfigOption = None) -> None:
    """Stop running a shadow model; its results stay, and its queued jobs are cancelled."""
    settings = load_settings(config)
    db = open_database(settings)
    try:
        with db.session() as s:
            model = find_model(s, name)
            retire_model(s, model, _actor())
            said = f"model {model.name} is retired"
    finally:
        db.dispose()
    typer.echo(said)


@user_errors
def list_models(
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    config: ConfigOption = None,
) -> None:
    """The node's models: role, since when, images analysed."""
    settings = load_settings(config)
    db = open_database(settings)
    try:
        with db.session() as s:
            seen = images_seen(s)
            rows = [_listed(m, seen.get(m.sha256, 0)) for m in all_models(s)]
    finally:
        db.dispose()
    if format == Format.table:
        for row in rows:
            row["sha256"] = str(row["sha256"])[:16]
    print_rows(rows, LIST_COLUMNS, format, "models")


def _listed(m: Model, images: int) -> dict[str, object]:
    since = m.since.isoformat(timespec="seconds").replace("+00:00", "Z")
    return dict(name=m.name, version=m.version, role=m.role.value, since=since, images=images,
                sha256=m.sha256, path=m.path)  # fmt: skip


def _left(db: Database, sha: str) -> int:
    with db.session() as s:
        return s.query(Job).filter(
            Job.model_sha256 == sha, Job.priority == BACKFILL_PRIORITY,
            Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
        ).count()  # fmt: skip


@user_errors
def backfill(
    name: NameArgument,
    since: Annotated[
        str, typer.Option(help="images received since this date (YYYY-MM-DD[THH:MM], UTC)")
    ],
    wait: Annotated[
        bool, typer.Option(help="show progress until the node has run them all")
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Run a shadow model on the past images the node still holds (reported ones, received
    since --since), after the images being received: a running node does the work."""
    start, _ = parse_period(since, None)
    settings = load_settings(config)
    db = open_database(settings)
    try:
        with db.session() as s:
            model = find_model(s, name)
            if model.role != ModelRole.SHADOW:
                raise UsageError(
                    f"model {model.name} is {model.role.value}: backfill runs a shadow model "
                    "(the live model's past images: `xrayage rescan`)"
                )
            assert start is not None  # --since is required
            queued = queue_backfill(s, model.sha256, start)
            record_event(s, "model", actor=_actor(),
                         detail=f"backfill of model {model.name}: {queued} images received "
                         f"since {since} queued")  # fmt: skip
            sha = model.sha256
        typer.echo(f"{queued} images queued for model {model.name}, after live traffic")
        if wait and queued:
            _follow(db, sha, queued)
    finally:
        db.dispose()


def _follow(db: Database, sha: str, total: int) -> None:
    console = Console(stderr=True)
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("backfill", total=total)
            while (left := _left(db, sha)) > 0:
                progress.update(task, completed=total - left)
                time.sleep(1.0)
            progress.update(task, completed=total)
    except KeyboardInterrupt:
        typer.echo("stopped watching: the jobs stay queued and the node runs them", err=True)
