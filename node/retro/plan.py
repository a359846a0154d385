"""The plan of a retro-scan: from what the archive answered (and what the node already holds) to
what to fetch, study by study. Pure functions of their arguments: no network, no database.

A study of which the node holds nothing, all of whose series are chest CR/DX, is wanted whole:
such studies are retrieved together, up to :data:`STUDIES_PER_RETRIEVE` in one STUDY-level
request with a list of UIDs (PS3.4 C.4.2.2.1), with no IMAGE-level query. A chest series of
such a study beside other series is retrieved at SERIES level. Otherwise the IMAGE level says
what is missing, retrieved at IMAGE level with a list of UIDs; a series the archive lists only
in part (its C-FIND result limit) is retrieved whole and the gate sorts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from node.retro.archive import MODALITIES, RETRIEVED_CLASSES

# Studies wanted whole that one STUDY-level retrieve asks for: one association from the archive
# for all of them (a C-MOVE), where one retrieve per study costs one each.
STUDIES_PER_RETRIEVE = 32


@dataclass(frozen=True, kw_only=True)
class SeriesPlan:
    """What a scan does with one series of the archive: fetch ``fetch`` by UID, or, where
    ``series_size`` is set, the whole series at SERIES level (at least that many instances);
    ``again``: instances another model reported, queued again from the stored file."""

    study_uid: str
    study_date: str | None
    series_uid: str
    fetch: list[str] = field(default_factory=list)
    already_done: int = 0
    again: list[int] = field(default_factory=list)
    series_size: int = 0
    listed: int | None = None  # a partial listing's length (the archive's result limit)

    @property
    def count(self) -> int:
        """Instances this plan fetches."""
        return self.series_size or len(self.fetch)


@dataclass(frozen=True, kw_only=True)
class SeriesToList:
    """A series whose instances must be listed (IMAGE level) before it can be planned."""

    series_uid: str
    size: int | None  # NumberOfSeriesRelatedInstances, when the archive gave it


@dataclass(frozen=True, kw_only=True)
class StudyOutline:
    """A study seen at SERIES level: the series fetched whole without listing them, those to
    list, and whether the whole study is wanted (then one STUDY-level retrieve fetches it)."""

    whole_series: list[SeriesPlan]
    to_list: list[SeriesToList]
    whole_study: bool

    @property
    def study_size(self) -> int:
        return sum(p.series_size for p in self.whole_series)


def outline_study(
    *,
    study_uid: str,
    study_date: str | None,
    series: list[Dataset],
    body_parts: set[str],
    known: bool,
) -> StudyOutline:
    """Which of a study's ``series`` (SERIES-level C-FIND answers) may hold frontal chest
    radiographs, and how to fetch them: a series with no body part is kept (the gate decides
    from the full header). ``known``: the node holds some instance of the study already, so
    nothing is fetched unlisted."""
    whole_series, to_list = [], []
    whole_study = not known and bool(series)
    for found in series:
        body_part = str(found.get("BodyPartExamined") or "").upper()
        if found.get("Modality") not in MODALITIES or (body_part and body_part not in body_parts):
            whole_study = False
            continue
        series_uid = str(found.SeriesInstanceUID)
        count = str(found.get("NumberOfSeriesRelatedInstances") or "").strip()  # optional
        size = int(count) if count.isdigit() else None
        if not known and size:
            # Every instance is wanted (nothing of the study is here, nothing can be fetched
            # twice): one SERIES-level retrieve, no IMAGE-level C-FIND.
            plan = SeriesPlan(
                study_uid=study_uid, study_date=study_date, series_uid=series_uid, series_size=size
            )
            whole_series.append(plan)
            continue
        whole_study = False
        to_list.append(SeriesToList(series_uid=series_uid, size=size))
    return StudyOutline(whole_series=whole_series, to_list=to_list, whole_study=whole_study)


def partial_listing(
    *,
    study_uid: str,
    study_date: str | None,
    series: SeriesToList,
    images: list[Dataset],
    complete: bool,
) -> SeriesPlan | None:
    """The plan of a series whose IMAGE-level listing is partial (the archive's result limit, or
    fewer than the series holds): retrieved whole, the gate sorting it. None when the listing
    is whole: the series is planned from its wanted instances (:func:`wanted_instances`)."""
    if complete and (series.size is None or len(images) >= series.size):
        return None
    return SeriesPlan(
        study_uid=study_uid, study_date=study_date, series_uid=series.series_uid,
        series_size=max(series.size or 0, len(images)), listed=len(images),
    )  # fmt: skip


def wanted_instances(images: list[Dataset]) -> list[str]:
    """The SOP Instance UIDs of a listing that the gate can pass (CR, DX For Presentation, or
    a class the archive did not say)."""
    return [
        str(i.SOPInstanceUID)
        for i in images
        if i.get("SOPClassUID") in (None, "", *RETRIEVED_CLASSES)
    ]
