"""Faithful to the published model: our DICOM path against the documented input path of its
weights (torchxrayvision's AgeModel example), and the X-ray age independent of how the same
radiograph is stored."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ai import AgeModel, display_values
from ai.preprocess import preprocess
from tests.conftest import pydicom_data_file

xrv = pytest.importorskip("torchxrayvision")  # a test-only dependency: transforms, no weights
import torchvision  # noqa: E402  (torchxrayvision's dependency)


def _eight_bit_dicom(pixels: np.ndarray) -> pydicom.Dataset:
    """An 8-bit MONOCHROME2 image with an identity window (LINEAR, c=128, w=256: y = x)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def _torchxrayvision(pixels: np.ndarray) -> torch.Tensor:
    """The documented input path of the RIKEN age model, torchxrayvision's ``AgeModel``
    example: ``load_image``'s scaling, ``XRayCenterCrop``, then ``AgeModel.forward``'s repeat,
    ``fix_resolution`` (``interpolate``, bilinear, antialiased), ``(x + 1024) / 2048`` and
    ImageNet ``Normalize``."""
    img = xrv.utils.normalize(pixels, 255)[None, ...]
    x = torch.from_numpy(xrv.datasets.XRayCenterCrop()(img))[None].repeat(1, 3, 1, 1)
    x = xrv.utils.fix_resolution(x, 320, object())  # the model only keys a warning
    x = (x + 1024) / 2048
    norm = torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return norm(x)[0]


@pytest.mark.parametrize("shape", [(1024, 1024), (700, 523), (200, 200)], ids=str)
def test_our_tensor_equals_torchxrayvisions(
    chest_ds: pydicom.Dataset, shape: tuple[int, int]
) -> None:
    # 8-bit content from the real radiograph: its display values, cut to the shape
    pixels = display_values(chest_ds)[200 : 200 + shape[0], 300 : 300 + shape[1]].astype(np.uint8)
    ours = preprocess(_eight_bit_dicom(pixels))
    reference = _torchxrayvision(pixels)
    assert ours.shape == reference.shape == (3, 320, 320)
    assert (ours - reference).abs().max().item() < 1e-4


def test_the_age_does_not_depend_on_how_the_image_is_stored(
    chest_ds: pydicom.Dataset, weights: Path
) -> None:
    """Uncompressed, JPEG 2000 lossless, and inverted to MONOCHROME2: within 0.01 years."""
    model = AgeModel.load(weights, "cpu")
    j2k = pydicom.dcmread(pydicom_data_file("RG1_J2KR.dcm"))
    inverted = deepcopy(chest_ds)
    top = 2**chest_ds.BitsStored - 1
    inverted.PixelData = (top - chest_ds.pixel_array).astype(np.uint16).tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME2"
    inverted.WindowCenter = top - chest_ds.WindowCenter + 1  # LINEAR windows centre at c - 0.5
    ages = model.predict(torch.stack([preprocess(d) for d in (chest_ds, j2k, inverted)]))
    assert max(ages) - min(ages) <= 0.01, ages
    # and the stand-in model does see the image: a one-grey-level shift moves it visibly
    brighter = deepcopy(chest_ds)
    brighter.WindowCenter = chest_ds.WindowCenter - chest_ds.WindowWidth / 255
    shifted = model.predict(preprocess(brighter)[None])[0]
    assert abs(shifted - ages[0]) > 0.3, (shifted, ages[0])
