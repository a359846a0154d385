"""What every ``xrayage`` command shares: one-line user errors, the config option, weights."""

from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import OperationalError

from ai.presets import resolve_weights
from node.config import ConfigError, Settings
from node.results.spreadsheet import write_csv
from storage import Database
from xrayage.errors import CannotListen, UserError

if TYPE_CHECKING:
    from ai.model import AgeModel

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(UserError):
    """A command's arguments or options that cannot be used together or as given."""


ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file", dir_okay=False)
]
WeightsOption = Annotated[
    str | None,
    typer.Option(help="preset name (see `xrayage model presets`) or TorchScript/safetensors file"),
]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu or cuda")]


def user_errors(func: F) -> F:
    """A user's mistake (:class:`xrayage.errors.UserError`, from any layer) ends in
    ``xrayage: error: ...`` on stderr and exit status 2; so do a database server that refuses
    and a file the system cannot open, which the message names."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as e:
            typer.echo(f"xrayage: error: {e}", err=True)
            raise typer.Exit(2) from None
        except OperationalError as e:  # the database server refused or is unreachable
            typer.echo(f"xrayage: error: database: {str(e.orig).strip().splitlines()[0]}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            typer.echo(
                f"xrayage: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def load_model(settings: Settings, weights: str | None, device: str | None) -> AgeModel:
    chosen = weights or settings.model.weights
    if not chosen:
        raise ConfigError(
            "no weights: pass --weights PATH|PRESET or set [model] weights in the config"
        )
    from ai.model import AgeModel  # torch loads here, not for every command

    path = resolve_weights(chosen, settings.model.cache_dir)
    return AgeModel.load(path, device or settings.model.device)


def open_database(settings: Settings) -> Database:
    """The node's database, which must exist: a command never creates an empty one by mistake."""
    url = settings.storage.url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(
                f"no database at {path}: check [storage] path (the node creates it on first start)"
            )
    return settings.storage.open_database()


def check_listen(key: str, host: str, port: int) -> None:
    """Refuse a port another program holds, naming the config key, before ``serve`` creates or
    opens anything (the listeners bind later, once the database is ready)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            s.bind((host, port))
        except OSError as e:
            raise CannotListen(
                f"{key} = {port}: cannot listen on {host}:{port} ({e.strerror or e}): another "
                f"program (another xrayage serve?) holds it; stop it or change {key}"
            ) from None


def make_folder(key: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key} = {folder}: cannot create it ({e.strerror or e})") from None


def _time(value: str | None, name: str) -> dt.datetime | None:
    """A date or an ISO 8601 date and time; without a zone it is UTC, like the log."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name}: {value!r} is not a date (YYYY-MM-DD[THH:MM[:SS]][Z])") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


def parse_age_range(value: str | None) -> tuple[float, float] | None:
    """``--age-range LOW,HIGH`` in years, or None when not given (the model card's then)."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--age-range: {value!r} is not LOW,HIGH in years") from None
    if not 0 <= low < high:
        raise UsageError(f"--age-range: {value!r} is not LOW,HIGH with 0 <= LOW < HIGH")
    return low, high


def parse_period(
    since: str | None, until: str | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``--since`` and ``--until``; an empty period is a mistake, not zero rows."""
    start, end = _time(since, "--since"), _time(until, "--until")
    if start is not None and end is not None and start >= end:
        raise UsageError(f"--since {since} is not before --until {until}: the period is empty")
    return start, end


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


# Short headers for the table view (the other formats keep the column names).
HEADERS = {
    "reported_at": "reported (UTC)", "at": "time (UTC)", "patient_id": "patient",
    "study_date": "study", "first_study_date": "first study", "view_position": "view",
    "xray_age": "X-ray age", "chronological_age": "age", "age_gap": "gap",
    "aging_rate": "aging rate", "aging_rate_se": "rate SE", "aging_rate_images": "rate n",
    "model_name": "model",
}  # fmt: skip


def print_rows(
    rows: list[dict[str, Any]],
    columns: Sequence[str],
    format: str,
    noun: str,
    limit: int = 0,
    table: Sequence[str] | None = None,
) -> None:
    """``rows`` (values of ``columns``) on stdout as JSON, CSV or a table with a count line;
    ``limit``: the query's, to say when it was reached; ``table``: the columns a person scans,
    when the table would not fit a terminal with all of them."""
    if format == Format.json:
        json.dump([{c: row[c] for c in columns} for row in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif format == Format.csv:
        write_csv(sys.stdout, columns, rows)
    else:
        shown = Table(*(HEADERS.get(c, c) for c in table or columns), box=None)
        for row in rows:
            shown.add_row(*(_cell(row[c]) for c in table or columns))
        # A terminal's width; piped, 120 columns rather than rich's 80.
        Console(width=shutil.get_terminal_size((120, 24)).columns).print(shown)
        reached = " (--limit reached)" if limit and len(rows) == limit else ""
        typer.echo(f"{len(rows)} {noun}{reached}")


def _cell(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)
