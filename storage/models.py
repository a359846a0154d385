"""The node's models as data: one ``live`` model makes the reports, ``shadow`` models run on
the same images with their results stored and never sent, ``retired`` ones run no more.

Every role change goes through :func:`storage.lifecycle.change_state` (audited as ``model``,
with the person who asked) and hands the queued jobs over in the same transaction
(:func:`storage.queue.adopt_jobs`): a running node's inference process reads the table again
within :data:`REFRESH_SECONDS` and loads or drops models without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.lifecycle import change_state
from storage.queue import adopt_jobs
from storage.tables import Model, ModelRole, Result, utcnow
from xrayage.errors import UserError

REFRESH_SECONDS = 10.0  # how often an inference process reads the table (a minute at most)
SHA_PREFIX = 8  # the shortest SHA-256 prefix that names a model


class ModelError(UserError, LookupError):
    """A model command that cannot be done: unknown or ambiguous name, a live model retired."""


@dataclass(frozen=True)
class Weights:
    """Weights as the node registers them: what results call them and their card as JSON."""

    name: str
    version: str
    sha256: str
    path: str
    card_json: str


def active_models(session: Session) -> list[Model]:
    """The live model first, then the shadows, oldest first."""
    rows = session.scalars(
        select(Model).where(Model.role.in_((ModelRole.LIVE, ModelRole.SHADOW))).order_by(Model.id)
    ).all()
    return sorted(rows, key=lambda m: m.role != ModelRole.LIVE)


def live_model(session: Session) -> Model | None:
    return session.scalar(select(Model).where(Model.role == ModelRole.LIVE))


def all_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.id)))


def images_seen(session: Session) -> dict[str, int]:
    """Results per model SHA-256: the images each model analysed."""
    rows = session.execute(
        select(Result.model_sha256, func.count(Result.id)).group_by(Result.model_sha256)
    )
    return {sha: int(n) for sha, n in rows}


def find_model(session: Session, key: str) -> Model:
    """The model named ``key`` (an active one before a retired one of the same name), or whose
    SHA-256 starts with ``key`` (at least :data:`SHA_PREFIX` hex digits)."""
    models = all_models(session)
    named = [m for m in models if m.name == key]
    if not named and len(key) >= SHA_PREFIX:
        named = [m for m in models if m.sha256.startswith(key.lower())]
    active = [m for m in named if m.role != ModelRole.RETIRED]
    found = active or named
    if len(found) == 1:
        return found[0]
    known = ", ".join(f"{m.name} ({m.role.value}, {m.sha256[:SHA_PREFIX]})" for m in models)
    if not found:
        raise ModelError(f"no model {key!r}; known: {known or 'none'}")
    raise ModelError(f"{key!r} names {len(found)} models: give a SHA-256 prefix ({known})")


def _same_sha(session: Session, sha256: str) -> Model | None:
    return session.scalar(select(Model).where(Model.sha256 == sha256))


def _check_name(session: Session, weights: Weights) -> None:
    for other in active_models(session):
        if other.name == weights.name and other.sha256 != weights.sha256:
            raise ModelError(
                f"a {other.role.value} model is already named {weights.name!r} "
                f"(sha256 {other.sha256[:SHA_PREFIX]}): give these weights another --name"
            )


def add_model(session: Session, weights: Weights, role: ModelRole, actor: str) -> Model:
    """Register ``weights`` in ``role`` (audited); weights known already change role instead.
    A new live model retires the live one (:func:`set_role`)."""
    model = _same_sha(session, weights.sha256)
    if model is not None and model.role in (role, ModelRole.LIVE):
        raise ModelError(f"model {model.name} is already {model.role.value}")
    _check_name(session, weights)
    if model is None:
        model = Model(
            name=weights.name, version=weights.version, sha256=weights.sha256,
            path=weights.path, card_json=weights.card_json, role=ModelRole.RETIRED,
        )  # fmt: skip
        session.add(model)
        session.flush()
    else:  # a retired model back, under the name asked for and from where it is now
        model.name, model.path = weights.name, weights.path
    set_role(session, model, role, actor, f"model {model.name} {model.version} "
             f"(sha256 {model.sha256}) {role.value}: added from {weights.path}")  # fmt: skip
    return model


def set_role(session: Session, model: Model, role: ModelRole, actor: str, detail: str) -> None:
    """Move ``model`` to ``role``, audited with ``detail``; making it live retires the live
    one. Then the queued jobs follow the roles (:func:`storage.queue.adopt_jobs`)."""
    if role == ModelRole.LIVE:
        current = live_model(session)
        if current is not None and current.id != model.id:
            current.since = utcnow()
            change_state(session, current, ModelRole.RETIRED, actor=actor,
                         detail=f"model {current.name} {current.version} retired: "
                         f"{model.name} is live")  # fmt: skip
    model.since = utcnow()
    change_state(session, model, role, actor=actor, detail=detail)
    session.flush()
    adopt_jobs(session)


def retire_model(session: Session, model: Model, actor: str) -> None:
    if model.role == ModelRole.LIVE:
        raise ModelError(
            f"model {model.name} is live: promote another model first (a node without a live "
            "model sends no reports)"
        )
    if model.role == ModelRole.RETIRED:
        raise ModelError(f"model {model.name} is already retired")
    set_role(session, model, ModelRole.RETIRED, actor,
             f"model {model.name} {model.version} retired")  # fmt: skip


def configure(session: Session, weights: Weights) -> str | None:
    """What ``[model] weights`` names at a start. It names the live model when it changes:
    new weights, or weights other than those it named at the last start, become live. Weights
    it named before stay as the table has them, so a promotion made since stands. Returns what
    changed, or None."""
    now = utcnow()
    model = _same_sha(session, weights.sha256)
    last = session.scalar(
        select(Model).where(Model.configured_at.is_not(None)).order_by(Model.configured_at.desc())
    )
    changed = model is None or last is None or last.id != model.id
    said = None
    if model is None:
        live = live_model(session)
        if live is not None and live.name == weights.name:  # a new version under the same name
            set_role(session, live, ModelRole.RETIRED, "config",
                     f"model {live.name} {live.version} retired: [model] weights names "
                     f"{weights.path}")  # fmt: skip
        model = add_model(session, weights, ModelRole.LIVE, "config")
        said = f"{model.name} {model.version} is live: [model] weights names it"
    elif changed and model.role != ModelRole.LIVE:
        set_role(session, model, ModelRole.LIVE, "config",
                 f"model {model.name} {model.version} live: [model] weights names it")  # fmt: skip
        said = f"{model.name} {model.version} is live again: [model] weights names it"
    model.configured_at = now
    return said
