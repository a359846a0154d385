"""``xrayage train``: an age model from NIH ChestX-ray14 or from a site's own labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from ai.architectures import ARCHITECTURES
from ai.errors import LabelsError
from node.cli.support import user_errors


@user_errors
def train(
    out: Annotated[Path, typer.Option(help="folder for checkpoints, history and the model")],
    images: Annotated[Path, typer.Option(help="folder holding the images (searched recursively)")],
    nih_csv: Annotated[
        Path | None, typer.Option(help="NIH ChestX-ray14 Data_Entry_2017.csv")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="CSV of file,age[,patient_id]; files relative to --images, DICOM or PNG"),
    ] = None,
    arch: Annotated[str, typer.Option(help=f"one of {', '.join(ARCHITECTURES)}")] = "senet154",
    weights: Annotated[
        Path | None,
        typer.Option(help="start from these safetensors weights (fine-tuning; card beside it)"),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    input_size: Annotated[int, typer.Option(min=32, max=2048)] = 320,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine decay)")] = 3e-4,
    val_fraction: Annotated[float, typer.Option(min=0.01, max=0.5)] = 0.1,
    seed: int = 0,
    workers: Annotated[int, typer.Option(min=0, help="image loading processes")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
    torchscript: Annotated[
        bool, typer.Option(help="also export the best model as TorchScript")
    ] = False,
) -> None:
    """Train the age model; writes OUT/model.safetensors with its card OUT/model.json, which
    the node loads as they are, plus OUT/history.csv and OUT/history.png."""
    from ai.train import (
        TrainConfig,
        Trainer,
        export_torchscript,
        labelled_examples,
        nih_examples,
        split_by_patient,
    )

    if (nih_csv is None) == (labels is None):
        raise LabelsError("give exactly one of --nih-csv and --labels")
    if labels is not None:
        table, examples = labels, labelled_examples(labels, images)
    else:
        assert nih_csv is not None
        table, examples = nih_csv, nih_examples(nih_csv, images)
    config = TrainConfig(
        architecture=arch,
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers,
        device=device,
    )
    train_set, val_set = split_by_patient(examples.items, val_fraction, seed)
    err = Console(stderr=True)
    err.print(
        f"{len(train_set)} training and {len(val_set)} validation images "
        f"({len(examples.excluded)} rows of {table.name} left out)"
    )
    start = f"fine-tuned from {weights.name}" if weights else "trained from scratch"
    trainer = Trainer(
        train_set,
        val_set,
        out,
        config,
        init_weights=weights,
        provenance=f"xrayage train: {arch}, {start} on {table.name}",
    )
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal) as progress:
        task = progress.add_task("training", total=len(train_set) * epochs)
        results = trainer.run(resume=resume, tick=lambda n: progress.advance(task, n))
    for r in results:
        typer.echo(
            f"epoch {r.epoch}: training L1 {r.train_loss:.2f}, validation MAE {r.val_mae:.2f} "
            f"years, r {r.val_r:.3f}, {r.images_per_s:.1f} images/s"
        )
    typer.echo(f"best validation MAE {trainer.best_mae:.2f} years: {out / 'model.safetensors'}")
    if torchscript:
        typer.echo(f"TorchScript: {export_torchscript(out / 'model.safetensors')}")
