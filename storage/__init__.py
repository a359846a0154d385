"""Persistent state of the node: tables, the job queue, the DICOM file store, the audit log.

Imports nothing from ``node`` or ``ai`` (see ARCHITECTURE.md).
"""

from storage.audit import record_event
from storage.db import Database
from storage.filestore import FileStore, InvalidUID, validate_uid
from storage.tables import (
    AuditEvent,
    Delivery,
    DeliveryKind,
    DeliveryState,
    Instance,
    InstanceState,
    Job,
    JobState,
    Result,
    utcnow,
)

__all__ = [
    "AuditEvent",
    "Database",
    "Delivery",
    "DeliveryKind",
    "DeliveryState",
    "FileStore",
    "Instance",
    "InstanceState",
    "InvalidUID",
    "Job",
    "JobState",
    "Result",
    "record_event",
    "utcnow",
    "validate_uid",
]
