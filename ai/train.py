"""Training the age model: NIH ChestX-ray14 from scratch, or a site's own archive from given
weights, to the same kind of file the node loads (safetensors weights and a model card).

- Examples are split by patient, so no patient is in both the training and validation sets.
- Inputs are made by the node's own preprocessing (:mod:`ai.preprocess`), so what a
  model learns is what it sees in service.
- Augmentation suits radiographs: a small rotation and scale, brightness and contrast; never a
  left-right flip (the heart is on the left).
- AdamW with a linear warm-up and a cosine decay per step; bf16 autocast and channels_last on
  CUDA; L1 loss (the paper's metric is the mean absolute error).
- A checkpoint after every epoch (``checkpoint.pt``) lets ``resume`` continue where a run
  stopped; ``history.csv`` and ``history.png`` hold each epoch's validation MAE and Pearson r.
- The epoch with the lowest validation MAE is written as ``model.safetensors`` + ``model.json``;
  its card carries the age-gap bias correction fitted on the validation set
  (:func:`fit_gap_correction`).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ai.architectures import create_network
from ai.card import ModelCard, file_sha256, load_card, write_card
from ai.decode import IMAGE_SUFFIXES, read
from ai.errors import LabelsError, ModelLoadError
from ai.model import pick_device
from ai.preprocess import IMAGENET_MEAN, IMAGENET_STD, tensors

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model-torchscript.pt"
AGE_LIMITS = (1.0, 100.0)  # NIH's table holds ages up to 414: such rows are left out


@dataclass(frozen=True)
class Example:
    path: Path
    age: float
    patient: str  # examples of one patient stay in one split


@dataclass(frozen=True)
class Examples:
    items: list[Example]
    excluded: list[str]  # rows left out, each with its reason


def _index(images: Path) -> dict[str, Path]:
    """Files under ``images`` by name (NIH ships its PNGs in twelve ``images_0NN`` folders)."""
    return {p.name: p for p in images.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _age(text: str, where: str) -> float | None:
    try:
        age = float(text.strip().rstrip("Yy"))
    except ValueError:
        raise LabelsError(f"{where}: age {text!r} is not a number") from None
    return age if AGE_LIMITS[0] <= age <= AGE_LIMITS[1] else None


def _rows(path: Path, needed: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {c.strip().lower(): c for c in reader.fieldnames or []}
            missing = [n for n in needed if n not in columns]
            if missing:
                raise LabelsError(f"{path}: no column {', '.join(missing)}")
            for n, row in enumerate(reader, start=2):
                yield n, {k: (row[c] or "").strip() for k, c in columns.items()}
    except OSError as e:
        raise LabelsError(f"{path}: {e.strerror}") from None


def nih_examples(table: Path, images: Path) -> Examples:
    """NIH ChestX-ray14's ``Data_Entry_2017.csv``: frontal views (PA, AP), plausible ages, the
    files present under ``images``; grouped by ``Patient ID``."""
    files = _index(images)
    items, excluded = [], []
    needed = ("image index", "patient age", "patient id", "view position")
    for n, row in _rows(table, needed):
        where = f"{table.name}:{n}"
        age = _age(row["patient age"], where)
        if row["view position"].upper() not in ("PA", "AP"):
            excluded.append(f"{where}: view {row['view position']!r} is not frontal")
        elif age is None:
            excluded.append(f"{where}: implausible age {row['patient age']}")
        elif row["image index"] not in files:
            excluded.append(f"{where}: {row['image index']} not found under {images}")
        else:
            items.append(Example(files[row["image index"]], age, row["patient id"]))
    return _checked(Examples(items, excluded), table)


def labelled_examples(table: Path, images: Path) -> Examples:
    """A site's CSV of ``file,age`` (paths relative to ``images``, DICOM or image files), with
    an optional ``patient_id`` column; without one, a DICOM file's Patient ID groups it, and
    any other file is its own patient."""
    items, excluded = [], []
    for n, row in _rows(table, ("file", "age")):
        where = f"{table.name}:{n}"
        path = images / row["file"]
        age = _age(row["age"], where)
        if age is None:
            excluded.append(f"{where}: implausible age {row['age']}")
        elif not path.is_file():
            excluded.append(f"{where}: {row['file']} not found under {images}")
        else:
            items.append(Example(path, age, row.get("patient_id") or _patient(path)))
    return _checked(Examples(items, excluded), table)


def _patient(path: Path) -> str:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return str(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # the image loader says what is wrong with it, in its own words
        return str(path)
    return str(ds.get("PatientID") or path)


def _checked(examples: Examples, table: Path) -> Examples:
    if len({e.patient for e in examples.items}) < 2:
        raise LabelsError(
            f"{table}: {len(examples.items)} usable examples; training needs at least two "
            f"patients ({len(examples.excluded)} rows left out)"
        )
    return examples


def split_by_patient(
    items: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """About ``val_fraction`` of the patients, drawn with ``seed``, form the validation set."""
    patients = sorted({e.patient for e in items})
    rng = np.random.default_rng(seed)
    count = min(max(1, round(len(patients) * val_fraction)), len(patients) - 1)
    held_out = set(rng.permutation(patients)[:count].tolist())
    return (
        [e for e in items if e.patient not in held_out],
        [e for e in items if e.patient in held_out],
    )


class RadiographSet(Dataset[tuple[torch.Tensor, float]]):
    def __init__(self, items: Sequence[Example], input_size: int) -> None:
        self.items = list(items)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        e = self.items[i]
        return tensors([read(e.path).stored], self.input_size, torch.device("cpu"))[0], e.age


@dataclass(frozen=True)
class Augmentation:
    """Ranges drawn uniformly per image; ``none()`` for validation."""

    degrees: float = 5.0
    scale: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``x``: a normalised N x 3 x S x S batch. Returns the batch augmented, normalised."""
        n = x.shape[0]

        def uniform(r: float) -> torch.Tensor:
            return (torch.rand(n, generator=g) * 2 - 1).mul(r).to(x.device)

        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        unit = x * std + mean  # back to [0, 1], where brightness and contrast mean something
        angle = uniform(self.degrees) * math.pi / 180
        zoom = 1 + uniform(self.scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1
        )  # fmt: skip
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        unit = F.grid_sample(unit, grid, padding_mode="zeros", align_corners=False)
        centre = unit.mean(dim=(1, 2, 3), keepdim=True)
        contrast = (1 + uniform(self.contrast)).view(n, 1, 1, 1)
        brightness = uniform(self.brightness).view(n, 1, 1, 1)
        unit = ((unit - centre) * contrast + centre + brightness).clamp(0, 1)
        return (unit - mean) / std


