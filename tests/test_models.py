"""Weights and model cards: the SENet architectures, TorchScript and safetensors, and files that
must be refused without being executed."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ai import ARCHITECTURES, AgeModel, ModelCardError, ModelLoadError, create_network, load_card
from ai.card import ModelCard, card_path, file_sha256, write_card
from ai.presets import PRESETS
from ai.untrained import build_untrained_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_has_a_one_output_regression_head(arch: str) -> None:
    net = create_network(arch).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 1)
    assert net.get_classifier().out_features == 1


def _safetensors_model(
    folder: Path, arch: str = "seresnext50_32x4d"
) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(7)
    net = create_network(arch).eval()
    path = folder / "site-model.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    write_card(path, ModelCard(name="site-model", version="1", architecture=arch))
    return path, net


def test_safetensors_weights_load_into_their_cards_architecture(tmp_path: Path) -> None:
    path, net = _safetensors_model(tmp_path)
    model = AgeModel.load(path, "cpu")
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        expected = net(x)[:, 0].tolist()
    assert model.predict(x) == pytest.approx(expected, abs=1e-4)
    assert model.card.name == "site-model" and model.card.sha256 == file_sha256(path)


def test_safetensors_without_a_card_or_with_the_wrong_architecture_is_refused(
    tmp_path: Path,
) -> None:
    path, _ = _safetensors_model(tmp_path)
    write_card(path, ModelCard(name="site-model", architecture="senet154"))
    with pytest.raises(ModelLoadError, match="not senet154 weights in safetensors"):
        AgeModel.load(path, "cpu")
    write_card(path, ModelCard(name="site-model", architecture="resnet9000"))
    with pytest.raises(ModelLoadError, match="not one of senet154"):
        AgeModel.load(path, "cpu")
    card_path(path).unlink()
    with pytest.raises(ModelCardError, match="no model card"):
        AgeModel.load(path, "cpu")


class _Payload:
    """Unpickling this would create a file: proof that a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_pickle_is_refused_without_being_unpickled(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "executed"
    weights = tmp_path / f"evil{suffix}"
    torch.save({"state": _Payload(marker)}, weights)  # what torch.save makes: a zipped pickle
    if suffix == ".safetensors":
        write_card(weights, ModelCard(name="evil", architecture="seresnext50_32x4d"))
    with pytest.raises(ModelLoadError):
        AgeModel.load(weights, "cpu")
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelLoadError, match="not a TorchScript model"):
        AgeModel.load(plain, "cpu")
    assert not marker.exists()


def test_cards_are_checked(weights: Path, tmp_path: Path) -> None:
    card = load_card(weights)
    assert card.untrained and card.sha256 == file_sha256(weights)
    copy = tmp_path / "model.pt"
    copy.write_bytes(weights.read_bytes() + b"\0")  # the weights changed, the card did not
    card_path(copy).write_text(card.to_json())
    with pytest.raises(ModelCardError, match="does not match its model card"):
        load_card(copy)
    raw = json.loads(card.to_json()) | {"sha256": "", "intensity": "hounsfield"}
    card_path(copy).write_text(json.dumps(raw))
    with pytest.raises(ModelCardError, match="intensity 'hounsfield'"):
        load_card(copy)
    card_path(copy).write_text("{not json")
    with pytest.raises(ModelCardError, match="not a valid model card"):
        load_card(copy)


def test_a_preset_file_without_its_card_gets_the_built_in_card(tmp_path: Path) -> None:
    preset = PRESETS["riken-senet154"]
    path = tmp_path / preset.filename
    build_untrained_model(path, input_size=64)
    card_path(path).unlink()
    model = AgeModel.load(path, "cpu", warm_up=True)
    assert model.card == replace(preset.card, sha256=file_sha256(path))
    assert "Ieki" in model.card.provenance and model.card.license == "Apache-2.0"
