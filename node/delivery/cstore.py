"""C-STORE delivery (PS3.4 Annex B) to a DICOM node, over DICOM TLS when the destination has
``tls``; the files go as they are stored (node/dicom/scu.py)."""

from __future__ import annotations

from pathlib import Path

from node.config import Destination
from node.dicom.scu import send_files
from node.dicom.tls import client_context


class CStoreSender:
    def __init__(self, dest: Destination, ae_title: str, timeout: float) -> None:
        self.peer = dest.peer
        self.ae_title = ae_title
        self.timeout = timeout
        self.tls = client_context(self.peer.tls, self.peer.host) if self.peer.tls else None

    def send(self, paths: list[Path]) -> list[str | None]:
        peer = self.peer
        return send_files(
            self.ae_title, peer.ae_title, peer.host, peer.port, paths, self.timeout, self.tls
        )