@dataclass
class TrainConfig:
    architecture: str = "senet154"
    input_size: int = 320
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    val_fraction: float = 0.1
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    augmentation: Augmentation = field(default_factory=Augmentation)


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val_mae: float
    val_r: float
    lr: float
    images_per_s: float


def fit_gap_correction(predicted: Sequence[float], actual: Sequence[float]) -> tuple[float, float]:
    """The usual linear age-gap bias correction (Smith et al., NeuroImage 2019; Beheshti et al.,
    NeuroImage: Clinical 2019): the gap (predicted minus actual) regresses on actual age because
    estimates shrink towards the training mean; fitting ``gap = slope * age + intercept`` on a
    reference set lets ``gap - (slope * age + intercept)`` be reported free of that trend."""
    pred, true = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if len(true) < 3 or np.ptp(true) == 0:
        raise LabelsError(
            "the age-gap correction needs at least 3 reference images of different ages"
        )
    slope, intercept = np.polyfit(true, pred - true, 1)
    return round(float(slope), 6), round(float(intercept), 6)


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")


class Trainer:
    """One training run in ``out``; ``run()`` trains (resuming when asked) and writes the model."""

    def __init__(
        self,
        train: Sequence[Example],
        val: Sequence[Example],
        out: Path,
        config: TrainConfig,
        init_weights: Path | None = None,
        provenance: str = "",
    ) -> None:
        if not train or not val:
            raise LabelsError("training and validation sets must both hold images")
        self.train_items, self.val_items = list(train), list(val)
        self.out, self.config, self.provenance = out, config, provenance
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        self.network = create_network(config.architecture)
        if init_weights is not None:
            self._load_init(init_weights)
        else:  # start at the training mean: the head then learns differences, not the offset
            head = self.network.get_classifier()
            assert isinstance(head, nn.Linear)
            nn.init.constant_(head.bias, float(np.mean([e.age for e in self.train_items])))
        self.network.to(self.device)
        if self.device.type == "cuda":
            self.network.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        steps = math.ceil(len(self.train_items) / config.batch_size)
        total, warmup = steps * config.epochs, max(1, round(steps * config.warmup_epochs))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _schedule(s, warmup, total)
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch, self.best_mae = 0, math.inf

    def _load_init(self, path: Path) -> None:
        """Fine-tuning starts from safetensors weights of the same architecture (a training
        run's ``model.safetensors``; its card must be beside it)."""
        if path.suffix != ".safetensors":
            raise ModelLoadError(
                f"{path}: fine-tuning starts from safetensors weights with their model card "
                "(what `xrayage train` writes); TorchScript cannot be trained further here"
            )
        card = load_card(path, required=True)
        if card.architecture != self.config.architecture:
            raise ModelLoadError(
                f"{path}: {card.architecture} weights, but --arch is {self.config.architecture}"
            )
        try:
            self.network.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
        except (RuntimeError, OSError) as e:
            raise ModelLoadError(f"{path}: {str(e).splitlines()[0]}") from None

    def _loader(self, items: Sequence[Example], shuffle: bool) -> DataLoader:  # type: ignore[type-arg]
        return DataLoader(
            RadiographSet(items, self.config.input_size),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            generator=self.generator if shuffle else None,
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.network(x).float().flatten()
        return self.network(x).flatten()

    def predict(self, items: Sequence[Example]) -> np.ndarray:
        self.network.eval()
        out = []
        with torch.inference_mode():
            for x, _ in self._loader(items, shuffle=False):
                out.append(self._forward(x).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def _train_epoch(self, tick: Callable[[int], None]) -> tuple[float, float]:
        self.network.train()
        losses, seen, start = [], 0, time.perf_counter()
        for x, age in self._loader(self.train_items, shuffle=True):
            x = self.config.augmentation(x.to(self.device), self.generator)
            loss = F.l1_loss(self._forward(x), age.to(self.device, torch.float32))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss.item())
            seen += len(age)
            tick(len(age))
        return float(np.mean(losses)), seen / (time.perf_counter() - start)

    def run(
        self, resume: bool = False, tick: Callable[[int], None] = lambda n: None
    ) -> list[EpochResult]:
        """Train up to ``config.epochs``; returns this call's epochs."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore()
        done = []
        actual = np.array([e.age for e in self.val_items])
        while self.epoch < self.config.epochs:
            loss, rate = self._train_epoch(tick)
            predicted = self.predict(self.val_items)
            self.epoch += 1
            result = EpochResult(
                self.epoch,
                round(loss, 4),
                round(float(np.mean(np.abs(predicted - actual))), 4),
                round(_pearson(predicted, actual), 4),
                self.scheduler.get_last_lr()[0],
                round(rate, 2),
            )
            if result.val_mae < self.best_mae:
                self.best_mae = result.val_mae
                self._write_model(predicted, actual)
            self._checkpoint()
            self._record(result)
            done.append(result)
        return done

    def _record(self, result: EpochResult) -> None:
        path = self.out / HISTORY
        row = asdict(result)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        plot_history(path, path.with_suffix(".png"))

    def _state(self) -> dict[str, object]:
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "best_mae": self.best_mae,
            **self._identity(),
        }

    def _identity(self) -> dict[str, object]:
        """What a checkpoint must share with the run that resumes from it."""
        return {
            "architecture": self.config.architecture,
            "input_size": self.config.input_size,
            "val_files": sorted(str(e.path) for e in self.val_items),
        }

    def _checkpoint(self) -> None:
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(self._state(), tmp)
        tmp.replace(self.out / CHECKPOINT)

    def _restore(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise ModelLoadError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        now = self._identity()
        for key, value in now.items():
            if state[key] != value:
                raise ModelLoadError(
                    f"{path}: checkpoint's {key.replace('_', ' ')} differs from this run's; "
                    "resume with the same data, --arch and --input-size"
                )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.best_mae = int(state["epoch"]), float(state["best_mae"])

    def _write_model(self, predicted: np.ndarray, actual: np.ndarray) -> None:
        """The best epoch so far as safetensors with its card (the node loads both unchanged)."""
        weights = self.out / WEIGHTS
        state = {
            k: v.detach().float().cpu().contiguous() for k, v in self.network.state_dict().items()
        }
        safetensors.torch.save_file(state, str(weights))
        ages = [e.age for e in self.train_items]
        slope, intercept = fit_gap_correction(predicted, actual)
        card = ModelCard(
            name=f"xrayage-{self.config.architecture}",
            version=f"epoch{self.epoch}",
            architecture=self.config.architecture,
            input_size=self.config.input_size,
            age_range=(float(min(ages)), float(max(ages))),
            provenance=self.provenance,
            sha256=file_sha256(weights),
            gap_correction=(slope, intercept),
            reference_mae=round(self.best_mae, 3),
            reference_r=round(_pearson(predicted, actual), 4),
            reference_set=f"validation set of training, {len(self.val_items)} images",
            notes=[
                f"trained on {len(self.train_items)} images, validated on "
                f"{len(self.val_items)} (patients disjoint)",
                f"validation MAE {self.best_mae:.2f} years, Pearson r "
                f"{_pearson(predicted, actual):.3f}",
                f"age-gap correction fitted on the validation set: gap - ({slope:.4f} * age "
                f"+ {intercept:.3f})",
            ],
        )
        write_card(weights, card)


def export_torchscript(weights: Path, out: Path | None = None) -> Path:
    """A TorchScript copy of safetensors weights, with its own card (its own SHA-256)."""
    card = load_card(weights, required=True)
    network = create_network(card.architecture)
    network.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    network.eval()
    path = out or weights.with_name(TORCHSCRIPT)
    example = torch.zeros(1, 3, card.input_size, card.input_size)
    with torch.no_grad():
        torch.jit.trace(network, example).save(str(path))
    write_card(
        path,
        replace(card, architecture=f"{card.architecture} (TorchScript)", sha256=file_sha256(path)),
    )
    return path


def plot_history(csv_path: Path, png: Path) -> None:
    """Validation MAE and Pearson r by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    left.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", label="training L1")
    left.plot(epochs, [float(r["val_mae"]) for r in rows], marker="o", label="validation MAE")
    left.set(xlabel="epoch", ylabel="years")
    left.legend()
    right.plot(epochs, [float(r["val_r"]) for r in rows], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="validation Pearson r")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
