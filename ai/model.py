"""Loading weights once and running batches through them.

Two kinds of weights load, and nothing is ever unpickled from an arbitrary file:

- TorchScript (``.pt``, ``.pth``, ``.ts``; the published weights are one), loaded with
  ``torch.jit.load``, which restores a compiled graph and tensors, never arbitrary Python objects;
- a timm state dict in safetensors (``.safetensors``, what our own training writes), which needs
  its model card beside it to say which architecture (:mod:`ai.architectures`) it fills.

On CUDA a batch runs under bf16 autocast in channels_last memory format from pinned host memory;
on CPU in float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from ai.architectures import UnknownArchitecture, create_network
from ai.card import ModelCard, card_path
from ai.errors import ModelLoadError
from ai.presets import model_card

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise ModelLoadError(f"device must be auto, cpu or cuda, not {requested!r}")
    return torch.device(requested)


def years(value: float) -> float:
    """A float32 network output as the shortest decimal that round-trips (what the SR stores)."""
    return float(str(np.float32(value)))


def load_torchscript(path: Path, device: torch.device | None = None) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location=device or torch.device("cpu"))
    except Exception as e:  # torch raises RuntimeError, ValueError, zipfile errors...
        raise ModelLoadError(f"{path}: not a TorchScript model ({e})") from None


def _load_safetensors(path: Path, card: ModelCard) -> nn.Module:
    architecture = card.architecture
    try:
        network = create_network(architecture)
    except UnknownArchitecture as e:
        raise ModelLoadError(f"{card_path(path)}: {e}") from None
    try:
        state = safetensors.torch.load_file(str(path))
        network.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0]
        raise ModelLoadError(
            f"{path}: not {architecture} weights in safetensors ({first})"
        ) from None
    return network


@dataclass
class AgeModel:
    module: nn.Module
    card: ModelCard
    device: torch.device
    path: Path

    @classmethod
    def load(cls, path: Path, device: str = "auto", warm_up: bool = False) -> AgeModel:
        if not path.is_file():
            raise ModelLoadError(f"weights not found: {path}")
        dev = pick_device(device)
        card = model_card(path)
        if path.suffix == ".safetensors":
            module = _load_safetensors(path, card).to(dev)
        elif path.suffix in TORCHSCRIPT_SUFFIXES:
            module = load_torchscript(path, dev)
        else:
            raise ModelLoadError(
                f"{path}: unknown weights format {path.suffix or '(no suffix)'}; expected "
                f"TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)}) or .safetensors"
            )
        module.eval()
        if dev.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        model = cls(module=module, card=card, device=dev, path=path)
        if warm_up:
            model.predict(torch.zeros(1, 3, card.input_size, card.input_size))
        return model

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> list[float]:
        """Ages in years for a N x 3 x S x S batch from :func:`ai.preprocess.tensors`."""
        if self.device.type == "cuda":
            # A batch made on the host (the engine makes it on the device): a pageable host
            # batch copies at a fraction of PCIe speed (measured on an H100: senet154 at batch
            # 64 lost ~30 % to it); pinned memory copies asynchronously.
            x = batch
            if batch.device.type != "cuda":
                x = batch.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.module(x)
        else:
            out = self.module(batch)
        flat = out.float().reshape(out.shape[0], -1)[:, 0].cpu().numpy()
        return [years(v) for v in flat]
