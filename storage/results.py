"""Recording what the model said and what was built from it: the results row, the report
objects and their deliveries, with the instance's state changes (``inferred``, ``reported``).

Both are idempotent per (instance, model SHA-256) and per (object, destination): a job done
again after a crash replaces its row and adds no second delivery.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.deliveries import StoredObject, add_deliveries
from storage.lifecycle import change_state
from storage.tables import Delivery, DeliveryKind, Instance, InstanceState, Result, utcnow


@dataclass(frozen=True)
class ModelIdentity:
    """Which model gave an age: the name, version and weights SHA-256 of its card."""

    name: str
    version: str
    sha256: str
    untrained: bool = False


def _result(session: Session, instance: Instance, sha256: str) -> Result | None:
    return session.scalar(
        select(Result).where(Result.instance_id == instance.id, Result.model_sha256 == sha256)
    )


def stored_age(session: Session, instance_id: int, model_sha256: str) -> float | None:
    """The X-ray age this model already gave the instance (committed when it became
    ``inferred``), or None."""
    return session.scalar(
        select(Result.xray_age).where(
            Result.instance_id == instance_id, Result.model_sha256 == model_sha256
        )
    )


@dataclass(frozen=True)
class Ages:
    """What the model said of one image, with the chronological age and the two gaps, as the
    SR carries them (``node.report.findings``)."""

    xray_age: float
    chronological_age: float | None
    age_gap: float | None
    corrected_age_gap: float | None


def record_inferred(
    session: Session, instance: Instance, model: ModelIdentity, ages: Ages, live: bool = True
) -> None:
    """Store the model's output and, for the ``live`` model, make the instance ``inferred``
    (audited once per model): from here on a crash does not run the model again. Reports of an
    earlier run are dropped from the row; they are built again from this age. A shadow model's
    output is audited as such and leaves the instance's state alone."""
    result = _result(session, instance, model.sha256)
    if result is None:
        result = Result(
            instance_id=instance.id,
            model_sha256=model.sha256,
            model_name=model.name,
            model_version=model.version,
            xray_age=ages.xray_age,
        )
        session.add(result)
    result.xray_age = ages.xray_age
    result.chronological_age = ages.chronological_age
    result.age_gap, result.corrected_age_gap = ages.age_gap, ages.corrected_age_gap
    result.untrained = model.untrained
    result.reported_at = None
    result.sr_sop_instance_uid = result.sr_path = None
    result.sc_sop_instance_uid = result.sc_path = None
    said = f"x-ray age {ages.xray_age} a, model {model.name} {model.version} sha256 {model.sha256}"
    if not live:
        record_event(session, "inferred", instance=instance, detail=f"shadow (not sent): {said}")
    elif instance.state != InstanceState.INFERRED:  # by an earlier model: already audited
        change_state(session, instance, InstanceState.INFERRED, detail=said)


def record_reports(
    session: Session,
    instance: Instance,
    model_sha256: str,
    objects: list[StoredObject],
    destinations: Mapping[str, frozenset[DeliveryKind]],
    routing: str = "",
) -> None:
    """Attach the stored SR (and SC) to the instance's result, make it ``reported`` (audited
    with ``routing``, where its objects go and why not elsewhere) and add a pending delivery of
    each object to each destination that takes it (:func:`storage.deliveries.add_deliveries`)."""
    result = _result(session, instance, model_sha256)
    assert result is not None, "a report follows its result"
    for obj in objects:
        if obj.kind == DeliveryKind.SR:
            result.sr_sop_instance_uid, result.sr_path = obj.sop_instance_uid, obj.path
        elif obj.kind == DeliveryKind.SC:
            result.sc_sop_instance_uid, result.sc_path = obj.sop_instance_uid, obj.path
    result.reported_at = utcnow()
    change_state(
        session,
        instance,
        InstanceState.REPORTED,
        detail=f"SR {result.sr_sop_instance_uid}; x-ray age {result.xray_age} a"
        + (f"; to {routing}" if routing else ""),
    )
    add_deliveries(session, instance, objects, destinations)


# The columns of a results export, in this order (README "Results"): scripts rely on it.
RESULT_COLUMNS = (
    "patient_id",
    "patient_sex",
    "study_date",
    "study_instance_uid",
    "sop_instance_uid",
    "accession_number",
    "manufacturer",
    "manufacturer_model_name",
    "view_position",
    "xray_age",
    "chronological_age",
    "age_gap",
    "corrected_age_gap",
    "model_name",
    "model_version",
    "weights_sha256",
    "state",
    "reported_at",
    "untrained",
    "deliveries",
)


