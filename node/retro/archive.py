"""The query/retrieve peer of retro-scans, seen through Study Root C-FIND and C-MOVE or C-GET
(PS3.4 Annex C): the scan's client, and nothing of the plan or the database.

C-FIND answers are returned whole, with whether the peer ended them at its result limit
(Cancel after matches). A retrieve is a C-MOVE to this node's own AE title, so the images arrive
through the receive path like any routed one, or a C-GET on the query association for peers
that cannot route back; either way the receiver marks them ``retro``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import Peer, RetroSection
from node.dicom.scu import on_connect
from node.dicom.statuses import CANCEL, MATCH_PENDING, SUCCESS
from node.dicom.tls import client_context

MODALITIES = ("CR", "DX")
# What the gate can pass: DX For Processing and everything else is left in the archive.
RETRIEVED_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation)
# PS3.4 C.4.2.1.5 / C.4.3.1.5: the failure statuses a peer gives for a whole retrieve.
RETRIEVE_FAILURES = {
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown: the peer must know this node's AE title and address",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
}


class ArchiveError(Exception):
    """The query/retrieve peer could not be reached or refused a request."""


StoreHandler = Callable[[evt.Event], int]


class Archive:
    """The query/retrieve peer, seen through Study Root C-FIND and C-MOVE or C-GET."""

    def __init__(
        self, *, retro: RetroSection, own_ae: str, store_handler: StoreHandler | None = None
    ) -> None:
        if retro.peer is None:
            raise ValueError("no [retro] peer configured")
        self.peer: Peer = retro.peer
        self.own_ae = own_ae
        self.use_get = retro.retrieve == "get"
        self.store_handler = store_handler
        self.timeout = retro.timeout_seconds
        self.tls = client_context(self.peer.tls, self.peer.host) if self.peer.tls else None

    @contextmanager
    def association(self) -> Iterator[Association]:
        ae = AE(ae_title=self.own_ae)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = self.timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        roles, handlers = [], [(evt.EVT_CONN_OPEN, on_connect)]
        if self.use_get:
            if self.store_handler is None:
                raise ValueError("C-GET needs a store handler")
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for sop_class in RETRIEVED_CLASSES:
                ae.add_requested_context(sop_class)
                roles.append(build_role(sop_class, scp_role=True))
            handlers.append((evt.EVT_C_STORE, self.store_handler))
        else:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        peer = self.peer
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
            evt_handlers=handlers, tls_args=self.tls,
        )  # fmt: skip
        if not assoc.is_established:
            raise ArchiveError(
                f"no association with {peer.ae_title}@{peer.host}:{peer.port} "
                "(refused, or not reachable)"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def find(self, assoc: Association, level: str, **keys: str) -> tuple[list[Dataset], bool]:
        """The matches, and whether they are all of them: a peer that stops at its result limit
        ends with Cancel (0xFE00, "matching terminated", PS3.4 C.4.1.1.4) after the matches it
        sent (Orthanc's ``LimitFindResults``/``LimitFindInstances``, DCMTK's ``--max-results``).
        """
        query = self._query(assoc, level, keys)
        matches = []
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise ArchiveError(f"C-FIND at {level} level: no response (timed out)")
            if code in MATCH_PENDING and identifier is not None:
                matches.append(identifier)
            elif code == CANCEL and matches:
                return matches, False
            elif code != SUCCESS:
                raise ArchiveError(f"C-FIND at {level} level failed: status 0x{code:04X}")
        return matches, True

    def retrieve(
        self, assoc: Association, study_uid: str, series_uid: str, sop_uids: list[str] | None
    ) -> tuple[int, int]:
        """Fetch these instances, or the whole series (``sop_uids`` None); returns how many
        arrived and how many failed."""
        if sop_uids is None:
            return self._retrieve(assoc, "SERIES", StudyInstanceUID=study_uid,
                                  SeriesInstanceUID=series_uid)  # fmt: skip
        ok, _ = self._retrieve(
            assoc, "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
            SOPInstanceUID=sop_uids,
        )  # fmt: skip
        return ok, len(sop_uids) - ok

    def retrieve_studies(self, assoc: Association, study_uids: list[str]) -> tuple[int, int]:
        """Fetch whole studies with one request (a list of UIDs at STUDY level, PS3.4
        C.4.2.2.1): one association from the archive for all of them, as ``movescu`` gets."""
        return self._retrieve(assoc, "STUDY", StudyInstanceUID=study_uids)

    def _query(self, assoc: Association, level: str, keys: dict[str, str | list[str]]) -> Dataset:
        """The identifier; ArchiveError if the association was ended meanwhile (by the peer,
        or by a network timeout): pynetdicom would raise RuntimeError on it."""
        if not assoc.is_established:
            peer = self.peer
            raise ArchiveError(
                f"the association with {peer.ae_title}@{peer.host}:{peer.port} ended "
                "(closed by the archive, or the network timed out)"
            )
        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        return query

    def _retrieve(self, assoc: Association, level: str, **keys: str | list[str]) -> tuple[int, int]:
        query = self._query(assoc, level, keys)
        responses = (
            assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if self.use_get
            else assoc.send_c_move(query, self.own_ae, StudyRootQueryRetrieveInformationModelMove)
        )
        final = None
        for status, _ in responses:
            final = status
        code = getattr(final, "Status", None)
        what = "C-GET" if self.use_get else "C-MOVE"
        if code is None:
            raise ArchiveError(f"{what}: no response (timed out)")
        done = int(final.get("NumberOfCompletedSuboperations", 0))  # type: ignore[union-attr]
        warned = int(final.get("NumberOfWarningSuboperations", 0))  # type: ignore[union-attr]
        refused = (code & 0xF000) in (0xA000, 0xC000) and done + warned == 0
        if code in RETRIEVE_FAILURES or refused:
            raise ArchiveError(
                f"{what} refused: 0x{code:04X} {RETRIEVE_FAILURES.get(code, 'unable to process')}"
            )
        return done + warned, int(final.get("NumberOfFailedSuboperations", 0))  # type: ignore[union-attr]
