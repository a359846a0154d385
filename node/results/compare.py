"""Two models on the same images: the paired comparison that a promotion rests on.

On the images both models analysed (each within its card's age range, chronological age known),
the difference of absolute errors, candidate minus reference, image by image: its mean (negative:
the candidate is closer to the chronological ages), with a 95 % percentile interval from a
bootstrap that resamples patients, each with all of its images, since a patient's images share
their error (Field and Welsh 2007, the cluster bootstrap). The paired design removes what the
images themselves contribute to both models' errors, so far fewer images show a difference than
two separate MAEs would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from storage.results import AgePair

RESAMPLES = 2000


@dataclass(frozen=True)
class Comparison:
    reference: str  # the model compared against (the live one, for a promotion)
    candidate: str
    images: int
    patients: int
    mae_reference: float | None
    mae_candidate: float | None
    difference: float | None  # mean |error| of the candidate minus the reference's, years
    ci95: tuple[float, float] | None  # by patient bootstrap; None below two patients

    @property
    def worse(self) -> bool:
        """The candidate's errors on these images are larger on average."""
        return self.difference is not None and self.difference > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self) -> str:
        if self.difference is None or self.mae_reference is None or self.mae_candidate is None:
            return f"{self.candidate} vs {self.reference}: no image analysed by both"
        ci = (
            f" (95 % CI {self.ci95[0]:+.2f} to {self.ci95[1]:+.2f}, bootstrap by patient)"
            if self.ci95 else ""
        )  # fmt: skip
        return (
            f"{self.candidate} vs {self.reference} on the same {self.images} images of "
            f"{self.patients} patients: MAE {self.mae_candidate:.2f} vs {self.mae_reference:.2f} "
            f"years, difference {self.difference:+.2f}{ci}"
        )


def compare(
    reference: str,
    candidate: str,
    ref_pairs: list[AgePair],
    cand_pairs: list[AgePair],
    seed: int = 0,
) -> Comparison:
    """The paired comparison of ``candidate`` against ``reference`` on the images both have."""
    theirs = {p.instance_id: p for p in ref_pairs if p.instance_id is not None}
    both = [(theirs[p.instance_id], p) for p in cand_pairs if p.instance_id in theirs]
    if not both:
        return Comparison(reference, candidate, 0, 0, None, None, None, None)
    ref_err = np.array([abs(r.xray_age - r.chronological_age) for r, _ in both])
    cand_err = np.array([abs(c.xray_age - c.chronological_age) for _, c in both])
    diff = cand_err - ref_err
    keys = [r.patient_id or f"unknown {i}" for i, (r, _) in enumerate(both)]
    patients = sorted(set(keys))
    index = {k: n for n, k in enumerate(patients)}
    cluster = np.array([index[k] for k in keys])
    sums = np.bincount(cluster, weights=diff, minlength=len(patients))
    counts = np.bincount(cluster, minlength=len(patients)).astype(float)
    ci = None
    if len(patients) > 1:
        drawn = np.random.default_rng(seed).integers(0, len(patients), (RESAMPLES, len(patients)))
        means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        ci = (float(low), float(high))
    return Comparison(
        reference, candidate, len(both), len(patients), float(ref_err.mean()),
        float(cand_err.mean()), float(diff.mean()), ci,
    )  # fmt: skip
