"""The SENet family through timm, each with a one-output regression head in years.

``senet154`` is the paper's architecture (Ieki et al. 2022); the SE-ResNeXt variants are
lighter alternatives of the same family for sites that train their own model, and SE-ResNet-18
the smallest (a few thousand images, a CPU, the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ai.errors import UnknownArchitecture

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURES = ("senet154", "seresnext50_32x4d", "seresnext101_32x4d", "seresnet18")


def create_network(architecture: str) -> nn.Module:
    """An untrained network; weights come from a safetensors file or a training run."""
    if architecture not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    import timm  # imported here: the list of names must not cost an import of torch

    return timm.create_model(architecture, pretrained=False, num_classes=1)
