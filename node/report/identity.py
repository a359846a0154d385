"""The node's own identity in what it writes: its Manufacturer and the SOP classes of its
reports. The gate is given :func:`is_own_output` so that the node never analyses its output."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from node.dicom.header import value

MANUFACTURER = "xrayage"
# What node/report writes. A radiograph that a modality happens to label "xrayage" is still a
# radiograph: the class and the Manufacturer together say the object is ours.
OWN_CLASSES = frozenset({Comprehensive3DSRStorage, SecondaryCaptureImageStorage})


def is_own_output(ds: Dataset) -> bool:
    """Whether ``ds`` is an SR or SC this node wrote (:class:`Unreadable` for a value that
    cannot be read)."""
    return str(value(ds, "SOPClassUID")) in OWN_CLASSES and (
        str(value(ds, "Manufacturer")) == MANUFACTURER
    )
