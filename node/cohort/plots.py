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


EXPOSURE_NAMES = {
    "corrected_gap": "X-ray age gap, bias-corrected",
    "gap": "X-ray age gap",
    "aging_rate": "X-ray aging rate",
}


def exposure_name(summary: dict[str, Any]) -> str:
    """The exposure in words, with the correction that made it."""
    name = EXPOSURE_NAMES[summary["exposure"]]
    if summary["exposure"] == "corrected_gap":
        name += " (model card's)" if summary["correction"] == "card" else " (this cohort's)"
    return name


def _label(name: str) -> str:
    """A covariate as a reader would name it, with its unit."""
    return {"age": "age (per year)", "sex": "male sex"}.get(name, name.replace("_", " "))


def km_png(analysis: Analysis) -> bytes:
    from lifelines.plotting import add_at_risk_counts

    summary = analysis.summary
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for fitter in analysis.km:
        fitter.plot_survival_function(ax=ax, ci_show=True)
    origin = "index date" if summary["time_origin"]["origin"] == "index_date" else "index image"
    ax.set_xlabel(f"days from the {origin}")
    ax.set_ylabel("free of the event")
    ax.set_ylim(0, 1.02)
    _title(
        ax,
        f"Kaplan-Meier by {exposure_name(summary)}\n({summary['km']['grouping']}), "
        f"log-rank p = {summary['logrank_p']:.2g}",
        summary,
    )
    add_at_risk_counts(*analysis.km, ax=ax, rows_to_show=["At risk"], fig=fig)
    fig.tight_layout()
    return _png(fig)


Row = tuple[str, float, list[float]]  # label, estimate, 95 % CI


def _forest(ax: Axes, rows: list[Row], null: float, log: bool, digits: int) -> None:
    """One row per estimate: its interval with caps (visible however narrow), a small marker,
    and the estimate with its interval written at the right, outside the axes."""
    for y, (_, estimate, (low, high)) in enumerate(reversed(rows)):
        ax.errorbar(
            [estimate], [y], xerr=[[estimate - low], [high - estimate]], fmt="D",
            color="#1f5fa8", ecolor="#333", elinewidth=1.5, capsize=5, markersize=4, zorder=3,
        )  # fmt: skip
        ax.annotate(
            f"{estimate:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})",
            (1.02, y), xycoords=("axes fraction", "data"), va="center", fontsize=9,
        )  # fmt: skip
    ax.axvline(null, color="#999", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    low = min(min(r[2][0] for r in rows), null)
    high = max(max(r[2][1] for r in rows), null)
    if log:  # ratios on a log axis, labelled as plain numbers, with room beyond the ends
        ax.set_xscale("log")
        ax.set_xlim(low / 1.08, high * 1.08)
        ax.set_xticks([t for t in RATIO_TICKS if low / 1.08 <= t <= high * 1.08] or [1.0])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = 0.08 * (high - low or 1.0)
        ax.set_xlim(low - pad, high + pad)


def forest_figure(analysis: Analysis) -> Figure:
    summary = analysis.summary
    cox = summary["cox"]
    gap = "gap" if summary["exposure"] == "gap" else "corrected_gap"
    hazards: list[Row] = []
    if "aging_rate" in cox:
        rate = cox["aging_rate"]
        hazards.append(("X-ray aging rate (per year a year)", rate["hr_per_unit"], rate["ci95"]))
    hazards += [
        (
            f"{exposure_name({**summary, 'exposure': gap})}\n(per 5 years)",
            cox["gap"]["hr_per_5_years"],
            cox["gap"]["ci95_per_5_years"],
        ),
        *((_label(name), c["hr"], c["ci95"]) for name, c in cox["covariates"].items()),
    ]
    shifts = [
        (_label(n), c["estimate_years"], c["ci95"]) for n, c in summary["comorbidities"].items()
    ]
    heights = [len(hazards) + 1, len(shifts) + 1] if shifts else [len(hazards) + 1]
    fig = Figure(figsize=(8, 0.5 * sum(heights) + 1.4))
    axes = fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    _forest(axes[0], hazards, 1.0, log=True, digits=2)
    axes[0].set_xlabel("hazard ratio (95 % CI), adjusted Cox model")
    _title(axes[0], "Time to event", summary)
    if shifts:
        _forest(axes[1], shifts, 0.0, log=False, digits=2)
        axes[1].set_xlabel("difference in age gap, years (95 % CI), adjusted for age and sex")
        axes[1].set_title("Comorbidities", fontsize=10)
    fig.tight_layout()
    return fig


def forest_png(analysis: Analysis) -> bytes:
    return _png(forest_figure(analysis))
