"""UIDs for the objects the node makes, derived from what they are about.

ARCHITECTURE.md: a report's UIDs derive deterministically from (source SOP Instance UID, model
identity), so a resend after a crash replaces rather than duplicates; different content (another
model) gets different UIDs. Each is a 2.25 UID (PS3.5 B.2) from a name-based UUID (RFC 4122
version 5, ISO/IEC 9834-8) in the node's own namespace. pydicom's ``generate_uid(prefix=None)``
would not do: it ignores ``entropy_srcs`` and returns a random UUID.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

NAMESPACE = uuid.UUID("8d6f1c2e-5b0a-4c8e-9d27-3f1a6b4e7c90")  # xrayage's, fixed forever


def derived_uid(role: str, *parts: str) -> UID:
    # NUL cannot occur in a UID or a hex digest, so the joined name is unambiguous.
    return UID(f"2.25.{uuid.uuid5(NAMESPACE, chr(0).join((role, *parts))).int}")


class ReportUIDs:
    """All UIDs of one report, from the source instance and the model's SHA-256."""

    def __init__(self, source_sop_instance_uid: str, model_sha256: str) -> None:
        key = (source_sop_instance_uid, model_sha256)
        self.sr_series = derived_uid("sr-series", *key)
        self.sr_instance = derived_uid("sr-instance", *key)
        self.sc_series = derived_uid("sc-series", *key)
        self.sc_instance = derived_uid("sc-instance", *key)
        self.tracking = derived_uid("tracking", *key)
        # Keys of the EHR forms of the result (file store, deliveries), not DICOM objects.
        self.observation = derived_uid("fhir-observation", *key)
        self.oru = derived_uid("hl7-oru", *key)


def device_uid(ae_title: str) -> str:
    """The node as an SR device observer: stable across restarts for one AE title."""
    return derived_uid("device", ae_title)
