"""A small SE-ResNet with untrained weights, for the demo and the tests.

A randomly initialised network answers nearly the same number for every image, which would make
"the SR holds what the model returned" untestable. So the output adds a term in the input's mean:
one display grey level moves the answer by about one year. It is not an age estimate, and its
card says so (``untrained: true``), which the SR then states in plain words.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import timm.models.resnet as tr
import torch
from torch import nn

from ai.card import ModelCard, card_path, file_sha256

# One grey level moves the normalised input by about 1/255/0.226 = 0.0174; 60 * 0.0174 ~ 1 year.
_YEARS_PER_UNIT_MEAN = 60.0


class UntrainedAgeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = tr.ResNet(
            block=tr.BasicBlock,
            layers=[1, 1, 1, 1],
            num_classes=1,
            block_args={"attn_layer": "se"},
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        return 50.0 + _YEARS_PER_UNIT_MEAN * (mean - 1.0) + self.backbone(x).flatten()


def build_untrained_model(path: Path, seed: int = 0, input_size: int = 320) -> ModelCard:
    """Write a TorchScript file and its model card; the same seed gives the same weights
    (the file's bytes, and so its SHA-256, also carry TorchScript metadata that can vary)."""
    torch.manual_seed(seed)
    net = UntrainedAgeNet().eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return _write_card(
        path,
        "xrayage-untrained-seresnet",
        "SE-ResNet (timm ResNet, BasicBlock [1,1,1,1], SE attention)",
        input_size,
        seed,
    )


def _write_card(path: Path, name: str, architecture: str, input_size: int, seed: int) -> ModelCard:
    card = ModelCard(
        name=name,
        version=f"seed{seed}",
        architecture=architecture,
        input_size=input_size,
        untrained=True,
        provenance="made on the spot by xrayage; random weights, never trained",
        license="Apache-2.0",
        sha256=file_sha256(path),
        notes=["UNTRAINED WEIGHTS: the number is not an age estimate."],
    )
    card_path(path).write_text(card.to_json())
    return card


def build_untrained_timm(
    path: Path, architecture: str, input_size: int = 320, seed: int = 0
) -> ModelCard:
    """Safetensors weights and their card for one of :data:`ai.architectures.ARCHITECTURES`,
    randomly initialised: the real network's cost with meaningless numbers, for benchmarks."""
    import safetensors.torch

    from ai.architectures import create_network

    torch.manual_seed(seed)
    safetensors.torch.save_file(create_network(architecture).state_dict(), str(path))
    return _write_card(path, f"xrayage-untrained-{architecture}", architecture, input_size, seed)
