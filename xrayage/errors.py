"""The one type of a user's mistake.

Every error that a person can fix (a missing file, a bad config key, weights that are not
TorchScript, a port another program holds) derives from :class:`UserError`, in whichever layer
raises it; the CLI catches this one type and prints ``xrayage: error: <message>`` with exit
status 2, so its message must name the file, key, port or path.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's, said in one line that names what to change."""


class CannotListen(UserError):
    """A port the node was told to listen on cannot be bound (another program holds it)."""
