"""The host's half of preprocessing: read, check and decode a radiograph, and say how its stored
values become 8-bit display values. No torch here: this runs in the decoding processes.

What is handed over (:class:`Stored`) is the decoded image as stored (uint8, uint16 or int16: 2
bytes a pixel for a radiograph, not 8 as float64) and a table with one entry per value the
storage type can hold. The table folds the rules of PS3.3 that depend only on the stored value:

1. Modality LUT (PS3.3 C.11.1): stored values to modality values.
2. VOI LUT or the first window (PS3.3 C.11.2) to display values, before rounding.

A table of 65,536 entries costs well under a millisecond, against tens of milliseconds for the
same arithmetic on every pixel. What depends on the whole image (the full range of an image
with neither window nor VOI LUT), the rounding to 8-bit values, MONOCHROME1 inversion and
padding are done with the table on the model's device (:mod:`ai.preprocess`).

Plain grey image files (PNG, JPEG: NIH ChestX-ray14 is PNG) have display values already.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from ai.errors import PreprocessError
from ai.limits import over_budget

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_STORED_TYPES = (np.uint8, np.int8, np.uint16, np.int16)


@dataclass(frozen=True)
class Finish:
    """What the device does to a DICOM table before it holds 8-bit display values."""

    full_range: bool  # the table holds modality values: stretch the image's own min..max
    invert: bool  # MONOCHROME1: bone bright, as in the training images
    padding: int | None  # the stored value of Pixel Padding Value, shown black


@dataclass(frozen=True)
class Stored:
    """A grey image as stored, and the display value of each value it may hold:
    ``table[v - offset]`` for stored value ``v``. Decoded here (``pixels``), or left encoded
    (``encoded``: one JPEG 2000 codestream) for the device's decoder (:mod:`ai.device_decode`)."""

    pixels: np.ndarray | None  # 2-D, one of _STORED_TYPES; None when ``encoded``
    offset: int
    table: np.ndarray  # float64 (DICOM, before Finish) or float32 display values (image files)
    finish: Finish | None  # None: the table holds display values already
    dtype: np.dtype  # of the stored values, decoded or not
    shape: tuple[int, int]
    encoded: bytes | None = None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window to [0, 255] (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.1 LINEAR_EXACT and SIGMOID)."""
    if function in ("SIGMOID", "LINEAR_EXACT") and width <= 0:
        raise PreprocessError(f"WindowWidth {width:g} is not above 0 ({function})")
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    if width < 1:
        raise PreprocessError(f"window width {width} is below 1")
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0


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


def _domain(dtype: np.dtype) -> np.ndarray:
    """Every value of a stored type, lowest first."""
    info = np.iinfo(dtype)
    return np.arange(info.min, info.max + 1, dtype=np.int64)


def _header_dtype(ds: Dataset) -> np.dtype:
    """The stored values' type as the header declares it (for a frame left encoded)."""
    bits = int(ds.get("BitsAllocated", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits not in (8, 16):
        raise PreprocessError(f"BitsAllocated {bits}; 8 or 16 expected")
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def stored_values(ds: Dataset, defer: frozenset[str] = frozenset()) -> Stored:
    """Check ``ds`` and decode it (unless its transfer syntax is in ``defer``: left to the
    device's decoder); its pixels as stored, with their display table."""
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
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    stored: np.ndarray | None = None
    encoded: bytes | None = None
    if syntax in defer:
        dtype = _header_dtype(ds)
        encoded = next(generate_frames(ds.PixelData, number_of_frames=1))
    else:
        try:
            stored = _decode(ds)
        except Exception as e:  # decoders raise many types; all mean the same to the operator
            raise PreprocessError(f"pixel data cannot be decoded: {e}") from None
        stored = stored.astype(stored.dtype.newbyteorder("="), copy=False)  # Big Endian: native
        dtype = stored.dtype
    if dtype not in _STORED_TYPES:  # CR and DX allocate 8 or 16 bits (PS3.3 C.8.11.3)
        raise PreprocessError(f"{dtype} pixels; 8 or 16 bits allocated expected")
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        _check_finite(ds, keyword)
    domain = _domain(dtype)
    values = np.asarray(apply_modality_lut(domain, ds), dtype=np.float64)

    full_range = False
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        out_max = float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64) / out_max * 255
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        values = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    else:
        full_range = True
    # Checked for every value the type can hold, not only those present: a LUT or window legal
    # in form but absurd in effect is refused whichever pixels the image has.
    if not np.isfinite(values).all():
        raise PreprocessError("display values are not finite numbers (check the VOI LUT)")
    padding = int(ds.PixelPaddingValue) if "PixelPaddingValue" in ds else None
    if padding is not None and not domain[0] <= padding <= domain[-1]:
        padding = None  # no stored value can equal it
    finish = Finish(full_range, photometric == "MONOCHROME1", padding)
    shape = (int(ds.Rows), int(ds.Columns))
    if stored is not None:
        stored = np.ascontiguousarray(stored)
    return Stored(stored, int(domain[0]), values, finish, dtype, shape, encoded)


def grey_image_file(path: Path) -> Stored:
    """A grey image file: 8-bit values are display values; 16-bit ones are scaled by
    255/65535, torchxrayvision's rule for PadChest's 16-bit PNGs (``normalize(img, 65535)``);
    grey stored as RGB(A) (all channels equal) is taken as grey. True colour is refused."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":  # a palette: its colours decide
                img = img.convert("RGBA")
            pixels = np.array(img)  # a writable copy: torch refuses to share a read-only one
    except (OSError, UnidentifiedImageError) as e:
        raise PreprocessError(f"{path.name}: not a readable image ({e})") from None
    if pixels.ndim == 3:  # grey + alpha, RGB, RGBA: the alpha channel is not the image
        colour = pixels[:, :, : {2: 1, 3: 3, 4: 3}.get(pixels.shape[2], pixels.shape[2])]
        if (colour != colour[:, :, :1]).any():
            raise PreprocessError(f"{path.name}: colour image (its channels differ), not grey")
        pixels = colour[:, :, 0]
    if pixels.dtype == np.uint8:
        table = _domain(pixels.dtype).astype(np.float32)
    elif pixels.dtype in (np.uint16, np.int32) and pixels.min() >= 0 and pixels.max() <= 65535:
        table = _domain(np.dtype(np.uint16)).astype(np.float32) * np.float32(255 / 65535)
        pixels = pixels.astype(np.uint16)
    else:
        raise PreprocessError(f"{path.name}: {pixels.dtype} image; 8- or 16-bit grey expected")
    pixels = np.ascontiguousarray(pixels)
    return Stored(pixels, 0, table, None, pixels.dtype, pixels.shape)


# Values longer than this are left on disk when a file is read (pydicom's deferred reading):
# Pixel Data is read when it is decoded; anything else that long (a 100 MB private element)
# is never read, and never reaches the header handed back (:func:`read`).
DEFER_BYTES = 64 << 10


def load_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except InvalidDicomError:  # pydicom's words suggest force=True, which no user can pass
        raise PreprocessError(
            f"{path.name}: not a DICOM file (no DICM prefix or File Meta Information); "
            "images other than DICOM must be PNG or JPEG"
        ) from None
    except Exception as e:
        raise PreprocessError(f"{path.name}: not a readable DICOM file ({e})") from None


def small_header(ds: Dataset) -> Dataset:
    """``ds`` without Pixel Data and without the values left on disk (longer than
    :data:`DEFER_BYTES`): what the reports copy of a header, and nothing a sender could make
    the model's process hold."""
    for tag in list(ds.keys()):
        length = getattr(ds.get_item(tag, keep_deferred=True), "length", 0) or 0
        if tag == 0x7FE00010 or length > DEFER_BYTES:
            del ds[tag]
    return ds


@dataclass(frozen=True)
class Read:
    """One file, read on the host: its pixels, and its DICOM header (without Pixel Data; None
    for image files)."""

    stored: Stored | None  # None when the decoding process made the tensor itself
    header: Dataset | None
    seconds: float
    tensor: object = None  # the model input (a torch.Tensor) made there: a CPU model's case


def read(path: Path, defer: frozenset[str] = frozenset()) -> Read:
    """Everything the host does for one file: read, check, decode (unless its transfer syntax
    is in ``defer``), tabulate."""
    started = time.perf_counter()
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Read(grey_image_file(path), None, time.perf_counter() - started)
    header = load_dataset(path)
    stored = stored_values(header, defer)
    return Read(stored, small_header(header), time.perf_counter() - started)


def ready() -> int:
    """Nothing: a call that makes a decoding process import this module (and its decoders)."""
    return os.getpid()
