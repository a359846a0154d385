"""Agreement between X-ray age and chronological age, as the paper reports it.

MAE, Pearson r, and the Bland-Altman mean bias with its 95 % limits of agreement
(bias +- 1.96 SD of the differences), each with a percentile bootstrap 95 % confidence interval.
The bootstrap resamples patients with all their images when the labels name patients (NIH
ChestX-ray14 has several images of one patient: resampling images would treat them as
independent and make the intervals too narrow), else images. Plots: a scatter against the
identity line and a Bland-Altman plot.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ai.errors import LabelsError

Metric = Callable[[np.ndarray, np.ndarray], float]


def _mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true)))


def _pearson(pred: np.ndarray, true: np.ndarray) -> float:
    if np.std(pred) == 0 or np.std(true) == 0:
        return float("nan")
    return float(np.corrcoef(pred, true)[0, 1])


def _bias(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred - true))


def _loa(sign: float) -> Metric:
    def limit(pred: np.ndarray, true: np.ndarray) -> float:
        d = pred - true
        sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
        return float(np.mean(d)) + sign * 1.96 * sd

    return limit


METRICS: dict[str, Metric] = {
    "mae": _mae,
    "pearson_r": _pearson,
    "mean_bias": _bias,
    "loa_lower": _loa(-1.0),
    "loa_upper": _loa(+1.0),
}


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float


def _draws(
    n: int, patients: Sequence[str] | None, n_boot: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Index sets of the bootstrap samples: images, or whole patients (a cluster bootstrap)."""
    if patients is None:
        return list(rng.integers(0, n, size=(n_boot, n)))
    images: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        images.setdefault(patient, []).append(i)
    clusters = [np.array(v) for v in images.values()]
    return [
        np.concatenate([clusters[c] for c in rng.integers(0, len(clusters), len(clusters))])
        for _ in range(n_boot)
    ]


def agreement(
    predicted: Sequence[float],
    actual: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    patients: Sequence[str] | None = None,
) -> dict[str, Estimate]:
    """The metrics with bootstrap intervals; ``patients`` (one per image) makes the bootstrap
    resample patients."""
    pred = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(actual, dtype=np.float64)
    if len(pred) != len(true) or len(pred) < 2:
        raise LabelsError(f"need at least 2 labelled predictions, got {len(pred)}")
    draws = _draws(len(pred), patients, n_boot, np.random.default_rng(seed))
    out = {}
    for name, metric in METRICS.items():
        boot = np.array([metric(pred[i], true[i]) for i in draws])
        boot = boot[np.isfinite(boot)]
        low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
        out[name] = Estimate(metric(pred, true), float(low), float(high))
    return out


# Column names of the label tables we expect: ours (file, age, patient_id), NIH ChestX-ray14's
# Data_Entry_2017.csv (Image Index, Patient Age, Patient ID).
_FILE_COLUMNS = ("file", "path", "filename", "image", "image index")
_AGE_COLUMNS = ("age", "chronological_age", "patient age")
_PATIENT_COLUMNS = ("patient_id", "patient id", "patient")
_SEX = re.compile(r"(?i)^(male|female)$")


@dataclass
class Labels:
    ages: dict[str, float]  # by file stem
    excluded: list[str]  # rows left out, each with its reason
    patients: dict[str, str] | None = None  # by file stem, when the table names patients

    def within(self, low: float, high: float) -> Labels:
        """The labels of ages in ``[low, high]`` (the model's validated range)."""
        kept = Labels({}, list(self.excluded), self.patients)
        for stem, age in self.ages.items():
            if low <= age <= high:
                kept.ages[stem] = age
            else:
                kept.excluded.append(f"{stem}: age {age:g} outside {low:g}-{high:g}")
        return kept


def read_labels(path: Path) -> Labels:
    """Chronological age by file stem, from a CSV with a header naming a file and an age column
    (``file,age``; NIH's ``Image Index,Patient Age``), or from JSRT's clinical tables
    (whitespace-separated rows ``JPCLN001.IMG ... AGE SEX ...`` without a header: the age is the
    field just before the sex). Files match images of any suffix with the same stem."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise LabelsError(f"{path}: {e.strerror}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LabelsError(f"{path}: empty")
    header = next(csv.reader([lines[0]]))
    names = [h.strip().lower() for h in header]
    file_col = next((names.index(c) for c in _FILE_COLUMNS if c in names), None)
    age_col = next((names.index(c) for c in _AGE_COLUMNS if c in names), None)
    patient_col = next((names.index(c) for c in _PATIENT_COLUMNS if c in names), None)
    labels = Labels({}, [])
    if file_col is not None and age_col is not None:
        if patient_col is not None:
            labels.patients = {}
        for n, row in enumerate(csv.reader(lines[1:]), start=2):
            _add(labels, row[file_col], row[age_col], path, n)
            if labels.patients is not None:
                labels.patients[Path(row[file_col].strip()).stem] = row[patient_col].strip()
    else:
        for n, line in enumerate(lines, start=1):
            fields = line.split()
            sex = next((i for i, f in enumerate(fields) if _SEX.match(f)), None)
            if sex is None or sex < 2:
                raise LabelsError(
                    f"{path}:{n}: neither a CSV with file and age columns "
                    f"({', '.join(_FILE_COLUMNS)} / {', '.join(_AGE_COLUMNS)}) nor a JSRT row"
                )
            _add(labels, fields[0], fields[sex - 1], path, n)
    if not labels.ages:
        raise LabelsError(f"{path}: no usable labels ({len(labels.excluded)} rows left out)")
    return labels


def _add(labels: Labels, file: str, age: str, path: Path, line: int) -> None:
    """NIH's table has a few impossible ages (over 400): such rows are left out and counted."""
    try:
        value = float(age.strip().rstrip("Yy"))
    except ValueError:
        raise LabelsError(f"{path}:{line}: age {age!r} is not a number") from None
    if 0 <= value <= 120:
        labels.ages[Path(file.strip()).stem] = value
    else:
        labels.excluded.append(f"{path.name}:{line}: implausible age {value:g}")


def plot_agreement(
    predicted: Sequence[float], actual: Sequence[float], out_dir: Path
) -> list[Path]:
    """``scatter.png`` and ``bland_altman.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(actual, dtype=np.float64)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "scatter.png", out_dir / "bland_altman.png"]

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    lo, hi = float(min(pred.min(), true.min())) - 2, float(max(pred.max(), true.max())) + 2
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="identity")
    ax.scatter(true, pred, s=8, alpha=0.6)
    ax.set(
        xlabel="chronological age (years)",
        ylabel="X-ray age (years)",
        xlim=(lo, hi),
        ylim=(lo, hi),
        title=f"n = {len(pred)}, MAE {_mae(pred, true):.2f} years",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[0])
    plt.close(fig)

    mean, diff = (pred + true) / 2, pred - true
    bias, lower, upper = _bias(pred, true), _loa(-1)(pred, true), _loa(+1)(pred, true)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(mean, diff, s=8, alpha=0.6)
    for y, style, label in (
        (bias, "-", f"bias {bias:.2f}"),
        (lower, "--", f"-1.96 SD {lower:.2f}"),
        (upper, "--", f"+1.96 SD {upper:.2f}"),
    ):
        ax.axhline(y, color="black", linestyle=style, linewidth=1, label=label)
    ax.set(
        xlabel="mean of X-ray and chronological age (years)",
        ylabel="X-ray age - chronological age (years)",
        title="Bland-Altman",
    )
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
