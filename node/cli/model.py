"""``xrayage model pull|presets|info``: weights by name, in a local cache, never fetched at serve
time; and the node's models and their roles (node/cli/model_roles.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ai import PRESETS, default_cache_dir
from ai.card import card_path
from ai.download import pull as download
from ai.presets import Preset, model_card
from node.cli import model_roles
from node.cli.support import ConfigOption, UsageError, user_errors
from node.config import load_settings

model_app = typer.Typer(
    help="The node's models (add, promote, retire, list, backfill) and weights (pull, presets, "
    "info).",
    rich_markup_mode="markdown",
)
model_app.command()(model_roles.add)
model_app.command()(model_roles.promote)
model_app.command()(model_roles.retire)
model_app.command("list")(model_roles.list_models)
model_app.command()(model_roles.backfill)

CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache", help="model folder (default: [model] cache_dir, ~/.cache/xrayage/models)"
    ),
]


def _cache(cache: Path | None, config: Path | None) -> Path:
    return cache or load_settings(config).model.cache_dir or default_cache_dir()


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


@model_app.command()
@user_errors
def pull(
    name: Annotated[str, typer.Argument(help="preset name, e.g. riken-senet154")],
    url: Annotated[str | None, typer.Option(help="download from this mirror instead")] = None,
    sha256: Annotated[str | None, typer.Option(help="expected SHA-256 of the file")] = None,
    cache: CacheOption = None,
    config: ConfigOption = None,
) -> None:
    """Download a preset's weights (resumable), check them, and write their model card."""
    preset = _preset(name)
    folder = _cache(cache, config)
    console = Console(stderr=True)
    columns = (
        "{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(name, total=None)
        path = download(
            preset,
            folder,
            url=url,
            sha256=sha256,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    card = model_card(path)
    how = "verified" if (sha256 or preset.sha256) else "recorded (no published checksum)"
    typer.echo(f"{name}: {path}\nsha256 {card.sha256} {how}")


@model_app.command()
@user_errors
def presets(cache: CacheOption = None, config: ConfigOption = None) -> None:
    """Presets, whether they are downloaded, and other weights in the cache."""
    folder = _cache(cache, config)
    table = Table("name", "architecture", title=f"models in {folder}")
    table.add_column("file", overflow="fold")  # a path is only useful whole
    table.add_column("sha256")
    preset_files = set()
    for preset in PRESETS.values():
        path = folder / preset.filename
        preset_files.add(path)
        state = str(path) if path.is_file() else "not downloaded"
        sha = model_card(path).sha256[:16] if path.is_file() else ""
        table.add_row(preset.name, preset.card.architecture, state, sha)
    others = sorted(
        p
        for p in (folder.iterdir() if folder.is_dir() else [])
        if p.suffix in (".pt", ".pth", ".ts", ".safetensors") and p not in preset_files
    )
    for path in others:
        card = model_card(path)
        table.add_row(card.name, card.architecture, str(path), card.sha256[:16])
    Console().print(table)


@model_app.command()
@user_errors
def info(
    name: Annotated[str, typer.Argument(help="preset name or weights file")],
    cache: CacheOption = None,
    config: ConfigOption = None,
) -> None:
    """The model card as JSON, with where the weights are (or would be downloaded from)."""
    if name in PRESETS:
        preset = PRESETS[name]
        path = _cache(cache, config) / preset.filename
        card = model_card(path) if path.is_file() else preset.card
        extra = {
            "url": preset.url,
            "size": preset.size,
            "file": preset.filename,
            "path": str(path),
            "downloaded": path.is_file(),
        }
        if not card.sha256:  # a copied file gets it computed: model_card
            card = replace(card, sha256="not published; recorded at the first pull")
    else:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"neither a preset ({', '.join(PRESETS)}) nor a file: {name}")
        card = model_card(path)
        extra = {"path": str(path), "card": str(card_path(path))}
    typer.echo(json.dumps({**asdict(card), **extra}, indent=2))
