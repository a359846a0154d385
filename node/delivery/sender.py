"""One interface for every kind of destination (mercure's one class per target type): a
:class:`Sender` takes report files and says, per file, whether the destination stored it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pydicom

from node.config import Destination


class Sender(Protocol):
    def send(self, paths: list[Path]) -> list[str | None]:
        """Send the files in one go; an error message per file, None where it was stored."""
        ...


def unreadable(path: Path) -> str | None:
    """Why the report file at ``path`` cannot be sent (missing, truncated, not DICOM), or None.
    Read whole: the senders read it whole too, and a file the node's own disk damaged must fail
    its own delivery, not a destination's whole round."""
    try:
        pydicom.dcmread(path).SOPInstanceUID  # noqa: B018 - reading is the check
    except Exception as e:  # pydicom raises many kinds for damaged files
        return f"report file {path} cannot be read: {type(e).__name__}: {e}"
    return None


def sender_for(dest: Destination, ae_title: str, timeout: float) -> Sender:
    """The sender for ``dest``: STOW-RS when it has a ``stow_url``, else C-STORE from
    ``ae_title``; ``timeout`` bounds each request."""
    if dest.stow_url:
        from node.delivery.stow import StowSender

        return StowSender(dest, timeout)
    from node.delivery.cstore import CStoreSender

    return CStoreSender(dest, ae_title, timeout)
