"""The cohort's figures as PNG: Kaplan-Meier curves with the numbers at risk under them (the
paper's Fig. 3) and a forest plot of the Cox hazard ratios and the comorbidities' age-gap
differences (Fig. 2). Each on a figure of its own, not pyplot's global state."""

from __future__ import annotations

import io
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from node.cohort.analysis import Analysis

RATIO_TICKS = (0.1, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
SYNTHETIC_NOTE = "SYNTHETIC DEMO COHORT: not patient data"


def _png(fig: Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    return out.getvalue()


def _title(ax: Axes, text: str, summary: dict[str, Any]) -> None:
    ax.set_title(f"{SYNTHETIC_NOTE}\n{text}" if summary["synthetic"] else text, fontsize=10)


def km_png(analysis: Analysis) -> bytes:
    from lifelines.plotting import add_at_risk_counts

    summary = analysis.summary
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for fitter in analysis.km:
        fitter.plot_survival_function(ax=ax, ci_show=True)
    ax.set_xlabel("days from the index radiograph")
    ax.set_ylabel("free of the event")
    ax.set_ylim(0, 1.02)
    exposure = "bias-corrected gap" if summary["exposure"] == "corrected_gap" else "age gap"
    _title(
        ax,
        f"Kaplan-Meier by {exposure} ({summary['km']['grouping']}), "
        f"log-rank p = {summary['logrank_p']:.2g}",
        summary,
    )
    add_at_risk_counts(*analysis.km, ax=ax, rows_to_show=["At risk"], fig=fig)
    fig.tight_layout()
    return _png(fig)


def _forest(ax: Axes, rows: list[tuple[str, float, list[float]]], null: float, log: bool) -> None:
    for y, (_, estimate, (low, high)) in enumerate(reversed(rows)):
        ax.plot([low, high], [y, y], color="#333")
        ax.plot([estimate], [y], "s", color="#1f5fa8")
    ax.axvline(null, color="#999", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    if log:  # ratios on a log axis, labelled as plain numbers
        ax.set_xscale("log")
        low, high = min(r[2][0] for r in rows), max(r[2][1] for r in rows)
        ax.set_xticks([t for t in RATIO_TICKS if low / 1.1 <= t <= high * 1.1] or [1.0])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def forest_png(analysis: Analysis) -> bytes:
    summary = analysis.summary
    cox = summary["cox"]
    hazards = [
        (
            f"{summary['exposure']} (per 5 years)",
            cox["gap"]["hr_per_5_years"],
            cox["gap"]["ci95_per_5_years"],
        ),
        *(
            ("sex (male)" if name == "sex" else name, c["hr"], c["ci95"])
            for name, c in cox["covariates"].items()
        ),
    ]
    shifts = [(n, c["estimate_years"], c["ci95"]) for n, c in summary["comorbidities"].items()]
    heights = [len(hazards) + 1, len(shifts) + 1] if shifts else [len(hazards) + 1]
    fig = Figure(figsize=(7, 0.45 * sum(heights) + 1.2))
    axes = fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    _forest(axes[0], hazards, 1.0, log=True)
    axes[0].set_xlabel("hazard ratio (95 % CI), adjusted Cox model")
    _title(axes[0], "Time to event", summary)
    if shifts:
        _forest(axes[1], shifts, 0.0, log=False)
        axes[1].set_xlabel("difference in age gap, years (95 % CI), adjusted for age and sex")
        axes[1].set_title("Comorbidities", fontsize=10)
    fig.tight_layout()
    return _png(fig)