@dataclass(frozen=True)
class ResultsQuery:
    """A filter on the results; every field narrows it. ``since`` and ``until`` bound when the
    age was estimated; ``before_id`` pages backwards (the ``id`` of the last row seen)."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    state: InstanceState | None = None
    patient_id: str | None = None
    model: str | None = None
    limit: int = 100
    before_id: int | None = None


@dataclass(frozen=True)
class ResultRow:
    id: int
    values: dict[str, Any]  # RESULT_COLUMNS, as stored (dates and times as such)


def earlier_ages(
    session: Session, instance_id: int, model_sha256: str, limit: int = 100
) -> list[tuple[dt.date, float, float | None]]:
    """(study date, X-ray age, chronological age) of the patient's other images aged by this
    model, dated on or before this one's, oldest first (the newest ``limit``)."""
    inst = session.get_one(Instance, instance_id)
    if not inst.patient_id or inst.study_date is None:
        return []
    rows = session.execute(
        select(Instance.study_date, Result.xray_age, Result.chronological_age)
        .join(Result, Result.instance_id == Instance.id)
        .where(
            Instance.patient_id == inst.patient_id,
            Instance.id != inst.id,
            Instance.study_date <= inst.study_date,
            Result.model_sha256 == model_sha256,
        )
        .order_by(desc(Instance.study_date), desc(Instance.id))
        .limit(limit)
    ).all()
    return [(d, age, chron) for d, age, chron in reversed(rows)]


def patient_ages(
    session: Session, patients: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], list[tuple[dt.date, float]]]:
    """(study date, X-ray age) of every dated image of each (patient ID, model SHA-256), for
    the aging rates of exported rows."""
    wanted = set(patients)
    found: dict[tuple[str, str], list[tuple[dt.date, float]]] = {k: [] for k in wanted}
    ids = sorted({pid for pid, _ in wanted if pid})
    for start in range(0, len(ids), 500):  # well under every database's bound on parameters
        for pid, sha, when, age in session.execute(
            select(Instance.patient_id, Result.model_sha256, Instance.study_date, Result.xray_age)
            .join(Result, Result.instance_id == Instance.id)
            .where(Instance.patient_id.in_(ids[start : start + 500]))
            .where(Instance.study_date.is_not(None))
        ):
            if (pid, sha) in found:
                found[(pid, sha)].append((when, age))
    return found


