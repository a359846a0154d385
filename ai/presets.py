"""Weights the node knows by name, with their built-in model cards, and the cache they live in.

``riken-senet154`` is the paper's model (Ieki et al., Communications Medicine 2022,
doi 10.1038/s43856-022-00220-6) as the TorchScript file torchxrayvision publishes. Its authors
publish no checksum of that file, so the first pull records the one it computed in the card
beside the file, and every later load is checked against it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from ai.card import ModelCard, card_path, file_sha256, load_card
from xrayage.errors import UserError


@dataclass(frozen=True)
class Preset:
    card: ModelCard
    url: str
    filename: str
    sha256: str | None = None  # None: not published; recorded at the first pull
    size: str = ""  # as a person downloading it wants to know it

    @property
    def name(self) -> str:
        return self.card.name


_RIKEN_FILE = "baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            card=ModelCard(
                name="riken-senet154",
                version="v2_tl_26_ft_7",
                architecture="senet154 (SENet-154, TorchScript, fp32)",
                input_size=320,
                intensity="xrv-1024",
                normalisation="imagenet",
                output_unit="a",
                age_range=(18.0, 100.0),
                views=("PA", "AP"),
                provenance=(
                    "Ieki H, Ito K, et al. Deep learning-based age estimation from chest X-rays "
                    "indicates cardiovascular prognosis. Communications Medicine 2022 "
                    "(doi 10.1038/s43856-022-00220-6); trained on NIH ChestX-ray14, external "
                    "test on JSRT (MAE 4.95 years); TorchScript export published with "
                    "torchxrayvision (github.com/mlmed/torchxrayvision, release v1)"
                ),
                license="Apache-2.0",
                reference_mae=4.95,
                reference_r=0.916,
                reference_set="JSRT, external test set (Ieki et al. 2022)",
                notes=[
                    "The authors' fastai pickle of the same model (github.com/pirocv/xray_age) "
                    "has SHA-256 9773fc0b83821c0ffc90cdce7cdc41bed45d841d64a6a83c5c37b309453e365d "
                    "(461,927,689 bytes); no checksum of the TorchScript file is published.",
                    "Age range: the node's adult default; the gate skips patients outside it.",
                ],
            ),
            url=f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{_RIKEN_FILE}",
            filename=_RIKEN_FILE,
            size="about 460 MB",
        ),
    )
}


def default_cache_dir() -> Path:
    """``$XRAYAGE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/xrayage/models`` (``~/.cache/...``)."""
    if env := os.environ.get("XRAYAGE_MODEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xrayage" / "models"


class WeightsNotFound(UserError, FileNotFoundError):
    pass


def resolve_weights(spec: str, cache_dir: Path | None = None) -> Path:
    """A preset name (its file in the cache) or a path, as ``[model] weights`` and ``--weights``
    take it. The node never downloads here: a missing preset says how to pull it."""
    if spec in PRESETS:
        path = (cache_dir or default_cache_dir()) / PRESETS[spec].filename
        if not path.is_file():
            cache = f" --cache {cache_dir}" if cache_dir else ""
            raise WeightsNotFound(
                f"model {spec} is not downloaded: run `xrayage model pull {spec}{cache}`"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        known = ", ".join(PRESETS)
        raise WeightsNotFound(f"weights not found: {spec} (not a file, nor a preset: {known})")
    return path


def model_card(path: Path) -> ModelCard:
    """The card beside the weights; for a preset's file without one, the built-in card."""
    preset = next((p for p in PRESETS.values() if p.filename == path.name), None)
    if preset is not None and not card_path(path).exists():
        return replace(preset.card, sha256=file_sha256(path))
    return load_card(path, required=path.suffix == ".safetensors")
