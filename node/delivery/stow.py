"""STOW-RS delivery (PS3.18 10.5 Store Transaction) to a DICOMweb origin server.

One POST of ``multipart/related; type="application/dicom"`` per batch. The response's Failed SOP
Sequence (0008,1198) and Referenced SOP Sequence (0008,1199) say, per instance, whether it was
stored: a 202 with some failures fails only those. The deliverer retries; dicomweb-client's own
retrying is off so that one policy (``[delivery]``) applies to both kinds of destination.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from node.config import Destination
from node.delivery.session import http_session

# PS3.18 Table 10.5.3-1 failure reasons most often seen, to name them in the error.
_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0xA700: "out of resources",
}


class StowSender:
    def __init__(self, dest: Destination, timeout: float) -> None:
        self.client = _client(dest, timeout)

    def send(self, paths: list[Path]) -> list[str | None]:
        return stow_files(self.client, paths)


def _client(dest: Destination, timeout: float) -> DICOMwebClient:
    assert dest.stow_url is not None
    root = dest.stow_url.rstrip("/").removesuffix("/studies")  # the client appends /studies
    client = DICOMwebClient(root, session=http_session(dest), timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client


def stow_files(client: DICOMwebClient, paths: list[Path]) -> list[str | None]:
    """STOW-RS the files in one request; an error message per file, None where it was stored."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        return [f"STOW-RS HTTP {status}"] * len(paths)
    except requests.RequestException as e:
        return [f"STOW-RS to {client.base_url}: {type(e).__name__}"] * len(paths)
    failed = {
        str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110))
        for item in response.get("FailedSOPSequence", [])
    }
    stored = {
        str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])
    }
    errors: list[str | None] = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            code = failed[uid]
            errors.append(f"STOW-RS failure 0x{code:04X} {_REASONS.get(code, '')}".rstrip())
        elif uid in stored or not response:  # an empty 200 body acknowledges everything
            errors.append(None)
        else:
            errors.append("STOW-RS: not acknowledged by the server")
    return errors
