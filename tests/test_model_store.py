"""The model directory: a finished model loads; a missing, foreign, tampered or pickled one is refused."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

import torch

from bids_app import cli
from bids_app.errors import BadDataError
from bids_app.model_card import compatible, content_sha256, read_model_card
from bids_app.model_store import load_trained_models

from tests.conftest import TINY_TRAINING

@pytest.fixture(scope="module")
def trained(tiny_model: Path) -> Path:
    """The shared barely-trained tiny model: enough to test storage and loading."""
    return tiny_model


@pytest.fixture()
def model_copy(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(trained, target)
    return target


def test_finished_model_loads_and_matches_its_card(trained: Path) -> None:
    models = load_trained_models(trained)
    assert models.plan.target_shape == (32, 32, 32)
    assert models.latent_scale == models.card["latent_scale"]
    assert not models.vqgan.training and not models.unet.training
    latent = models.vqgan.encode(torch.zeros(1, 1, 32, 32, 32))
    assert models.unet(latent, torch.tensor([10])).shape == latent.shape


def test_tampered_weights_are_refused(model_copy: Path) -> None:
    weights = model_copy / "diffusion" / "weights.pt"
    state = torch.load(weights, weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, weights)
    with pytest.raises(BadDataError, match="checksum mismatch"):
        load_trained_models(model_copy)


def test_pickled_code_in_weights_is_refused(model_copy: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    weights = model_copy / "vqgan" / "weights.pt"
    weights.write_bytes(pickle.dumps({"x": Exploit()}))
    card = json.loads((model_copy / "model_card.json").read_text())
    import hashlib

    card["components"]["vqgan"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    card["content_sha256"] = content_sha256(card)  # a forger re-seals the card
    (model_copy / "model_card.json").write_text(json.dumps(card))
    stage = json.loads((model_copy / "vqgan" / "stage.json").read_text())
    stage["sha256"] = card["components"]["vqgan"]["sha256"]
    (model_copy / "vqgan" / "stage.json").write_text(json.dumps(stage))
    with pytest.raises(BadDataError, match="weights-only"):
        load_trained_models(model_copy)


def test_model_from_another_version_is_refused(model_copy: Path) -> None:
    card = json.loads((model_copy / "model_card.json").read_text())
    card["version"] = "7.0.0"
    (model_copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BadDataError, match="counterseg 7.0.0 cannot be used"):
        read_model_card(model_copy)


def test_changed_architecture_is_refused(model_copy: Path) -> None:
    config = json.loads((model_copy / "vqgan" / "config.json").read_text())
    config["config"]["n_hiddens"] = 12
    (model_copy / "vqgan" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadDataError):
        load_trained_models(model_copy)


@pytest.mark.parametrize("model, app, ok", [("0.1.0", "0.1.3", True), ("0.1.0", "0.2.0", False),
                                             ("1.2.0", "1.5.1", True), ("1.0.0", "2.0.0", False), ("", "0.1.0", False)])
def test_version_compatibility(model: str, app: str, ok: bool) -> None:
    assert compatible(model, app) is ok


def test_finished_stages_are_skipped_and_retrain_redoes_them(simple_dataset: Path, trained: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    shutil.copytree(trained.parent, out)
    config = tmp_path / "steps.json"
    config.write_text(json.dumps(TINY_TRAINING))
    args = [str(simple_dataset), str(out), "group", "--preset", "tiny", "--config", str(config), "--skip-bids-validation"]
    before = (out / "models" / "vqgan" / "weights.pt").read_bytes()
    assert cli.main(args) == 0
    assert "is finished and was trained with these settings and data: nothing to train" in caplog.text
    assert (out / "models" / "vqgan" / "weights.pt").read_bytes() == before
    caplog.clear()
    assert cli.main(args + ["--retrain", "--stages", "diffusion"]) == 0
    assert "diffusion: training for up to 4 steps" in caplog.text and "vqgan: training" not in caplog.text
    assert (out / "models" / "model_card.json").is_file()