def state_counts(session: Session) -> dict[InstanceState, int]:
    """How many instances are in each state (the status page, the metrics)."""
    return dict(
        session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class InstanceRow:
    """An instance as the status page lists it, with its newest X-ray age."""

    id: int
    values: dict[str, Any]


def instance_page(
    session: Session, state: InstanceState | None, limit: int, before_id: int | None
) -> list[InstanceRow]:
    """Instances newest first, paged backwards from ``before_id``."""
    stmt = select(Instance)
    if state is not None:
        stmt = stmt.where(Instance.state == state)
    if before_id is not None:
        stmt = stmt.where(Instance.id < before_id)
    rows = list(session.scalars(stmt.order_by(desc(Instance.id)).limit(limit)))
    ages: dict[int, tuple[float, bool]] = {}  # the newest reported result, else the newest
    for instance_id, age, untrained in session.execute(
        select(Result.instance_id, Result.xray_age, Result.untrained)
        .where(Result.instance_id.in_([i.id for i in rows]))
        .order_by(Result.reported_at.is_not(None), Result.id)
    ):
        ages[instance_id] = (age, untrained)
    return [InstanceRow(i.id, _instance(i, *ages.get(i.id, (None, False)))) for i in rows]


def _instance(inst: Instance, xray_age: float | None, untrained: bool) -> dict[str, Any]:
    return {
        "id": inst.id,
        "sop_instance_uid": inst.sop_instance_uid,
        "study_instance_uid": inst.study_instance_uid,
        "patient_id": inst.patient_id,
        "accession_number": inst.accession_number,
        "modality": inst.modality,
        "origin": inst.origin,
        "state": inst.state.value,
        "xray_age": xray_age,
        "untrained": untrained,
        "reason": inst.reason,
        "received_at": inst.received_at.isoformat().replace("+00:00", "Z"),
        "updated_at": inst.updated_at.isoformat().replace("+00:00", "Z"),
    }


def query_results(session: Session, q: ResultsQuery) -> list[ResultRow]:
    """One row per (analysed instance, model), newest first."""
    stmt = select(Result, Instance).join(Instance, Result.instance_id == Instance.id)
    if q.since is not None:
        stmt = stmt.where(Result.created_at >= q.since)
    if q.until is not None:
        stmt = stmt.where(Result.created_at < q.until)
    if q.state is not None:
        stmt = stmt.where(Instance.state == q.state)
    if q.patient_id is not None:
        stmt = stmt.where(Instance.patient_id == q.patient_id)
    if q.model is not None:
        stmt = stmt.where(Result.model_name == q.model)
    if q.before_id is not None:
        stmt = stmt.where(Result.id < q.before_id)
    rows = session.execute(stmt.order_by(desc(Result.id)).limit(q.limit)).all()
    sent = _deliveries(session, [inst.id for result, inst in rows if result.reported_at])
    return [
        ResultRow(
            result.id,
            _values(result, inst)
            | {"deliveries": sent.get(inst.id, "") if result.reported_at else ""},
        )
        for result, inst in rows
    ]


def _deliveries(session: Session, instance_ids: list[int]) -> dict[int, str]:
    """Each instance's deliveries, one ``destination kind state`` clause each: where the
    report went, in every form (SR, SC, Observation, ORU), and how far it got."""
    out: dict[int, list[str]] = {}
    for instance_id, name, kind, state in session.execute(
        select(Delivery.instance_id, Delivery.destination, Delivery.kind, Delivery.state)
        .where(Delivery.instance_id.in_(instance_ids))
        .order_by(Delivery.id)
    ):
        out.setdefault(instance_id, []).append(f"{name} {kind.value} {state.value}")
    return {i: "; ".join(clauses) for i, clauses in out.items()}


def _values(result: Result, inst: Instance) -> dict[str, Any]:
    return {
        "patient_id": inst.patient_id,
        "patient_sex": inst.patient_sex,
        "study_date": inst.study_date,
        "study_instance_uid": inst.study_instance_uid,
        "sop_instance_uid": inst.sop_instance_uid,
        "accession_number": inst.accession_number,
        "manufacturer": inst.manufacturer,
        "manufacturer_model_name": inst.manufacturer_model_name,
        "view_position": inst.view_position,
        "xray_age": result.xray_age,
        "chronological_age": result.chronological_age,
        "age_gap": result.age_gap,
        "corrected_age_gap": result.corrected_age_gap,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "weights_sha256": result.model_sha256,
        "state": inst.state.value,
        "reported_at": result.reported_at,
        "untrained": result.untrained,
    }


@dataclass(frozen=True)
class AgePair:
    """One analysed image with a known chronological age, for agreement figures."""

    xray_age: float
    chronological_age: float
    manufacturer: str | None
    manufacturer_model_name: str | None
    view_position: str | None
    at: dt.datetime  # when the age was estimated
    patient_id: str | None
    study_date: dt.date | None
    instance_id: int | None = None  # pairs one model's image with another's


def age_pairs(
    session: Session,
    model_sha256: str,
    age_range: tuple[float, float],
    since: dt.datetime | None = None,
) -> list[AgePair]:
    """The reported images of this model whose chronological age is known and within
    ``age_range`` (the model's validated range), oldest first."""
    low, high = age_range
    stmt = (
        select(Result, Instance)
        .join(Instance, Result.instance_id == Instance.id)
        .where(
            Result.model_sha256 == model_sha256,
            Result.chronological_age >= low,
            Result.chronological_age <= high,
            Instance.state.in_((InstanceState.REPORTED, InstanceState.DELIVERED)),
        )
        .order_by(Result.id)
    )
    if since is not None:
        stmt = stmt.where(Result.created_at >= since)
    return [
        AgePair(
            r.xray_age,
            r.chronological_age,  # type: ignore[arg-type]
            i.manufacturer,
            i.manufacturer_model_name,
            i.view_position,
            r.created_at,
            i.patient_id,
            i.study_date,
            i.id,
        )
        for r, i in session.execute(stmt)
    ]


def instances_per_day(
    session: Session, since: dt.datetime
) -> list[tuple[dt.date, InstanceState, int]]:
    """How many instances were received each UTC day since ``since``, by their state now."""
    day = func.date(Instance.received_at)
    rows = session.execute(
        select(day, Instance.state, func.count())
        .where(Instance.received_at >= since)
        .group_by(day, Instance.state)
        .order_by(day)
    ).all()
    return [(d if isinstance(d, dt.date) else dt.date.fromisoformat(d), st, n) for d, st, n in rows]
