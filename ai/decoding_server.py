"""Imported by the fork server that the engine's decoding processes are forked from
(``set_forkserver_preload`` in :mod:`ai.engine`), and by nothing else.

The import is the only code multiprocessing runs in its fork server, so it does two things
there: it binds the fork server's life to the engine's process (killed with it, so that a
``kill -9`` of the node leaves no fork server and no decoding processes behind; those die with
the fork server, :func:`ai.processes.fork_server`), and it loads the decoders and torch
once, for every decoding process forked later.
"""

from ai.processes import fork_server

fork_server()

import ai.preprocess  # noqa: E402, F401  (loaded once, here, for every decoding process)
