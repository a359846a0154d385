"""The dashboard's plots, drawn on the server with matplotlib (SVG, nothing fetched by the
browser from elsewhere): agreement of X-ray age with chronological age on this site's patients
(node/results/validation.py's pairs) and what the node did per day. Each plot takes the active
models' figures, the live model's first: the agreement per month draws one series per model,
the others the live model's images."""

from __future__ import annotations

import datetime as dt
import io
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from node.results.validation import Validation
from storage import Database, InstanceState, utcnow
from storage.results import AgePair, instances_per_day

DAYS = 30
COLOURS = {
    InstanceState.DELIVERED: "#2a7", InstanceState.REPORTED: "#4a9be0",
    InstanceState.INFERRED: "#9bd", InstanceState.QUEUED: "#bbb",
    InstanceState.RECEIVED: "#ddd", InstanceState.SKIPPED: "#e9c46a",
    InstanceState.FAILED: "#c33",
}  # fmt: skip


UNTRAINED = "UNTRAINED DEMO WEIGHTS: not age estimates"


def _figure(width: float, height: float, v: Validation | None = None) -> tuple[Figure, Axes]:
    """A figure of its own, not pyplot's global state: requests are served on many threads.
    A figure of an untrained model's numbers says so above the plot."""
    fig = Figure(figsize=(width, height))
    if v is not None and v.card.untrained:
        fig.suptitle(UNTRAINED, color="#b00", fontweight="bold")
    return fig, fig.subplots()


def _svg(fig: Figure) -> bytes:
    out = io.BytesIO()
    with rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, and searchable
        fig.savefig(out, format="svg", bbox_inches="tight")
    return out.getvalue()


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes)


def _arrays(pairs: list[AgePair]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([p.chronological_age for p in pairs], dtype=float),
        np.array([p.xray_age for p in pairs], dtype=float),
    )


def scatter(models: list[Validation]) -> bytes:
    v = models[0]
    fig, ax = _figure(5, 5, v)
    real, xray = _arrays(v.pairs(rolling=False))
    lo, hi = v.card.age_range
    ax.plot([lo, hi], [lo, hi], color="#888", lw=1, label="identity")
    if len(real):
        ax.scatter(real, xray, s=12, alpha=0.6, label=f"{len(real)} patients")
    else:
        _empty(ax, "reported images with a known age")
    ax.set(xlabel="chronological age (years)", ylabel="X-ray age (years)",
           title="X-ray age against chronological age")  # fmt: skip
    ax.legend(loc="upper left")
    return _svg(fig)


def bland_altman(models: list[Validation]) -> bytes:
    v = models[0]
    fig, ax = _figure(6, 4, v)
    real, xray = _arrays(v.pairs(rolling=False))
    if len(real) > 1:
        mean, diff = (real + xray) / 2, xray - real
        bias, spread = diff.mean(), 1.96 * diff.std(ddof=1)
        ax.scatter(mean, diff, s=12, alpha=0.6)
        for y, style, label in ((bias, "-", f"bias {bias:+.2f}"),
                                (bias - spread, "--", f"{bias - spread:+.2f}"),
                                (bias + spread, "--", f"{bias + spread:+.2f}")):  # fmt: skip
            ax.axhline(y, color="#c33", ls=style, lw=1)
            ax.annotate(label, (1, y), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", xytext=(-6, 3), textcoords="offset points",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8,
                              "pad": 1})  # fmt: skip
        ax.margins(y=0.15)  # the limits' labels clear of the frame
    else:
        _empty(ax, "two reported images with a known age")
    ax.set(xlabel="mean of X-ray and chronological age (years)",
           ylabel="X-ray minus chronological age (years)", title="Bland-Altman")  # fmt: skip
    return _svg(fig)


def gaps(models: list[Validation]) -> bytes:
    v = models[0]
    fig, ax = _figure(6, 4, v)
    real, xray = _arrays(v.pairs(rolling=False))
    if len(real):
        ax.hist(xray - real, bins=min(30, max(5, len(real) // 5)), color="#4a9be0")
        ax.axvline(0, color="#888", lw=1)
    else:
        _empty(ax, "age gaps")
    ax.set(xlabel="age gap: X-ray minus chronological age (years)", ylabel="images",
           title="Age-gap distribution")  # fmt: skip
    return _svg(fig)


def per_day(db: Database) -> bytes:
    fig, ax = _figure(8, 4)
    since = dt.datetime.combine(utcnow().date() - dt.timedelta(days=DAYS - 1), dt.time(), dt.UTC)
    with db.session() as s:
        rows = instances_per_day(s, since)
    today = utcnow().date()
    days = [today - dt.timedelta(days=n) for n in range(DAYS - 1, -1, -1)]
    counts: dict[InstanceState, dict[dt.date, int]] = defaultdict(dict)
    for d, state, n in rows:
        counts[state][d] = n
    bottom = np.zeros(len(days))
    for state, colour in COLOURS.items():
        if state in counts:
            heights = np.array([counts[state].get(d, 0) for d in days])
            ax.bar(days, heights, width=0.8, bottom=bottom, color=colour, label=state.value)
            bottom += heights
    if not rows:
        _empty(ax, f"images in the last {DAYS} days")
    else:
        ax.legend(fontsize="small")
    locator = AutoDateLocator(minticks=4, maxticks=8)  # a date label every few days, not 30
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # images come whole
    ax.set(ylabel="images (state now)", title=f"Images per day, last {DAYS} days (UTC)")
    return _svg(fig)


def agreement(models: list[Validation]) -> bytes:
    live = models[0]
    fig, ax = _figure(8, 4, live)
    drawn = False
    for n, v in enumerate(models):
        months = v.figures("month")
        if not months:
            continue
        drawn = True
        x = [m.period for m in months]
        who = f"{v.card.name}{'' if n == 0 else ' (shadow)'}" if len(models) > 1 else ""
        # Large filled MAE markers under small hollow bias ones: both show when they are equal.
        line = ax.plot(x, [m.mae for m in months], "o-", markersize=10 - 2 * n,
                       label=f"MAE {who}".strip(), zorder=2)  # fmt: skip
        ax.plot(x, [m.bias for m in months], "s--", markersize=5, fillstyle="none",
                markeredgewidth=1.5, label=f"bias {who}".strip(), zorder=3,
                color=line[0].get_color())  # fmt: skip
    if drawn:
        if live.card.reference_mae is not None:
            ax.axhline(live.card.reference_mae, color="#888", lw=1,
                       label=f"stated MAE {live.card.reference_mae:g}")  # fmt: skip
        ax.axhline(0, color="#ccc", lw=1)
        ax.legend(fontsize="small")
    else:
        _empty(ax, "months with reported images of a known age")
    ax.set(ylabel="years", title="Agreement per month (MAE and bias)")
    return _svg(fig)


PLOTS: dict[str, Callable[[list[Validation]], bytes]] = {
    "scatter": scatter,
    "bland-altman": bland_altman,
    "gaps": gaps,
    "agreement": agreement,
}
