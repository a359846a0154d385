"""Every common way a radiograph is stored reaches the same model input.

The encoded copies are made by DCMTK (dcmconv, dcmcrle, dcmcjpeg, dcmcjpls) from the
pydicom-data chest CR, so the decoders are tested against another implementation's encoders.
Lossless encodings must give exactly the same tensor; lossy ones nearly the same.
"""

from __future__ import annotations

import subprocess
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import ExplicitVRLittleEndian

from ai.decode import read
from ai.preprocess import preprocess, tensors
from tests.conftest import pydicom_data_file, require


def _dcmtk(tool: str, args: list[str], source: Path, target: Path) -> pydicom.Dataset:
    out = subprocess.run(
        [require(tool), *args, str(source), str(target)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return pydicom.dcmread(target)


def _rescaled(ds: pydicom.Dataset, bits: int, path: Path) -> Path:
    """A copy with ``bits`` stored bits (the 15-bit CR shifted down), for 8- and 12-bit codecs."""
    copy = deepcopy(ds)
    shift = ds.BitsStored - bits
    pixels = (ds.pixel_array >> shift).astype(np.uint8 if bits <= 8 else np.uint16)
    copy.BitsAllocated = 8 if bits <= 8 else 16
    copy.BitsStored, copy.HighBit = bits, bits - 1
    copy.PixelData = pixels.tobytes()
    copy.WindowCenter = int(ds.WindowCenter) >> shift
    copy.WindowWidth = int(ds.WindowWidth) >> shift
    copy.save_as(path, enforce_file_format=True)
    return path


LOSSLESS = [
    ("dcmconv", ["+ti"], "1.2.840.10008.1.2"),  # implicit VR little endian
    ("dcmconv", ["+tb"], "1.2.840.10008.1.2.2"),  # explicit VR big endian
    ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),  # deflated explicit VR little endian
    ("dcmcrle", [], "1.2.840.10008.1.2.5"),  # RLE lossless
    ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),  # JPEG lossless, process 14
    ("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
]


@pytest.mark.parametrize(("tool", "args", "syntax"), LOSSLESS, ids=[t[2] for t in LOSSLESS])
def test_lossless_encodings_give_the_same_tensor(
    tool: str,
    args: list[str],
    syntax: str,
    chest_pa: Path,
    chest_ds: pydicom.Dataset,
    tmp_path: Path,
) -> None:
    encoded = _dcmtk(tool, args, chest_pa, tmp_path / "encoded.dcm")
    assert encoded.file_meta.TransferSyntaxUID == syntax
    assert torch.equal(preprocess(encoded), preprocess(chest_ds))


def test_jpeg2000_lossless_gives_the_same_tensor(chest_ds: pydicom.Dataset) -> None:
    j2k = pydicom.dcmread(pydicom_data_file("RG1_J2KR.dcm"))
    assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert torch.equal(preprocess(j2k), preprocess(chest_ds))


LOSSY = [
    ("dcmcjpeg", ["+eb"], 8, "1.2.840.10008.1.2.4.50"),  # JPEG baseline, 8-bit
    ("dcmcjpeg", ["+ee"], 12, "1.2.840.10008.1.2.4.51"),  # JPEG extended, 12-bit
    ("dcmcjpls", ["+en"], 12, "1.2.840.10008.1.2.4.81"),  # JPEG-LS near-lossless
]


@pytest.mark.parametrize(("tool", "args", "bits", "syntax"), LOSSY, ids=[t[3] for t in LOSSY])
def test_lossy_encodings_give_nearly_the_same_tensor(
    tool: str, args: list[str], bits: int, syntax: str, chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    source = _rescaled(chest_ds, bits, tmp_path / f"{bits}bit.dcm")
    reference = preprocess(pydicom.dcmread(source))
    encoded = _dcmtk(tool, args, source, tmp_path / "encoded.dcm")
    assert encoded.file_meta.TransferSyntaxUID == syntax
    diff = (preprocess(encoded) - reference).abs()
    assert diff.mean().item() < 0.01 and diff.max().item() < 0.2


def test_jpeg2000_lossy_decodes_close_to_the_original(chest_ds: pydicom.Dataset) -> None:
    lossy = pydicom.dcmread(pydicom_data_file("RG1_J2KI.dcm"))
    assert (preprocess(lossy) - preprocess(chest_ds)).abs().mean().item() < 0.02


def test_bit_depths_and_signedness_map_to_the_same_display(
    chest_ds: pydicom.Dataset, tmp_path: Path
) -> None:
    """The 15-bit CR as 16-bit signed with a rescale intercept: same modality values, same
    tensor. The 8-bit copy loses 7 bits but stays close."""
    signed = deepcopy(chest_ds)
    signed.PixelRepresentation = 1
    signed.PixelData = (chest_ds.pixel_array.astype(np.int32) - 16384).astype(np.int16).tobytes()
    signed.RescaleIntercept, signed.RescaleSlope, signed.RescaleType = 16384, 1, "US"
    assert signed.pixel_array.min() < 0
    assert torch.equal(preprocess(signed), preprocess(chest_ds))

    eight = pydicom.dcmread(_rescaled(chest_ds, 8, tmp_path / "8bit.dcm"))
    assert eight.pixel_array.dtype == np.uint8
    assert (preprocess(eight) - preprocess(chest_ds)).abs().mean().item() < 0.02


def test_odd_sizes_and_pixel_padding(chest_ds: pydicom.Dataset) -> None:
    odd = deepcopy(chest_ds)
    pixels = chest_ds.pixel_array[:1001, :777].copy()
    pixels[:, :40] = 0  # a collimator border written as padding
    odd.Rows, odd.Columns = pixels.shape
    odd.PixelData = pixels.tobytes()
    odd.PixelPaddingValue = 0
    x = preprocess(odd)
    assert x.shape == (3, 320, 320) and torch.isfinite(x).all()
    black = (0.0 - 0.485) / 0.229  # padding is shown black, whatever the window says
    left = x[0, 100:220, 2:8]  # away from the image's top and bottom edges
    assert left.max().item() == pytest.approx(black, abs=1e-4)


def test_the_host_hands_over_stored_values_and_a_table(
    chest_pa: Path, chest_ds: pydicom.Dataset
) -> None:
    """The host's half: the header without Pixel Data, the pixels as stored (uint16, 2 bytes
    a pixel, not a float64 copy) and one table entry per uint16 value; the device's half makes
    the same tensor as the whole path."""
    got = read(chest_pa)
    header = got.header
    assert header is not None and "PixelData" not in header
    assert header.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.stored.pixels.dtype == np.uint16
    assert np.array_equal(got.stored.pixels, chest_ds.pixel_array)
    assert got.stored.table.shape == (65536,) and got.seconds > 0
    x = tensors([got.stored, got.stored], 320, torch.device("cpu"))
    assert x.shape == (2, 3, 320, 320)
    assert torch.equal(x[1], preprocess(chest_ds))
