"""UIDs for the objects the node makes, derived from what they are about.

ARCHITECTURE.md: a report's UIDs derive deterministically from (source SOP Instance UID, model
identity), so a resend after a crash replaces rather than duplicates; different content (another
model) gets different UIDs. ``generate_uid(prefix=None, ...)`` gives a 2.25 UUID-derived UID
(PS3.5 B.2) from a SHA-512 of the entropy sources.
"""

from __future__ import annotations

from pydicom.uid import generate_uid


def derived_uid(role: str, *parts: str) -> str:
    return str(generate_uid(prefix=None, entropy_srcs=["xrayage", role, *parts]))


class ReportUIDs:
    """All UIDs of one report, from the source instance and the model's SHA-256."""

    def __init__(self, source_sop_instance_uid: str, model_sha256: str) -> None:
        key = (source_sop_instance_uid, model_sha256)
        self.sr_series = derived_uid("sr-series", *key)
        self.sr_instance = derived_uid("sr-instance", *key)
        self.sc_series = derived_uid("sc-series", *key)
        self.sc_instance = derived_uid("sc-instance", *key)
        self.tracking = derived_uid("tracking", *key)


def device_uid(ae_title: str) -> str:
    """The node as an SR device observer: stable across restarts for one AE title."""
    return derived_uid("device", ae_title)
