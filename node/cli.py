"""The ``xrayage`` command. A user mistake ends in one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydicom
import typer
from pydantic import ValidationError
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.table import Table

from ai import AgeModel, ModelCardError, ModelLoadError, PreprocessError, load_dataset, preprocess
from node.config import ConfigError, Settings, load_settings
from node.patient_age import chronological_age

app = typer.Typer(
    help="xrayage: X-ray age from frontal chest radiographs, as a DICOM node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
USER_ERRORS = (
    ConfigError,
    ModelLoadError,
    ModelCardError,
    PreprocessError,
    ValidationError,
    InvalidDicomError,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file", dir_okay=False)
]


def user_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"xrayage: error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            typer.echo(
                f"xrayage: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@app.command()
@user_errors
def serve(config: ConfigOption = None) -> None:
    """Run the node: receive, infer, report, deliver."""
    from node.service import NodeService

    settings = load_settings(config)
    _logging()
    NodeService(settings).serve_forever()


def _weights(settings: Settings, weights: str | None) -> Path:
    chosen = weights or settings.model.weights
    if not chosen:
        raise ConfigError("no weights: pass --weights PATH or set [model] weights in the config")
    return Path(chosen)


@app.command()
@user_errors
def infer(
    files: Annotated[list[Path], typer.Argument(help="DICOM files", exists=False)],
    weights: Annotated[str | None, typer.Option(help="TorchScript weights file")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
    config: ConfigOption = None,
) -> None:
    """Estimate X-ray age for files, with the node's preprocessing and model, no service."""
    settings = load_settings(config)
    model = AgeModel.load(_weights(settings, weights), device or settings.model.device)
    rows: list[dict[str, Any]] = []
    for path in files:
        row: dict[str, Any] = {"path": str(path)}
        try:
            ds = load_dataset(path)
            row["xray_age"] = model.predict(preprocess(ds, model.card.input_size)[None])[0]
            row["chronological_age"] = chronological_age(ds)
        except PreprocessError as e:
            row["error"] = str(e)
        row.update(
            model=model.card.name,
            model_version=model.card.version,
            model_sha256=model.card.sha256,
            untrained=model.card.untrained,
        )
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        table = Table("file", "X-ray age (years)", "chronological age", "note")
        for r in rows:
            age = r.get("chronological_age")
            table.add_row(
                r["path"],
                f"{r['xray_age']:.2f}" if "xray_age" in r else "-",
                f"{age:.1f}" if age is not None else "-",
                r.get("error", ""),
            )
        Console().print(table)
        if model.card.untrained:
            typer.echo("note: UNTRAINED weights - these numbers are not age estimates", err=True)
    if any("error" in r for r in rows):
        raise typer.Exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_demo_file() -> Path:
    try:
        import data_store  # the pydicom-data package, installed by the [demo] extra
    except ImportError:
        raise ConfigError(
            "no FILE given and pydicom-data is not installed: pass a DICOM file "
            "or `pip install 'xrayage[demo]'`"
        ) from None
    return Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


@app.command()
@user_errors
def demo(
    file: Annotated[
        Path | None, typer.Argument(help="a chest radiograph (default: pydicom-data's)")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="folder for the demo's data (default: temp)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the report")] = 300,
) -> None:
    """First look, no PACS and no trained weights: send FILE to a node running here, show the SR."""
    from ai import build_untrained_model
    from node.scu import send_files
    from node.service import NodeService
    from storage import Instance, Result

    source = file or _default_demo_file()
    if not source.is_file():
        raise ConfigError(f"not a file: {source}")
    folder = data or Path(tempfile.mkdtemp(prefix="xrayage-demo-"))
    weights = folder / "models" / "untrained-seresnet.pt"
    build_untrained_model(weights)
    port = _free_port()
    settings = load_settings(
        None,
        node={"ae_title": "XRAYAGE", "host": "127.0.0.1", "port": port},
        storage={"path": folder},
        model={"weights": str(weights)},
    )
    _logging()
    node = NodeService(settings)
    node.start()
    try:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        error = send_files("DEMO", "XRAYAGE", "127.0.0.1", port, [source])[0]
        if error:
            raise ConfigError(f"{source}: not stored by the node: {error}")
        deadline = time.monotonic() + timeout
        while True:
            with node.db.session() as s:
                inst = s.query(Instance).filter_by(sop_instance_uid=uid).one()
                result = s.query(Result).filter_by(instance_id=inst.id).one_or_none()
                state, reason = inst.state.value, inst.reason
            if result is not None or state in ("skipped", "failed"):
                break
            if time.monotonic() > deadline:
                raise ConfigError(f"no report after {timeout:g} s (state {state})")
            time.sleep(0.2)
    finally:
        node.stop()
    if result is None:
        typer.echo(f"{source}: {state}: {reason}")
        raise typer.Exit(1)
    typer.echo(
        f"\nX-ray age {result.xray_age:.2f} years  (UNTRAINED demo weights: "
        "not an age estimate; configure real weights for that)"
    )
    typer.echo(f"SR:               {result.sr_path}")
    if result.sc_path:
        typer.echo(f"Secondary Capture: {result.sc_path}")
    typer.echo(f"data folder:      {folder}\n")
    dsrdump = shutil.which("dsrdump") or (
        "/usr/bin/dsrdump" if Path("/usr/bin/dsrdump").exists() else None
    )
    if dsrdump:
        sys.stdout.flush()
        subprocess.run([dsrdump, str(result.sr_path)], check=False)
    else:
        typer.echo("(install DCMTK for dsrdump to print the SR's content tree)")


if __name__ == "__main__":
    app()
