"""From a DICOM radiograph to the tensor the published X-ray age weights expect.

The published SENet-154 (Ieki et al. 2022, distributed with torchxrayvision) was trained on 8-bit
display images: values mapped to [-1024, 1024], then ``(x + 1024) / 2048`` to [0, 1], resized to
320x320 and ImageNet-normalised, grey repeated on 3 channels. A DICOM radiograph gets there by:

1. Modality LUT (PS3.3 C.11.1): stored values to modality values.
2. VOI LUT or the first window (PS3.3 C.11.2), or the full range when the file has neither,
   to 8-bit display values (rounded, as the 8-bit training images were).
3. MONOCHROME1 inverted so that bone is bright, as in the training images.
4. Centre crop to a square, anti-aliased resize to the model's input size, intensity mapping
   and normalisation, each as torchxrayvision does it (:func:`to_tensor`).

Plain 8-bit image files (PNG, JPEG: NIH ChestX-ray14 is PNG) skip steps 1-3; their grey values
are the display values (:func:`load_image_file`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from ai.errors import PreprocessError
from ai.limits import over_budget

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window to [0, 255] (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.1 LINEAR_EXACT and SIGMOID);
    LINEAR overwrites ``values``."""
    if function in ("SIGMOID", "LINEAR_EXACT") and width <= 0:
        raise PreprocessError(f"WindowWidth {width:g} is not above 0 ({function})")
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    if width < 1:
        raise PreprocessError(f"window width {width} is below 1")
    # In place, the same operations in the same order as ((v - (c - 0.5)) / (w - 1) + 0.5):
    # the same numbers without three more 40 MB arrays for a 5-megapixel radiograph.
    values -= center - 0.5
    values /= width - 1
    values += 0.5
    np.clip(values, 0.0, 1.0, out=values)
    values *= 255.0
    return values


def _check_finite(ds: Dataset, keyword: str) -> None:
    """A number the pixels go through must be one: NaN or infinity is named, not carried into
    the model (where it surfaces as a misleading encoding error)."""
    if keyword not in ds:
        return
    value = ds[keyword].value
    for v in value if isinstance(value, MultiValue) else [value]:
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise PreprocessError(f"{keyword} {str(v)[:32]!r} is not a number") from None
        if not math.isfinite(number):
            raise PreprocessError(f"{keyword} {v} is not a finite number")


def _first(value: object) -> float:
    if isinstance(value, MultiValue):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


# The fastest installed decoder for each compressed transfer syntax, as bench/decode.py measured
# on the 15-bit chest CR (bench/README.md): GDCM for JPEG lossless and JPEG 2000 lossless,
# pylibjpeg (OpenJPEG) for lossy JPEG 2000, pyjpegls (CharLS) for JPEG-LS. Others: pydicom's order.
_FASTEST_DECODER = {
    uid.JPEGLosslessSV1: "gdcm",
    uid.JPEGLossless: "gdcm",
    uid.JPEG2000Lossless: "gdcm",
    uid.JPEG2000: "pylibjpeg",
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
}


def _decode(ds: Dataset) -> np.ndarray:
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    plugin = _FASTEST_DECODER.get(syntax)
    if plugin is not None:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except Exception:  # that plugin is not installed or refuses this file: try them all
            pass
    return ds.pixel_array


def display_values(ds: Dataset) -> np.ndarray:
    """8-bit display values (float32 array of integers 0..255), MONOCHROME2 sense."""
    if "PixelData" not in ds:
        raise PreprocessError("no Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PreprocessError(f"{ds.get('PhotometricInterpretation')} colour image, not greyscale")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise PreprocessError("multi-frame image")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(f"photometric interpretation {photometric or 'missing'}")
    budget = over_budget(ds)
    if budget:
        raise PreprocessError(budget)
    try:
        stored = _decode(ds)
    except Exception as e:  # decoders raise many types; all mean the same to the operator
        raise PreprocessError(f"pixel data cannot be decoded: {e}") from None
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        _check_finite(ds, keyword)
    padding = stored == ds.PixelPaddingValue if "PixelPaddingValue" in ds else None
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)

    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        lut = ds.VOILUTSequence[0]
        out_max = float(2 ** int(lut.LUTDescriptor[2]) - 1)
        display = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64) / out_max * 255
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        display = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    else:
        valid = values[~padding] if padding is not None and (~padding).any() else values
        lo, hi = float(valid.min()), float(valid.max())
        display = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)

    if not np.isfinite(display).all():  # a LUT or window legal in form, absurd in effect
        raise PreprocessError("display values are not finite numbers (check the VOI LUT)")
    np.rint(display, out=display)
    display = np.clip(display, 0, 255, out=display).astype(np.float32)
    if photometric == "MONOCHROME1":
        np.subtract(255.0, display, out=display)
    if padding is not None:
        display[padding] = 0.0
    return display


def to_tensor(display: np.ndarray, input_size: int = 320) -> torch.Tensor:
    """3 x size x size float32 tensor in the published weights' convention.

    The documented input path of the RIKEN weights, torchxrayvision's ``AgeModel`` example, step
    by step: ``normalize(img, 255)`` to [-1024, 1024] (``load_image``), ``XRayCenterCrop`` (its
    offset rounding included; a non-square image is cropped, not padded), then the model's own
    ``fix_resolution``: ``torch.nn.functional.interpolate(size, mode="bilinear",
    antialias=True)``, ``(x + 1024) / 2048`` and ImageNet normalisation on 3 channels.
    """
    h, w = display.shape
    side = min(h, w)
    top, left = h // 2 - side // 2, w // 2 - side // 2
    square = torch.from_numpy(np.ascontiguousarray(display[top : top + side, left : left + side]))
    x = ((2.0 * (square.float() / 255.0) - 1.0) * 1024.0)[None, None]
    if side != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True)
    x = (x[0] + 1024.0) / 2048.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.expand(3, -1, -1) - mean) / std


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def load_image_file(path: Path) -> np.ndarray:
    """Display values (0-255) of a grey image file: 8-bit as it is; 16-bit scaled by
    255/65535, torchxrayvision's rule for PadChest's 16-bit PNGs (``normalize(img, 65535)``);
    grey stored as RGB(A) (all channels equal) taken as grey. True colour is refused."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":  # a palette: its colours decide
                img = img.convert("RGBA")
            pixels = np.asarray(img)
    except (OSError, UnidentifiedImageError) as e:
        raise PreprocessError(f"{path.name}: not a readable image ({e})") from None
    if pixels.ndim == 3:  # grey + alpha, RGB, RGBA: the alpha channel is not the image
        colour = pixels[:, :, : {2: 1, 3: 3, 4: 3}.get(pixels.shape[2], pixels.shape[2])]
        if (colour != colour[:, :, :1]).any():
            raise PreprocessError(f"{path.name}: colour image (its channels differ), not grey")
        pixels = colour[:, :, 0]
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    if pixels.dtype in (np.uint16, np.int32) and pixels.min() >= 0 and pixels.max() <= 65535:
        return pixels.astype(np.float32) * np.float32(255 / 65535)
    raise PreprocessError(f"{path.name}: {pixels.dtype} image; 8- or 16-bit grey expected")


def load_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as e:
        raise PreprocessError(f"{path.name}: not a readable DICOM file ({e})") from None


def preprocess(ds: Dataset, input_size: int = 320) -> torch.Tensor:
    return to_tensor(display_values(ds), input_size)
