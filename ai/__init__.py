"""The X-ray age model as a library: DICOM pixels to tensors, weights with model cards, inference.

Usable on its own, with no database and no network::

    from ai import AgeModel, load_dataset, preprocess
    model = AgeModel.load(Path("model.pt"))
    age = model.predict(preprocess(load_dataset(Path("chest.dcm")))[None])[0]
"""

from ai.card import ModelCard, ModelCardError, load_card
from ai.model import AgeModel, ModelLoadError, pick_device
from ai.preprocess import PreprocessError, display_values, load_dataset, preprocess, to_tensor
from ai.untrained import build_untrained_model

__all__ = [
    "AgeModel",
    "ModelCard",
    "ModelCardError",
    "ModelLoadError",
    "PreprocessError",
    "build_untrained_model",
    "display_values",
    "load_card",
    "load_dataset",
    "pick_device",
    "preprocess",
    "to_tensor",
]
