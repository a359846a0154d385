"""One interface for every kind of destination (mercure's one class per target type): a
:class:`Sender` takes report files and says, per file, whether the destination stored it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pydicom

from node.config import Destination
from storage.tables import DeliveryKind


class Sender(Protocol):
    def send(self, paths: list[Path]) -> list[str | None]:
        """Send the files in one go; an error message per file (a :class:`Refused` where no
        resend can help), None where it was stored."""
        ...


class Refused(str):
    """The destination refused the object (a FHIR 4xx, an HL7 AE or AR): the delivery fails at
    once with this reason, since sending it again would get the same answer."""


def one_by_one(paths: list[Path], send_one: Callable[[Path], str | None]) -> list[str | None]:
    """Send each file alone (FHIR, HL7: one request or message each), in order. After an
    error that is no refusal the destination is away, and the rest get that error without
    each waiting out the same timeout."""
    errors: list[str | None] = []
    for path in paths:
        error = send_one(path)
        errors.append(error)
        if error is not None and not isinstance(error, Refused):
            return errors + [error] * (len(paths) - len(errors))
    return errors


def _read_dicom(path: Path) -> Any:
    return pydicom.dcmread(path).SOPInstanceUID


def _readers() -> dict[DeliveryKind, Callable[[Path], Any]]:
    from node.report.fhir import read_observation
    from node.report.hl7 import read_oru

    return {
        DeliveryKind.SR: _read_dicom,
        DeliveryKind.SC: _read_dicom,
        DeliveryKind.OBSERVATION: read_observation,
        DeliveryKind.ORU: read_oru,
    }


def unreadable(path: Path, kind: DeliveryKind) -> str | None:
    """Why the report file at ``path`` cannot be sent (missing, truncated, not what its kind
    says), or None. Read whole: the senders read it whole too, and a file the node's own disk
    damaged must fail its own delivery, not a destination's whole round."""
    try:
        _readers()[kind](path)
    except Exception as e:  # pydicom, pydantic and hl7apy raise many kinds for damaged files
        return f"report file {path} cannot be read: {type(e).__name__}: {e}"[:1000]
    return None


def sender_for(dest: Destination, ae_title: str, timeout: float) -> Sender:
    """The sender for ``dest``'s kind (``Destination.protocol``); ``ae_title`` is the calling AE
    of C-STORE; ``timeout`` bounds each request."""
    if dest.protocol == "STOW-RS":
        from node.delivery.stow import StowSender

        return StowSender(dest, timeout)
    if dest.protocol == "FHIR":
        from node.delivery.fhir import FhirSender

        return FhirSender(dest, timeout)
    if dest.protocol == "HL7 MLLP":
        from node.delivery.mllp import MllpSender

        return MllpSender(dest, timeout)
    from node.delivery.cstore import CStoreSender

    return CStoreSender(dest, ae_title, timeout)
