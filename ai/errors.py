"""The library's errors, in a module of their own: a caller can catch them without importing
torch (the node's CLI does, so that ``xrayage serve --role receive`` stays small)."""

from xrayage.errors import UserError


class UnknownArchitecture(UserError, ValueError):
    """The card names an architecture this library cannot build."""


class ModelLoadError(UserError, RuntimeError):
    """The weights file cannot be loaded as a model."""


class PreprocessError(UserError, ValueError):
    """The image cannot be turned into model input; the message says why."""


class DownloadError(UserError, RuntimeError):
    """Weights could not be fetched or did not match their checksum."""


class LabelsError(UserError, ValueError):
    """A labels CSV is missing a column or holds a value that is not an age."""
