"""The retro-scan's plan as pure functions: what to fetch from the archive's answers, with no
archive and no database."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage

from node.retro.plan import (
    SeriesToList,
    outline_study,
    partial_listing,
    wanted_instances,
)

CHEST = {"CHEST"}


def _series(uid: str, modality: str, body_part: str = "", count: str = "") -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = uid, modality, body_part
    ds.NumberOfSeriesRelatedInstances = count
    return ds


def _image(uid: str, sop_class: str | None) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = uid
    if sop_class is not None:
        ds.SOPClassUID = sop_class
    return ds


def test_a_study_the_node_lacks_with_chest_series_only_is_fetched_whole_unlisted() -> None:
    outline = outline_study(
        study_uid="1.1", study_date="20261110", known=False, body_parts=CHEST,
        series=[_series("1.1.1", "CR", "CHEST", "3"), _series("1.1.2", "DX", "", "2")],
    )  # fmt: skip
    assert outline.whole_study and outline.study_size == 5 and outline.to_list == []
    assert [(p.series_uid, p.series_size, p.count) for p in outline.whole_series] == [
        ("1.1.1", 3, 3),
        ("1.1.2", 2, 2),
    ]


def test_other_series_and_known_studies_are_listed_not_fetched_whole() -> None:
    beside_ct = outline_study(
        study_uid="1.2", study_date=None, known=False, body_parts=CHEST,
        series=[_series("1.2.1", "CR", "CHEST", "1"), _series("1.2.2", "CT", "CHEST", "90"),
                _series("1.2.3", "CR", "SKULL", "1")],
    )  # fmt: skip
    assert not beside_ct.whole_study  # the chest series alone is fetched, at SERIES level
    assert [p.series_uid for p in beside_ct.whole_series] == ["1.2.1"]
    known = outline_study(
        study_uid="1.3", study_date=None, known=True, body_parts=CHEST,
        series=[_series("1.3.1", "CR", "CHEST", "4"), _series("1.3.2", "DX", "CHEST")],
    )  # fmt: skip
    assert not known.whole_study and known.whole_series == []
    assert known.to_list == [SeriesToList(series_uid="1.3.1", size=4),
                             SeriesToList(series_uid="1.3.2", size=None)]  # fmt: skip


def test_a_partial_listing_fetches_the_series_whole_and_a_whole_one_is_planned_by_uid() -> None:
    images = [_image("9.1", ComputedRadiographyImageStorage), _image("9.2", None),
              _image("9.3", CTImageStorage)]  # fmt: skip
    series = SeriesToList(series_uid="1.4.1", size=5)
    cut = partial_listing(study_uid="1.4", study_date=None, series=series, images=images,
                          complete=True)  # fmt: skip
    assert cut is not None and (cut.series_size, cut.listed, cut.count) == (5, 3, 5)
    capped = partial_listing(
        study_uid="1.4", study_date=None, series=SeriesToList(series_uid="1.4.1", size=None),
        images=images, complete=False,
    )  # fmt: skip
    assert capped is not None and capped.series_size == 3
    whole = partial_listing(
        study_uid="1.4", study_date=None, series=SeriesToList(series_uid="1.4.1", size=3),
        images=images, complete=True,
    )  # fmt: skip
    assert whole is None
    assert wanted_instances(images) == ["9.1", "9.2"]  # a CT is never fetched
