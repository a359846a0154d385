"""The private names of pynetdicom and highdicom that the node relies on, fenced in one place.

Each was checked against the versions in :data:`CHECKED`; pyproject.toml allows the same
ranges, and tests/test_compat.py fails when an installed version leaves them or a name is gone,
so that an upgrade is a decision taken here and not a surprise on a hospital's node.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import DimseServiceType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

Projection = Callable[[Dataset], list[Any]]
# library -> (lowest checked version, first version not checked)
CHECKED = {"pynetdicom": ("3.0.4", "3.1"), "highdicom": ("0.28.2", "0.29")}


def register_server(ae: AE, server: AssociationServer) -> None:
    """What ``AE.start_server`` does after starting its server: remember it, so that
    ``AE.shutdown`` stops it. The node builds its server with ``make_server`` (a server class of
    its own, which ``start_server`` cannot take) and starts it as ``start_server`` does."""
    ae._servers.append(server)


class HookedRequestHandler(RequestHandler):
    """pynetdicom's request handler with a public hook on the association it creates for each
    connection, before the association starts (``_create_association`` is private)."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        self.association_created(assoc)
        return assoc

    def association_created(self, assoc: Association) -> None:
        """Called with each new association, before its state machine runs."""


def server_of(assoc: Association) -> AssociationServer:
    """The server that accepted ``assoc`` (pynetdicom keeps it private): the guarded socket
    reads its limits there."""
    server: AssociationServer = assoc._server
    return server


def use_socket_class(assoc: Association, cls: type[AssociationSocket]) -> None:
    """Give the socket pynetdicom made for ``assoc`` the behaviour of ``cls``, a subclass that
    only overrides methods: constructing another would announce the connection to the state
    machine a second time (Evt5)."""
    assert assoc.dul.socket is not None
    assoc.dul.socket.__class__ = cls


class _ContextCopies(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied for each connection without
    ``deepcopy``: pynetdicom deep-copies them per connection (``_create_association``), which
    re-validates every UID: 7,654 transfer syntax entries, 59 ms of CPU per connection here,
    before the peer has sent a byte. Each context is copied with its own transfer syntax list;
    the UIDs, immutable, are shared."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            new = copy.copy(context)
            new._transfer_syntax = list(context._transfer_syntax)
            copies.append(new)
        return copies


def copy_contexts_cheaply(server: AssociationServer) -> None:
    server.contexts = _ContextCopies(server.contexts)


def responses_to_caller(assoc: Association) -> None:
    """Leave every DIMSE message to the ``send_*()`` call that waits for it.

    pynetdicom 3.0.4's reactor thread polls the association's DIMSE queue between operations,
    and ``send_*()`` pauses it by checking a flag the reactor may not have updated since the
    previous operation resumed it. When a request follows another on the same association
    before the reactor thread has run, the reactor can take the peer's first response and drop
    it ("Received unexpected C-FIND service message", pynetdicom issue 875): a C-FIND match
    lost without any error (measured: 1 to 4 of 150 to 500 studies of a retro-scan), a C-STORE
    response lost until the DIMSE timeout. An association this node requests serves no requests
    of its own (a C-GET's C-STOREs are handled inside ``send_c_get``), so the reactor's
    non-blocking poll is answered empty."""
    waiting = assoc.dimse.get_msg

    def get_msg(block: bool = False) -> tuple[None, None] | tuple[int, DimseServiceType]:
        return waiting(block=True) if block else (None, None)

    assoc.dimse.get_msg = get_msg  # type: ignore[method-assign]


@cache
def _entry_descriptors_class() -> type[Any]:
    import highdicom as hd  # only where reports are built: a receiver need not load it

    class EntryDescriptors(hd.sr.ImageLibraryEntryDescriptors):  # type: ignore[misc]
        def __init__(self, dataset: Dataset, projection: Projection) -> None:
            self.projection = projection  # the base's constructor calls the generator below
            super().__init__(dataset)

        def _generate_projection_radiography_descriptors(self, dataset: Dataset) -> list[Any]:
            return self.projection(dataset)

    return EntryDescriptors


def entry_descriptors(dataset: Dataset, projection: Projection) -> list[Any]:
    """highdicom's TID 1602 entry descriptors of ``dataset``, with the TID 1603
    projection-radiography items made by ``projection`` (highdicom's own generator is private)."""
    return _entry_descriptors_class()(dataset, projection)  # type: ignore[no-any-return]


def _highdicom_generator() -> object:
    import highdicom as hd

    return hd.sr.ImageLibraryEntryDescriptors._generate_projection_radiography_descriptors


def receive_datasets_to_files(open_file: Callable[..., Any]) -> None:
    """pynetdicom writes each received C-STORE data set to a file as its fragments arrive, never
    holding it in memory (``_config.STORE_RECV_CHUNKED_DATASET``, documented by pynetdicom as
    public), and removes the file after the handler. The file is made by the
    ``NamedTemporaryFile`` that ``dimse_messages`` imported by name, with no folder: it is
    ``open_file`` instead (called as pynetdicom calls it, ``delete=False, mode="wb",
    suffix=".dcm"``), which makes it in the store, on the file system the handler links it
    into. Not ``tempfile.tempdir``: that would move every temporary file of the process
    (multiprocessing's fork server socket too)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = open_file


def drop_partial_dataset(assoc: Association) -> None:
    """An association that ended in the middle of a data set (aborted, cut off by the guard)
    leaves pynetdicom's partial file behind (it removes the file only once a handler ran on
    the whole data set): remove it."""
    message = getattr(assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)


PRIVATE_NAMES: dict[str, Callable[[], object]] = {
    "pynetdicom AE._servers": lambda: AE()._servers,
    "pynetdicom RequestHandler._create_association": lambda: RequestHandler._create_association,
    "pynetdicom DIMSEServiceProvider.get_msg (replaced per association)": (
        lambda: DIMSEServiceProvider.get_msg
    ),
    "pynetdicom PresentationContext._transfer_syntax": lambda: (
        "_transfer_syntax" in vars(PresentationContext()) or None
    ),
    "pynetdicom dimse_messages.NamedTemporaryFile": lambda: dimse_messages.NamedTemporaryFile,
    "pynetdicom DIMSEMessage._data_set_file": lambda: (
        "_data_set_file" in vars(DIMSEMessage()) or None
    ),
    "pynetdicom DIMSEServiceProvider.message": lambda: (
        "message" in vars(DIMSEServiceProvider(Association(AE(), "acceptor"))) or None
    ),
    "pynetdicom Association._server": lambda: (
        "_server" in vars(Association(AE(), "acceptor")) or None
    ),
    "highdicom ImageLibraryEntryDescriptors._generate_projection_radiography_descriptors": (
        _highdicom_generator
    ),
}
