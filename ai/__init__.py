"""The X-ray age model as a library: DICOM pixels to tensors, weights with model cards, batched
inference, evaluation. Usable on its own, with no database and no network::

    from ai import AgeModel, Engine, resolve_weights
    model = AgeModel.load(resolve_weights("riken-senet154"))  # or a path
    for outcome in Engine(model, batch_size=16).run(Path("folder").rglob("*.dcm")):
        print(outcome.path, outcome.xray_age, outcome.error)
"""

from ai.architectures import ARCHITECTURES, UnknownArchitecture, create_network
from ai.card import ModelCard, ModelCardError, load_card
from ai.engine import Engine, Outcome, prepare
from ai.model import AgeModel, ModelLoadError, pick_device
from ai.preprocess import PreprocessError, display_values, load_dataset, preprocess, to_tensor
from ai.presets import PRESETS, WeightsNotFound, default_cache_dir, resolve_weights
from ai.untrained import build_untrained_model

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "AgeModel",
    "Engine",
    "ModelCard",
    "ModelCardError",
    "ModelLoadError",
    "Outcome",
    "PreprocessError",
    "UnknownArchitecture",
    "WeightsNotFound",
    "build_untrained_model",
    "create_network",
    "default_cache_dir",
    "display_values",
    "load_card",
    "load_dataset",
    "pick_device",
    "prepare",
    "preprocess",
    "resolve_weights",
    "to_tensor",
]
