"""Recording what the model said and what was built from it: the results row, the report
objects and their deliveries, with the instance's state changes (``inferred``, ``reported``).

Both are idempotent per (instance, model SHA-256) and per (object, destination): a job done
again after a crash replaces its row and adds no second delivery.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.lifecycle import change_state
from storage.tables import Delivery, DeliveryState, Instance, InstanceState, Result


@dataclass(frozen=True)
class ModelIdentity:
    """Which model gave an age: the name, version and weights SHA-256 of its card."""

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class StoredObject:
    """A report object in the file store: its SOP Instance UID and its path."""

    sop_instance_uid: str
    path: str


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


def record_inferred(
    session: Session,
    instance: Instance,
    model: ModelIdentity,
    xray_age: float,
    chronological_age: float | None,
) -> None:
    """Store the model's output and make the instance ``inferred`` (audited once per model):
    from here on a crash does not run the model again. Reports of an earlier run are dropped
    from the row; they are built again from this age."""
    result = _result(session, instance, model.sha256)
    if result is None:
        result = Result(
            instance_id=instance.id,
            model_sha256=model.sha256,
            model_name=model.name,
            model_version=model.version,
            xray_age=xray_age,
        )
        session.add(result)
    result.xray_age = xray_age
    result.chronological_age = chronological_age
    result.sr_sop_instance_uid = result.sr_path = None
    result.sc_sop_instance_uid = result.sc_path = None
    if instance.state != InstanceState.INFERRED:  # by an earlier model: already audited
        change_state(
            session,
            instance,
            InstanceState.INFERRED,
            detail=f"x-ray age {xray_age} a, model {model.name} {model.version} "
            f"sha256 {model.sha256}",
        )


def record_reports(
    session: Session,
    instance: Instance,
    model_sha256: str,
    sr: StoredObject,
    sc: StoredObject | None,
    destinations: Iterable[str],
) -> None:
    """Attach the stored SR (and SC) to the instance's result, make it ``reported`` and add a
    pending delivery of each object to each destination that has none yet."""
    result = _result(session, instance, model_sha256)
    assert result is not None, "a report follows its result"
    result.sr_sop_instance_uid, result.sr_path = sr.sop_instance_uid, sr.path
    if sc is not None:
        result.sc_sop_instance_uid, result.sc_path = sc.sop_instance_uid, sc.path
    change_state(session, instance, InstanceState.REPORTED, detail=f"SR {sr.sop_instance_uid}")
    objects = [sr] if sc is None else [sr, sc]
    for destination in destinations:
        for obj in objects:
            known = session.scalar(
                select(Delivery.id).where(
                    Delivery.sop_instance_uid == obj.sop_instance_uid,
                    Delivery.destination == destination,
                )
            )
            if known is None:
                session.add(
                    Delivery(
                        instance_id=instance.id,
                        destination=destination,
                        sop_instance_uid=obj.sop_instance_uid,
                        path=obj.path,
                        state=DeliveryState.PENDING,
                    )
                )
