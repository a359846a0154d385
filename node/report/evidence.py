"""The source radiograph's header as highdicom can copy it into the node's own objects.

Modalities do send non-conformant headers, and a report is still owed; highdicom's
constructors (rightly) validate what they copy, so the header is made acceptable first, and
the Specific Character Set is put back afterwards so that names keep their original bytes.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.valuerep import DA

from node.dicom.header import is_age_string

# Patient and study attributes of Type 2 that highdicom reads from the evidence unconditionally;
# a non-conformant source may lack them, and the SR then carries them empty (PS3.3 C.7.1.1).
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
           "StudyID", "StudyDate", "StudyTime")  # fmt: skip


def _is_date(value: object) -> bool:
    try:
        return bool(DA(value))
    except ValueError:
        return False


# The longest value a report copies: LT's maximum (PS3.5 6.2), 10240 characters. A longer one
# (a 60 MB Patient Comments was sent) is no attribute a report needs, and is left out.
MAX_COPIED_BYTES = 10240


def _copyable(item: object) -> bool:
    length = getattr(item, "length", None)  # an element not decoded yet: its length as sent
    return length is None or length <= MAX_COPIED_BYTES


def usable_header(source: Dataset) -> Dataset:
    """Missing Type 2 attributes added empty, invalid dates emptied, a Patient's Age that is not
    an AS value ("062") left out, of several Patient's Names (VM 1, yet seen) the first, and
    values longer than :data:`MAX_COPIED_BYTES` left out."""
    # A new mapping of the same elements, still undecoded: copy() would share the source's dict,
    # and iterating a Dataset (rather than its keys) would decode every element.
    evidence = Dataset(
        {tag: item for tag in source.keys() if _copyable(item := source.get_item(tag))}  # noqa: SIM118
    )
    if "PatientAge" in evidence and not is_age_string(evidence.PatientAge):
        del evidence.PatientAge
    if evidence.get("PatientName") is not None and evidence["PatientName"].VM > 1:
        evidence.PatientName = evidence.PatientName[0]  # PN is VM 1: the first name given
    for keyword in _TYPE_2:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    for keyword in ("PatientBirthDate", "StudyDate"):
        if evidence[keyword].value and not _is_date(evidence[keyword].value):
            setattr(evidence, keyword, None)
    return evidence


def character_set(source: Dataset) -> object:
    """The source's Specific Character Set in a form highdicom accepts: a leading empty value
    (the default repertoire, as in ``\\ISO 2022 IR 87``) spelled ``ISO 2022 IR 6``."""
    value = source.get("SpecificCharacterSet")
    if value is None or isinstance(value, str):
        return value
    return [v or "ISO 2022 IR 6" for v in value]


def keep_character_set(made: Dataset, source: Dataset) -> None:
    """Give ``made`` the source's own Specific Character Set: pydicom re-encodes a name only
    when the character set differs, so a Japanese name in ISO 2022 escapes stays byte for byte
    what the modality sent."""
    if "SpecificCharacterSet" in source:
        made.SpecificCharacterSet = source.SpecificCharacterSet
