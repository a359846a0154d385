"""JPEG 2000 decoded by nvImageCodec (ai/device_decode.py): the same tensor as the CPU decoders,
a frame it cannot decode read again by them, and no extra, no change. Without a GPU here, the
device decoder runs on nvImageCodec's CPU backend: the same calls, DLPack aside."""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.encaps import encapsulate

from ai import AgeModel, Engine
from ai.decode import stored_values
from ai.device_decode import SYNTAXES, DeviceDecoder, device_decoder
from ai.preprocess import preprocess, tensors
from tests.conftest import pydicom_data_file

CPU = torch.device("cpu")
pytest.importorskip("nvidia.nvimgcodec")  # in the test extra; the extra `gpu` adds nvJPEG2000


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_the_device_decoder_gives_the_cpu_decoders_tensor(name: str) -> None:
    ds = pydicom.dcmread(pydicom_data_file(name))
    stored = stored_values(ds, SYNTAXES)
    assert stored.pixels is None and stored.encoded  # the host left the frame encoded
    (pixels,) = DeviceDecoder(CPU).decode([stored])
    assert pixels is not None and pixels.shape == stored.shape
    assert torch.equal(tensors([stored], 320, CPU, [pixels])[0], preprocess(ds))


def test_the_engine_decodes_on_the_device_and_falls_back_to_the_cpu(
    weights: Path, chest_pa: Path, tmp_path: Path
) -> None:
    """A JPEG 2000 frame nvImageCodec cannot decode (a truncated codestream) is read again by
    the CPU decoders, which say what is wrong with it; the others get the same ages."""
    j2k = pydicom_data_file("RG1_J2KR.dcm")
    ds = pydicom.dcmread(j2k)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 50]])
    cut = tmp_path / "cut.dcm"
    ds.save_as(cut)
    files = [Path(j2k), cut, chest_pa]
    model = AgeModel.load(weights, "cpu")
    with Engine(model, batch_size=3, workers=1) as cpu:
        expected = list(cpu.run(files))
    with Engine(model, batch_size=3, workers=1, decoder=DeviceDecoder(CPU)) as device:
        got = list(device.run(files))
    assert expected[1].error is not None and expected[1].error.startswith(
        "pixel data cannot be decoded"
    )
    assert [o.error for o in got] == [o.error for o in expected]
    assert [o.xray_age for o in got] == [o.xray_age for o in expected]
    assert got[0].xray_age == got[2].xray_age  # the J2K lossless copy of the same radiograph


def test_without_the_extra_or_a_gpu_the_cpu_decoders_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert device_decoder(CPU, "auto") is None  # a CPU model: OpenJPEG/GDCM in the processes
    assert device_decoder(torch.device("cuda"), "off") is None
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # the extra not installed
    assert device_decoder(torch.device("cuda"), "auto") is None
