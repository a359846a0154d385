"""The SENet family through timm, each with a one-output regression head in years.

``senet154`` is the paper's architecture (Ieki et al. 2022); the SE-ResNeXt variants are
lighter alternatives of the same family for sites that train their own model.
"""

from __future__ import annotations

import timm
from torch import nn

from ai.errors import UnknownArchitecture

ARCHITECTURES = ("senet154", "seresnext50_32x4d", "seresnext101_32x4d")


def create_network(architecture: str) -> nn.Module:
    """An untrained network; weights come from a safetensors file or a training run."""
    if architecture not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    return timm.create_model(architecture, pretrained=False, num_classes=1)
