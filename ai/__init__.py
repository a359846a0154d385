"""The X-ray age model as a library: DICOM pixels to tensors, weights with model cards, batched
inference, evaluation. Usable on its own, with no database and no network::

    from ai import AgeModel, Engine, resolve_weights

    if __name__ == "__main__":  # the engine decodes in processes of its own
        model = AgeModel.load(resolve_weights("riken-senet154"))  # or a path
        with Engine(model, batch_size=16) as engine:
            for outcome in engine.run(Path("folder").rglob("*.dcm")):
                print(outcome.path, outcome.xray_age, outcome.error)
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Names load their module on first use (PEP 562), so ``import ai`` for a model card does not
# import torch: a receiving process stays small (bench/ingest.py measures its memory). The
# function ``preprocess`` is ``ai.preprocess.preprocess``: a lazy name cannot share the name of
# the submodule it lives in.
_HOME = {
    "ARCHITECTURES": "architectures",
    "UnknownArchitecture": "errors",
    "create_network": "architectures",
    "ModelCard": "card",
    "ModelCardError": "card",
    "load_card": "card",
    "Engine": "engine",
    "Outcome": "engine",
    "AgeModel": "model",
    "ModelLoadError": "errors",
    "pick_device": "model",
    "PreprocessError": "errors",
    "display_values": "preprocess",
    "load_dataset": "decode",
    "tensors": "preprocess",
    "PRESETS": "presets",
    "WeightsNotFound": "presets",
    "default_cache_dir": "presets",
    "model_card": "presets",
    "resolve_weights": "presets",
    "build_untrained_model": "untrained",
}

if TYPE_CHECKING:
    from ai.architectures import ARCHITECTURES, UnknownArchitecture, create_network
    from ai.card import ModelCard, ModelCardError, load_card
    from ai.decode import load_dataset
    from ai.engine import Engine, Outcome
    from ai.errors import PreprocessError
    from ai.model import AgeModel, ModelLoadError, pick_device
    from ai.preprocess import display_values, tensors
    from ai.presets import PRESETS, WeightsNotFound, default_cache_dir, model_card, resolve_weights
    from ai.untrained import build_untrained_model


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'ai' has no attribute {name!r}")
    return getattr(import_module(f"ai.{_HOME[name]}"), name)


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
    "model_card",
    "pick_device",
    "resolve_weights",
    "tensors",
]
