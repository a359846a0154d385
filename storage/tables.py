"""SQLAlchemy 2 tables: one row per received instance, its inference job, its result and deliveries.

Instance states follow ARCHITECTURE.md::

    received -> skipped(reason) | queued -> inferred -> reported -> delivered
    failed(reason, attempts) reachable from each step
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        return value.astimezone(dt.UTC) if value is not None and value.tzinfo else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class InstanceState(enum.StrEnum):
    RECEIVED = "received"
    SKIPPED = "skipped"
    QUEUED = "queued"
    INFERRED = "inferred"
    REPORTED = "reported"
    DELIVERED = "delivered"
    FAILED = "failed"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its model was retired before it ran


class ModelRole(enum.StrEnum):
    """A model's part in the node: ``live`` makes the reports; a ``shadow`` runs on the same
    images, its results stored and never sent; ``retired`` runs no more."""

    LIVE = "live"
    SHADOW = "shadow"
    RETIRED = "retired"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryKind(enum.StrEnum):
    """What a delivery carries; a destination lists the kinds it takes."""

    SR = "sr"  # the TID 1500 Structured Report
    SC = "sc"  # the Secondary Capture summary image
    OBSERVATION = "observation"  # the FHIR R4 Observation, for the EHR
    ORU = "oru"  # the HL7 v2.5.1 ORU^R01 message, for the EHR


def _enum(cls: type[enum.Enum]) -> Enum:
    # Plain strings in the database: readable in psql/sqlite3 and free of native enum migrations.
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Instance(Base):
    """A received DICOM instance, identified by its SOP Instance UID."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    # What a results export describes an image by (read at receipt, as sent).
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model_name: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    # "push" (routed to the node) or "retro" (fetched by a retro-scan's C-MOVE or C-GET)
    origin: Mapped[str] = mapped_column(String(8), default="push")
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="instance")
    results: Mapped[list[Result]] = relationship(back_populates="instance")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="instance")


class Job(Base):
    """One inference job; claimed by a worker under a lease that expires if the worker dies."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState), index=True)
    # The model that is to analyse the image (its weights' SHA-256, as results name it); None:
    # queued while no model was configured, taken by the first that claims it.
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    # Claimed in this order: 0 for received images (live and shadow jobs alike), 1 for a
    # shadow model's backfill of past images, which waits for live traffic.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="jobs")


class Result(Base):
    """The model's answer for one instance, and the report objects built from it."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("instance_id", "model_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    xray_age: Mapped[float] = mapped_column(Float)
    chronological_age: Mapped[float | None] = mapped_column(Float)
    # X-ray age minus chronological age, and less the card's expected gap at that age: the
    # values the SR carries.
    age_gap: Mapped[float | None] = mapped_column(Float)
    corrected_age_gap: Mapped[float | None] = mapped_column(Float)
    untrained: Mapped[bool] = mapped_column(Boolean, default=False)  # the card says so
    reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_path: Mapped[str | None] = mapped_column(Text)
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sc_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="results")


class Model(Base):
    """A model the node knows: its weights (by path and SHA-256), its card as JSON (storage
    reads no cards: :mod:`node.models` does), and its role, changed only by audited commands
    (``xrayage model``) or by ``[model] weights`` naming other weights at start."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))  # what results call it (model_name)
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    card_json: Mapped[str] = mapped_column(Text)
    role: Mapped[ModelRole] = mapped_column(_enum(ModelRole), index=True)
    since: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)  # in this role
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When ``[model] weights`` last named these weights at a start: the config names the live
    # model when it changes, and a promotion made since then stands until it does.
    configured_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Delivery(Base):
    """One report object to one destination; retried with back-off until delivered or failed."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[DeliveryKind] = mapped_column(_enum(DeliveryKind))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid of the claiming process
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    instance: Mapped[Instance] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    """Append-only audit log: rows are only ever inserted; the database itself refuses an UPDATE
    (a trigger made by the initial migration), and the only DELETE is the retention purge, which
    is audited in turn.

    Queries filter on one identifier and page newest first by ``id``, so each filter column
    leads an index that ends in ``id``.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_patient", "patient_id", "id"),
        Index("ix_audit_study", "study_instance_uid", "id"),
        Index("ix_audit_accession", "accession_number", "id"),
        Index("ix_audit_sop", "sop_instance_uid", "id"),
        Index("ix_audit_event", "event", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


class ScanState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # window ended or nightly image budget spent: the next night resumes it
    FINISHED = "finished"
    FAILED = "failed"


class RetroScan(Base):
    """One retro-scan of the archive over a study-date range; its studies are the cursor."""

    __tablename__ = "retro_scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))  # "schedule" or "cli:<user>"
    date_from: Mapped[dt.date] = mapped_column(Date)
    date_to: Mapped[dt.date] = mapped_column(Date)
    model_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[ScanState] = mapped_column(_enum(ScanState), index=True)
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid while running
    planned: Mapped[bool] = mapped_column(default=False)  # studies found and listed below
    fetched: Mapped[int] = mapped_column(Integer, default=0)
    already_done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    studies: Mapped[list[RetroStudy]] = relationship(
        back_populates="scan", order_by="RetroStudy.id"
    )


class RetroStudy(Base):
    """A study a scan found; ``done`` once its instances were fetched or found already done."""

    __tablename__ = "retro_studies"
    __table_args__ = (UniqueConstraint("scan_id", "study_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("retro_scans.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    done: Mapped[bool] = mapped_column(default=False)
    fetched: Mapped[int] = mapped_column(Integer, default=0)
    already_done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(Text)

    scan: Mapped[RetroScan] = relationship(back_populates="studies")


class ConfigVersion(Base):
    """The settings and model a node started with, kept when they change (audited with a diff)."""

    __tablename__ = "config_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sha256: Mapped[str] = mapped_column(String(64))
    settings_json: Mapped[str] = mapped_column(Text)


class ExportCursor(Base):
    """How far an exporter has sent the audit log (the last event ID it delivered)."""

    __tablename__ = "export_cursors"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
