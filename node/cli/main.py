"""The ``xrayage`` command. A user mistake ends in one line on stderr and exit status 2."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError

from node.cli.audit import audit, audit_purge
from node.cli.cohort import cohort
from node.cli.db import db_app
from node.cli.infer import evaluate, infer
from node.cli.model import model_app
from node.cli.rescan import rescan
from node.cli.results import results
from node.cli.retry import retry
from node.cli.routes import routes
from node.cli.support import ConfigOption, UsageError, check_listen, make_folder, user_errors
from node.cli.train import train
from node.cli.validation import validation
from node.config import load_settings
from node.logs import configure_logging
from storage.locks import lock_folder

app = typer.Typer(
    help="xrayage: X-ray age from frontal chest radiographs, as a DICOM node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: config keys in brackets ("[retro] peer") as written
)


def _version(asked: bool) -> None:
    if asked:
        typer.echo(f"xrayage {version('xrayage')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version",
            show_default=False, metavar="",
        ),
    ] = False,
) -> None:
    """xrayage: X-ray age from frontal chest radiographs, as a DICOM node."""


_WORDS = (
    ("Value error, ", ""),
    ("Input should be greater than or equal to", "must be at least"),
    ("Input should be less than or equal to", "must be at most"),
)


def run() -> None:
    """The ``xrayage`` script: click's own checks of options (a value out of range, a choice
    not offered, an option or command that does not exist) end in one line and exit status 2
    too, instead of a framed box."""
    from typer.exceptions import TyperException  # click's exceptions derive from it

    try:
        code = app(standalone_mode=False)
    except TyperException as e:
        context = getattr(e, "ctx", None)
        path = context.command_path if context is not None else "xrayage"
        message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
        for theirs, ours in _WORDS:  # typer checks values with pydantic: in our words
            message = message.replace(theirs, ours)
        typer.echo(f"xrayage: error: {path}: {message} (see {path} --help)", err=True)
        code = getattr(e, "exit_code", 2)
    except typer.Abort:
        typer.echo("xrayage: aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


app.command()(infer)
app.command()(evaluate)
app.command()(retry)
app.command()(routes)
app.command()(rescan)
app.command()(train)
app.command()(results)
app.command()(validation)
app.command()(cohort)
app.command()(audit)
app.command("audit-purge")(audit_purge)
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")


@app.command()
@user_errors
def serve(
    config: ConfigOption = None,
    role: Annotated[
        str,
        typer.Option(
            help="what this process does: receive, infer, deliver, schedule, or all of them"
        ),
    ] = "all",
) -> None:
    """Run the node: receive, infer, report, deliver (or one of these, to scale out)."""
    from node.service import ROLES, NodeService

    if role not in (*ROLES, "all"):
        raise UsageError(f"--role must be one of {', '.join(ROLES)} or all, not {role!r}")
    settings = load_settings(config)
    folder = settings.storage.path
    # SQLite has one writer: a second serve on the folder would run a second scheduler and
    # record config changes that never happened. Roles sharing PostgreSQL need no such lock.
    # An existing folder is locked first (another serve on it holds the ports too, and the
    # folder is what to name); a new one only once the ports are known free, so that a port
    # in use leaves nothing behind.
    lock = settings.storage.database_url is None
    held = lock_folder(folder) if lock and folder.is_dir() else None
    try:
        if role in ("receive", "all"):
            check_listen("[node] port", settings.node.host, settings.node.port)
        if settings.http.port:
            check_listen("[http] port", settings.http.host, settings.http.port)
        make_folder("[storage] path", folder)
        if lock and held is None:
            held = lock_folder(folder)
        configure_logging(settings.logging)
        NodeService(settings, role).serve_forever()  # type: ignore[arg-type]
    finally:
        if held is not None:
            held.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_demo_file() -> Path:
    try:
        import data_store  # the pydicom-data package, installed by the [demo] extra
    except ImportError:
        raise UsageError(
            "no FILE given and pydicom-data is not installed: pass a DICOM file "
            "or `pip install 'xrayage[demo]'`"
        ) from None
    return Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


DEMO_FOLDER = Path("xrayage-demo")


@app.command()
@user_errors
def demo(
    file: Annotated[
        Path | None, typer.Argument(help="a chest radiograph (default: pydicom-data's)")
    ] = None,
    data: Annotated[
        Path, typer.Option(help="the demo's folder: weights, node data, its config")
    ] = DEMO_FOLDER,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the report")] = 300,
) -> None:
    """First look, no PACS and no trained weights: send FILE to a node running here, show the
    SR, and keep everything in --data (./xrayage-demo) for the next steps it prints."""
    source = file or _default_demo_file()
    if not source.is_file():
        raise UsageError(f"not a file: {source}")
    try:
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    except (InvalidDicomError, AttributeError):
        raise UsageError(
            f"{source}: not a DICOM image with a SOP Instance UID; the demo sends DICOM to the "
            f"node (for a PNG or JPEG: xrayage infer {source} --weights ...)"
        ) from None
    _demo(source, uid, data.resolve(), timeout)


def _demo_config(folder: Path, weights: Path) -> Path:
    """The demo node's config, for ``xrayage results -c`` and ``serve -c`` afterwards."""
    config = folder / "xrayage.toml"
    config.write_text(
        "# Written by `xrayage demo`: its node's data and UNTRAINED weights (not age estimates).\n"
        f'[storage]\npath = "{folder / "node"}"\n[model]\nweights = "{weights}"\n'
    )
    return config


