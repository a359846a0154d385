"""pynetdicom's C-STORE SCP with a handler that answers Success at once, storing nothing.

The ceiling of any receiver built on pynetdicom on this machine: what ``bench/ingest.py``
measures for it is pynetdicom's own cost per image (its DUL, state machine and DIMSE decoding),
with no file, no fsync and no database. Configured as the node's receiver is: every storage
SOP Class in every transfer syntax, 128 KiB maximum PDU.

    python bench/bare_scp.py PORT
"""

from __future__ import annotations

import sys

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def main() -> None:
    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 131072
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(
        ("127.0.0.1", int(sys.argv[1])),
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )


if __name__ == "__main__":
    main()
