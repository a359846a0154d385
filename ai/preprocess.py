"""The device's half of preprocessing: from stored values (:mod:`ai.decode`) to the tensor the
published X-ray age weights expect, as tensor operations on the device the model runs on.

The published SENet-154 (Ieki et al. 2022, distributed with torchxrayvision) was trained on 8-bit
display images: values mapped to [-1024, 1024], then ``(x + 1024) / 2048`` to [0, 1], resized to
320x320 and ImageNet-normalised, grey repeated on 3 channels. After the host's modality LUT and
VOI LUT or window (tabulated per stored value, :func:`ai.decode.stored_values`), the device:

1. finishes the table: the full range of an image with neither window nor VOI LUT, rounding to
   8-bit display values (as the 8-bit training images were), MONOCHROME1 inversion so that bone
   is bright, Pixel Padding Value black (:func:`display_table`);
2. crops the centre square and looks each of its pixels up in the table, already in
   torchxrayvision's scale;
3. resizes, maps and normalises as the weights' documented input path does (:func:`tensors`).

Looking pixels up in a table of 65,536 entries gives the same numbers as the same arithmetic
done on every pixel (tests/test_reference_parity.py), for a fraction of the work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from ai.decode import Read, Stored, read, stored_values
from ai.processes import decoding_process

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _on_device(stored: Stored, device: torch.device) -> torch.Tensor:
    """The stored pixels on ``device`` as they are (2 bytes a pixel for a radiograph); uint16
    travels as int16, which every torch device handles, and is read back by :func:`_indices`."""
    pixels = stored.pixels
    if pixels is None:
        raise ValueError("the pixels are still encoded: decode them on the device first")
    if pixels.dtype == np.uint16:
        pixels = pixels.view(np.int16)
    return torch.from_numpy(pixels).to(device, non_blocking=True)


def _indices(pixels: torch.Tensor, stored: Stored) -> torch.Tensor:
    """Row of the table for each pixel."""
    index = pixels.to(torch.int32)
    if stored.dtype == np.uint16:
        index &= 0xFFFF
    return index - stored.offset if stored.offset else index


def display_table(stored: Stored, pixels: torch.Tensor) -> torch.Tensor:
    """float32 display value (0..255) of each stored value, on the device of ``pixels``."""
    values = torch.from_numpy(stored.table).to(pixels.device)
    finish = stored.finish
    if finish is None:
        return values.float()
    if finish.full_range:  # min..max of the image's modality values, padding left out
        counts = torch.bincount(_indices(pixels, stored).reshape(-1), minlength=values.numel())
        present = counts > 0
        valid = present.clone()
        if finish.padding is not None:
            valid[finish.padding - stored.offset] = False
        valid = torch.where(valid.any(), valid, present)  # all padding: the whole image
        lo = torch.where(valid, values, torch.inf).min()
        hi = torch.where(valid, values, -torch.inf).max()
        values = torch.where(hi > lo, (values - lo) / (hi - lo) * 255.0, 0.0)
    values = values.round().clamp(0.0, 255.0)  # round half to even, as numpy's rint
    if finish.invert:
        values = 255.0 - values
    if finish.padding is not None:
        values[finish.padding - stored.offset] = 0.0
    return values.float()


def _square(stored: Stored, pixels: torch.Tensor) -> torch.Tensor:
    """The centre square in torchxrayvision's scale, 1 x 1 x side x side: ``normalize(img,
    255)`` to [-1024, 1024] (``load_image``), then ``XRayCenterCrop``, its offset rounding
    included (a non-square image is cropped, not padded)."""
    scaled = (2.0 * (display_table(stored, pixels) / 255.0) - 1.0) * 1024.0
    h, w = pixels.shape
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    index = _indices(pixels[top : top + side, left : left + side], stored)
    return scaled.index_select(0, index.reshape(-1)).view(1, 1, side, side)


def tensors(
    batch: Sequence[Stored],
    input_size: int,
    device: torch.device,
    decoded: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """N x 3 x size x size float32 model input on ``device``, in the published weights'
    convention: the documented input path of the RIKEN weights, torchxrayvision's ``AgeModel``
    example, after the crop: the model's own ``fix_resolution`` (``interpolate(size,
    mode="bilinear", antialias=True)``), ``(x + 1024) / 2048`` and ImageNet normalisation on 3
    channels. ``decoded[i]``, when given, holds the pixels of ``batch[i]`` decoded on the device
    (int16 for uint16 values, as :func:`_on_device` hands them over)."""
    size = (input_size, input_size)
    squares = []
    for i, stored in enumerate(batch):
        pixels = decoded[i] if decoded is not None else None
        x = _square(stored, pixels if pixels is not None else _on_device(stored, device))
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
        squares.append(x)
    x = (torch.cat(squares) + 1024.0) / 2048.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def display_values(ds: Dataset) -> np.ndarray:
    """The whole image's 8-bit display values (float32 array of integers 0..255), MONOCHROME2
    sense: what the model's input is made from, for plots and tests."""
    stored = stored_values(ds)
    pixels = _on_device(stored, torch.device("cpu"))
    table = display_table(stored, pixels)
    return table.index_select(0, _indices(pixels, stored).reshape(-1)).view(pixels.shape).numpy()


def preprocess(ds: Dataset, input_size: int = 320) -> torch.Tensor:
    """3 x size x size model input for one dataset, on the CPU."""
    return tensors([stored_values(ds)], input_size, torch.device("cpu"))[0]


def cpu_decoding_process(memory_mb: int | None = None) -> None:
    """The start of a decoding process that also makes tensors (:func:`read_tensor`): one
    torch thread, as there is one such process per core."""
    torch.set_num_threads(1)  # before the limit: its threads' stacks are mapped once, here
    decoding_process(memory_mb)


def read_tensor(path: Path, input_size: int) -> Read:
    """What a decoding process does when the model runs on the CPU as well: :func:`ai.decode.read`,
    then the tensor steps there, one core per process, rather than all of them in the model's
    process; 3 x size x size floats go back instead of the stored pixels."""
    got = read(path)
    assert got.stored is not None
    started = time.perf_counter()
    x = tensors([got.stored], input_size, torch.device("cpu"))[0]
    seconds = got.seconds + time.perf_counter() - started
    return replace(got, stored=None, tensor=x, seconds=seconds)