def _demo(source: Path, uid: str, folder: Path, timeout: float) -> None:
    from ai import build_untrained_model
    from node.dicom.scu import send_files
    from node.service import NodeService
    from storage import Instance, Result

    # Made once and kept: the same weights (and SHA-256, and SR UIDs) on every later run.
    weights = folder / "models" / "untrained-seresnet.pt"
    if not weights.is_file():
        build_untrained_model(weights)
    config = _demo_config(folder, weights)
    port = _free_port()
    settings = load_settings(
        config, node={"ae_title": "XRAYAGE", "host": "127.0.0.1", "port": port}
    )
    configure_logging(settings.logging)
    node = NodeService(settings)
    node.start()
    try:
        error = send_files("DEMO", "XRAYAGE", "127.0.0.1", port, [source])[0]
        if error:
            raise UsageError(f"{source}: not stored by the node: {error}")
        deadline = time.monotonic() + timeout
        while True:
            with node.db.session() as s:
                inst = s.query(Instance).filter_by(sop_instance_uid=uid).one()
                result = s.query(Result).filter_by(instance_id=inst.id).one_or_none()
                state, reason = inst.state.value, inst.reason
            if state in ("reported", "delivered", "skipped", "failed"):
                break
            if time.monotonic() > deadline:
                raise UsageError(f"no report after {timeout:g} s (state {state})")
            time.sleep(0.2)
    finally:
        node.stop()
    if result is None:
        typer.echo(f"{source}: {state}: {reason}")
        raise typer.Exit(1)
    dsrdump = shutil.which("dsrdump") or (
        "/usr/bin/dsrdump" if Path("/usr/bin/dsrdump").exists() else None
    )
    if dsrdump:  # the SR's content tree first; what happened and what next come last
        typer.echo("The SR's content tree (DCMTK dsrdump):\n")
        sys.stdout.flush()
        subprocess.run([dsrdump, str(result.sr_path)], check=False)
    typer.echo(
        "\n".join(
            [
                "",
                f"X-ray age {result.xray_age:.2f}: UNTRAINED demo weights, not an age estimate.",
                f"The node received {source.name}, analysed it and wrote:",
                f"  SR                 {result.sr_path}",
                *([f"  Secondary Capture  {result.sc_path}"] if result.sc_path else []),
                f"Everything is kept in {folder} (weights in {weights.parent}).",
                "",
                "Next:",
                f"  xrayage results -c {config}        # the result as a row",
                f"  xrayage serve -c {config}          # this node, listening on port 11112",
                "  xrayage model pull riken-senet154   # the published weights, for real ages",
                *([] if dsrdump else ["  (install DCMTK for dsrdump to print the SR)"]),
            ]
        )
    )


if __name__ == "__main__":
    app()
