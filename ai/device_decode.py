"""JPEG 2000 decoded on the model's device by NVIDIA nvImageCodec (the optional extra ``gpu``).

A JPEG 2000 chest radiograph costs 100-300 ms of one CPU core to decode with OpenJPEG or GDCM
(bench/decode.py), by far the host's largest cost per image; nvJPEG2000 decodes a batch of them
on the GPU. With the extra installed and the model on CUDA, the host leaves JPEG 2000 frames
encoded (:func:`ai.decode.stored_values` with ``defer``) and the engine decodes them here, a
batch at a time, straight into device memory (DLPack, no copy back to the host).

Without the extra, or for a frame that nvImageCodec cannot decode, the engine reads the file
again with the CPU decoders (:mod:`ai.engine`): the GPU path only ever makes things faster. On a
CPU-only host the same code runs on nvImageCodec's CPU backend, which is how it is tested.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydicom import uid

from ai.decode import Stored

log = logging.getLogger("xrayage.decode")

# PS3.5 A.4.4: JPEG 2000 Image Compression (Lossless Only), and lossy.
SYNTAXES = frozenset({uid.JPEG2000Lossless, uid.JPEG2000})
DeviceDecode = Literal["auto", "off"]


class DeviceDecoder:
    """nvImageCodec's decoder for ``device``: its GPU backends on CUDA, its CPU one elsewhere."""

    def __init__(self, device: torch.device) -> None:
        from nvidia import nvimgcodec  # the extra `gpu`: ImportError without it

        self.device = device
        if device.type == "cuda":
            self._decoder = nvimgcodec.Decoder(device_id=device.index or 0)
        else:
            self._decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
            )
        # Stored values as they are: all bits (15-bit CR), one component, no colour conversion.
        self._params = nvimgcodec.DecodeParams(
            allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED
        )

    def decode(self, batch: Sequence[Stored]) -> list[torch.Tensor | None]:
        """The pixels of each encoded frame on the device, as :func:`ai.preprocess.tensors`
        takes them; None where this decoder could not make the image its header declares."""
        images = self._decoder.decode([s.encoded for s in batch], params=self._params)
        return [_tensor(image, s, self.device) for image, s in zip(images, batch, strict=True)]


def _tensor(image: Any, stored: Stored, device: torch.device) -> torch.Tensor | None:
    if image is None:
        return None
    pixels = torch.from_dlpack(image) if device.type == "cuda" else torch.from_numpy(
        np.asarray(image.cpu())
    )
    if pixels.dim() == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if tuple(pixels.shape) != stored.shape or pixels.element_size() != stored.dtype.itemsize:
        return None  # what the codestream holds is not what the header says: CPU decoders judge
    if stored.dtype.itemsize == 2:
        pixels = pixels.view(torch.int16)  # uint16 as _on_device hands it over
    elif stored.dtype == np.int8:
        pixels = pixels.view(torch.int8)
    return pixels.to(device).contiguous()


def device_decoder(device: torch.device, mode: DeviceDecode) -> DeviceDecoder | None:
    """The device decoder, or None: ``off``, or ``auto`` on a CPU model or without the extra."""
    if mode == "off" or device.type != "cuda":
        return None
    try:
        return DeviceDecoder(device)
    except ImportError:
        log.info("JPEG 2000 is decoded on the CPU (install the extra `gpu` for nvImageCodec)")
    except Exception as e:  # the extra is there, its libraries or the device are not
        log.warning("JPEG 2000 is decoded on the CPU: nvImageCodec cannot start (%s)", e)
    return None
