"""Preprocessing: the same radiograph gives the same tensor however it is encoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from ai import PreprocessError, display_values
from ai.decode import Stored, grey_image_file
from ai.preprocess import IMAGENET_MEAN, IMAGENET_STD, tensors


def _tensor(display: np.ndarray) -> torch.Tensor:
    """The model input for 8-bit display values, as an image file gives them."""
    pixels = display.astype(np.uint8)
    stored = Stored(pixels, 0, np.arange(256, dtype=np.float32), None, pixels.dtype, pixels.shape)
    return tensors([stored], 320, torch.device("cpu"))[0]


def load_image_file(path: Path) -> np.ndarray:
    stored = grey_image_file(path)
    return stored.table[stored.pixels.astype(np.int64) - stored.offset]


def test_window_and_intensity_mapping(chest_ds: pydicom.Dataset) -> None:
    display = display_values(chest_ds)
    assert display.dtype == np.float32 and display.min() >= 0 and display.max() <= 255
    assert np.array_equal(display, np.rint(display))  # 8-bit display values, as trained
    # MONOCHROME1: the highest stored value is displayed darkest, the lowest brightest
    pixels = chest_ds.pixel_array
    assert display[np.unravel_index(pixels.argmax(), pixels.shape)] == display.min()
    assert display[np.unravel_index(pixels.argmin(), pixels.shape)] == display.max()
    # a uniform display value v maps to ((v/255*2048-1024)+1024)/2048 = v/255, then ImageNet
    x = _tensor(np.full((50, 80), 51))
    assert x.shape == (3, 320, 320)
    for c in range(3):
        assert x[c].mean().item() == pytest.approx((0.2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])


def test_full_range_when_there_is_no_window(chest_ds: pydicom.Dataset) -> None:
    del chest_ds.WindowCenter
    del chest_ds.WindowWidth
    display = display_values(chest_ds)
    assert display.min() == 0 and display.max() == 255


def test_non_square_images_are_centre_cropped() -> None:
    img = np.zeros((100, 300), dtype=np.uint8)
    img[:, 100:200] = 255  # the centre square is white, the sides black
    assert _tensor(img).min().item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0])


def test_colour_and_missing_pixels_are_clear_errors(chest_ds: pydicom.Dataset) -> None:
    chest_ds.SamplesPerPixel = 3
    with pytest.raises(PreprocessError, match="colour"):
        display_values(chest_ds)
    del chest_ds.PixelData
    with pytest.raises(PreprocessError, match="no Pixel Data"):
        display_values(chest_ds)


def test_a_header_over_the_pixel_budget_is_refused_before_decoding(
    chest_ds: pydicom.Dataset,
) -> None:
    chest_ds.Rows = chest_ds.Columns = 60000  # the payload stays small: nothing is decoded
    with pytest.raises(PreprocessError, match="exceed the pixel budget"):
        display_values(chest_ds)


def test_image_files_grey_as_rgb_16_bit_and_true_colour(tmp_path: Path) -> None:
    """Grey stored as RGB(A) is grey; 16-bit PNG is scaled by 255/65535 (torchxrayvision's
    PadChest rule); true colour is refused, not reduced to its first channel."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    expected = load_image_file(tmp_path / "grey.png")
    assert np.array_equal(expected, grey.astype(np.float32))
    for mode in ("RGB", "RGBA", "LA"):
        Image.fromarray(grey).convert(mode).save(tmp_path / f"{mode}.png")
        assert np.array_equal(load_image_file(tmp_path / f"{mode}.png"), expected), mode
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # I;16
    assert np.allclose(load_image_file(tmp_path / "sixteen.png"), expected, atol=1e-4)
    colour = np.stack([grey, grey, grey], axis=2)
    colour[5, 5, 1] ^= 1  # one pixel with a hint of colour
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(PreprocessError, match=r"colour.png: colour image \(its channels differ"):
        load_image_file(tmp_path / "colour.png")
