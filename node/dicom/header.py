"""Reading a received header, defensively, in one place: the receiver, the gate, inference and
the reports all read through it.

Senders' headers break the standard in every way seen (values a VR cannot hold, dates that are
not dates, ages without a unit, deflated streams that claim gigabytes, sequences hundreds of
levels deep). Each reader here says what it does with such a value: None, a named
:class:`Unreadable`, or a :class:`TooLarge` bound.
"""

from __future__ import annotations

import datetime as dt
import re
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.uid import UID
from pydicom.valuerep import TM, VR
from pydicom.values import convert_SQ

# -- values ------------------------------------------------------------------------------------


class Unreadable(ValueError):
    """A header value that is needed cannot be read as its VR says."""

    def __init__(self, keyword: str, value: object) -> None:
        super().__init__(f"{keyword} cannot be read ({str(value)[:32]!r})")


def value(ds: Dataset, keyword: str, default: object = "") -> object:
    """``ds.get``, with a value pydicom cannot convert raised as :class:`Unreadable`."""
    try:
        return ds.get(keyword, default)
    except Exception as e:  # pydicom's conversions raise many kinds
        raise Unreadable(keyword, getattr(ds.get_item(keyword), "value", "?")) from e


def integer(ds: Dataset, keyword: str) -> int:
    """An IS/US value, 1 when absent (the counts the gate reads); :class:`Unreadable` else."""
    found = value(ds, keyword, 1) or 1
    try:
        return int(found)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise Unreadable(keyword, found) from None


def text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    """The value as text cut to ``limit`` (a column's width), None when absent or unreadable:
    what the node records of an instance never stops it being recorded."""
    try:
        found = ds.get(keyword)
    except Exception:  # a value pydicom cannot convert to its VR
        return None
    return str(found)[:limit] if found not in (None, "") else None


# -- dates and ages ----------------------------------------------------------------------------

# PS3.5 6.2 AS: nnnD, nnnW, nnnM or nnnY. A value without its unit ("062") is ambiguous
# (years? months?) and is treated as unknown rather than guessed.
_AS = re.compile(r"^(\d{3})([DWMY])$")
_DAYS = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def parse_da(found: object) -> dt.date | None:
    """A DA value (PS3.5 6.2) as a date; None when absent or not a date."""
    try:
        return dt.datetime.strptime(str(found).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def study_datetime(
    ds: Dataset, dates: tuple[str, ...] = ("StudyDate",)
) -> dt.date | dt.datetime | None:
    """The study's date (the first of ``dates`` present) and, with Study Time, its time to the
    second; None when absent or not a date and time (what the EHR forms say of when)."""
    found = next((t for k in dates if (t := text(ds, k))), None)
    day = parse_da(found) if found else None
    if day is None:
        return None
    time = text(ds, "StudyTime")
    if not time:
        return day
    try:
        return dt.datetime.combine(day, TM(time).replace(microsecond=0))
    except ValueError:
        return None


def is_age_string(found: object) -> bool:
    """Whether ``found`` is a valid AS value (PS3.5 6.2), e.g. ``062Y``."""
    return bool(_AS.match(str(found or "").strip()))


def chronological_age(ds: Dataset) -> float | None:
    """Years at the time of the study, from PatientAge, else from PatientBirthDate and the
    study (or acquisition, or content) date; None when the header does not tell it."""
    m = _AS.match(str(ds.get("PatientAge", "") or "").strip())
    if m:
        return round(int(m.group(1)) * _DAYS[m.group(2)] / 365.25, 2)
    birth = parse_da(ds.get("PatientBirthDate", ""))
    when = next(
        (
            d
            for k in ("StudyDate", "AcquisitionDate", "ContentDate")
            if (d := parse_da(ds.get(k, "")))
        ),
        None,
    )
    if birth is None or when is None or when < birth:
        return None
    return round((when - birth).days / 365.25, 2)


# -- bounds on what a data set may make the node hold ------------------------------------------


class TooLarge(ValueError):
    """A data set past a bound: ``max_dataset_bytes`` once inflated, :data:`MAX_NESTING`."""


def inflate(source: BinaryIO, out: BinaryIO, ceiling: int) -> None:
    """A Deflated Explicit VR Little Endian data set (PS3.5 A.5: raw deflate, RFC 1951) from
    ``source`` inflated into ``out``, a megabyte at a time and never past ``ceiling``: a 1 MB
    stream can claim a GB, and neither is held in memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    while not inflater.eof:
        chunk = inflater.unconsumed_tail or source.read(1 << 20)
        if not chunk:  # cut short: what inflated is what there is, as pydicom would read it
            break
        part = inflater.decompress(chunk, 1 << 20)
        written += len(part)
        if written > ceiling:
            raise TooLarge(f"deflated data set inflates past {ceiling:,} bytes (max_dataset_bytes)")
        out.write(part)


# Sequence levels a received data set may nest (a TID 1500 SR needs about 6): pydicom reads a
# defined-length sequence lazily, one level at a time, each a copy of what it contains, so
# 250 levels around a radiograph's pixels grew a process past 3.5 GB when a report copied them.
MAX_NESTING = 16


def check_nesting(ds: Dataset, stream: BinaryIO, syntax: UID, depth: int = 0) -> None:
    """Read every sequence of ``ds`` to ``MAX_NESTING`` levels; TooLarge past it. A sequence
    that :func:`read_received` deferred is read from ``stream``, where it was received."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        vr = elem.VR or (dictionary_VR(tag) if dictionary_has_tag(tag) else None)
        if vr != VR.SQ:
            continue
        if depth >= MAX_NESTING:
            raise TooLarge(f"sequences nested deeper than {MAX_NESTING} levels")
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            stream.seek(elem.value_tell)
            items = convert_SQ(stream.read(elem.length), syntax.is_implicit_VR,
                               syntax.is_little_endian)  # fmt: skip
        else:
            items = ds[tag].value
        for item in items:
            check_nesting(item, stream, syntax, depth + 1)


def read_received(path: Path, ceiling: int) -> Dataset:
    """A received file's header (pynetdicom wrote it as the data set arrived), values over 4 KB
    deferred: the receiver needs attributes only, and reading the pixels of a large radiograph
    would cost a copy of them (inference decodes them from the stored file). Its sequences are
    read here, to their bounded depth: what is stored must be readable whole later. A deflated
    data set is inflated into a scratch file beside it, up to ``ceiling``."""
    meta = read_file_meta_info(path)
    syntax = UID(meta.TransferSyntaxUID)
    # Preamble, "DICM", the group length element (12 bytes), then the group it counts.
    start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    with path.open("rb") as received:
        received.seek(start)
        if not syntax.is_deflated:
            return _read(received, syntax)
        with tempfile.TemporaryFile(dir=path.parent) as inflated:
            inflate(received, inflated, ceiling)
            inflated.seek(0)
            return _read(inflated, syntax)


def _read(stream: BinaryIO, syntax: UID) -> Dataset:
    where = stream.tell()
    ds = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=4096)
    stream.seek(where)
    check_nesting(ds, stream, syntax)
    return ds
