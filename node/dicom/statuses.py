"""The DIMSE statuses the node answers and checks, named once, from pynetdicom's tables.

pynetdicom's ``Status`` holds Success, Pending, Cancel and Move Destination Unknown; the other
codes are taken from its per-service tables (``pynetdicom.status``), so a code that the
service does not define fails at import rather than going on the wire.
"""

from __future__ import annotations

from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    Status,
)


def _storage(code: int) -> int:
    """A C-STORE status of PS3.4 B.2.3 (or PS3.7 C, the general ones it allows)."""
    if code not in STORAGE_SERVICE_CLASS_STATUS:
        raise ImportError(f"0x{code:04X} is not a C-STORE status in pynetdicom's table")
    return code


SUCCESS = int(Status.SUCCESS)
CANCEL = int(Status.CANCEL)
# What the receiver answers (docstring of node/dicom/scp.py).
DUPLICATE_CONFLICT = _storage(0x0111)  # Duplicate SOP Instance: same UID, other content
OUT_OF_RESOURCES = _storage(0xA700)
DOES_NOT_MATCH = _storage(0xA900)
CANNOT_UNDERSTAND = _storage(0xC000)
# A C-STORE answered with one of these stored the object (Success, or a warning such as
# coercion, elements discarded, does not match): it must not be sent again.
STORED = frozenset(
    code
    for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
    if category in (STATUS_SUCCESS, STATUS_WARNING)
)
# A C-FIND match follows (Pending, or Pending with optional keys not supported).
MATCH_PENDING = frozenset(
    code
    for code, (category, _) in QR_FIND_SERVICE_CLASS_STATUS.items()
    if category == STATUS_PENDING
)
