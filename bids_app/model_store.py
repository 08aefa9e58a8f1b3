"""The model directory: one folder per component (config next to weights, ``stage.json`` marking it
finished), the preprocessing plan, and the model card written last.

Inference loads through ``load_trained_models``, which reads the card (version check), verifies the
checksum of every weight file and loads weights-only, so a corrupted, tampered or foreign model is
refused with a clear message (exit 65) instead of producing wrong segmentations.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from bids_app.io import atomic_write_json
from bids_app.errors import BadDataError, MissingInputError
from bids_app.model_card import MODEL_CARD, read_model_card
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.weights import load_weights, save_weights

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True)
class TrainedModels:
    """Everything inference needs, loaded and verified."""

    card: Mapping[str, Any]
    card_sha256: str
    vqgan: Any
    unet: Any
    scheduler_config: Any
    latent_scale: float
    plan: PreprocessingPlan
    adapter: Any = None


def store_component(directory: Path, weights: Mapping[str, torch.Tensor], identity: Mapping[str, Any],
                    summary: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """Weights, then config, then ``stage.json`` last: only a complete component looks finished."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STAGE_FILE).unlink(missing_ok=True)
    digest = save_weights(directory / WEIGHTS_FILE, weights)
    config = {k: v for k, v in identity.items() if not k.endswith("_sha256")}
    atomic_write_json(directory / CONFIG_FILE, {"config": config, **extra})
    atomic_write_json(directory / STAGE_FILE, {"identity": _jsonable(identity), "sha256": digest,
                                               **summary, **extra})


def read_stage(directory: Path) -> dict[str, Any]:
    """The finished-stage record of a component, or {} when it has none."""
    path = Path(directory) / STAGE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadDataError(f"{path}: unreadable stage record ({exc})") from exc


def is_finished(directory: Path, identity: Mapping[str, Any] | None = None) -> bool:
    """Finished, and (when given) trained with this identity (architecture, upstream checksums)."""
    stage = read_stage(directory)
    if not stage or not (Path(directory) / WEIGHTS_FILE).is_file():
        return False
    return identity is None or _jsonable(identity) == stage.get("identity")


def load_component_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MissingInputError(f"{path}: missing component config") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BadDataError(f"{path}: unreadable component config ({exc})") from exc


def load_component(directory: Path, kind: str, device: str = "cpu", expected_sha256: str | None = None):
    """A stored component (``vqgan``, ``unet``, ``adapter``), checksum-verified, in eval mode."""
    model_cls, config_cls = _component_classes(kind)
    stage = read_stage(directory)
    if not stage:
        raise MissingInputError(f"no trained {kind} in {directory}")
    model = model_cls(_config(config_cls, directory))
    model.load_state_dict(load_weights(Path(directory) / WEIGHTS_FILE, expected_sha256 or stage["sha256"]))
    return model.to(device).eval()


def load_vqgan(directory: Path, device: str = "cpu", expected_sha256: str | None = None):
    return load_component(directory, "vqgan", device, expected_sha256)


def load_unet(directory: Path, device: str = "cpu", expected_sha256: str | None = None):
    return load_component(directory, "unet", device, expected_sha256)


def load_adapter(directory: Path, device: str = "cpu", expected_sha256: str | None = None):
    return load_component(directory, "adapter", device, expected_sha256)


def _component_classes(kind: str) -> tuple[Any, Any]:
    if kind == "vqgan":
        from bids_app.models.vqgan import VQGAN, VQGANConfig

        return VQGAN, VQGANConfig
    if kind == "unet":
        from bids_app.models.unet3d import UNet3D, UNet3DConfig

        return UNet3D, UNet3DConfig
    if kind == "adapter":
        from bids_app.models.adapter import AdapterConfig, T2IAdapter

        return T2IAdapter, AdapterConfig
    raise ValueError(f"unknown component kind {kind!r}")


def load_components(model_dir: Path, plan: PreprocessingPlan, device: str = "cpu") -> TrainedModels:
    """The trained components before a model card exists (the calibrate stage runs on them)."""
    from bids_app.schedulers import SchedulerConfig

    model_dir = Path(model_dir)
    diffusion = read_stage(model_dir / "diffusion")
    if not diffusion:
        raise MissingInputError(f"no trained diffusion model in {model_dir / 'diffusion'}: run the diffusion stage first")
    adapter = load_adapter(model_dir / "adapter", device) if is_finished(model_dir / "adapter") else None
    return TrainedModels({}, "", load_vqgan(model_dir / "vqgan", device), load_unet(model_dir / "diffusion", device),
                         SchedulerConfig.from_dict(diffusion["scheduler"]), float(diffusion["latent_scale"]), plan,
                         adapter)


def load_trained_models(model_dir: Path, device: str = "cpu") -> TrainedModels:
    """Read the card, verify every checksum against it, load weights-only."""
    from bids_app.schedulers import SchedulerConfig

    model_dir = Path(model_dir)
    card = read_model_card(model_dir)
    card_sha = hashlib.sha256((model_dir / MODEL_CARD).read_bytes()).hexdigest()
    components = card.get("components", {})
    for name in ("vqgan", "diffusion"):
        if name not in components:
            raise BadDataError(f"{model_dir / MODEL_CARD}: no {name} component")
    for name, component in components.items():
        _verify_config(model_dir / name / CONFIG_FILE, component.get("config_sha256"))
    try:
        vqgan = load_vqgan(model_dir / "vqgan", device, components["vqgan"]["sha256"])
        unet = load_unet(model_dir / "diffusion", device, components["diffusion"]["sha256"])
        adapter = (load_adapter(model_dir / "adapter", device, components["adapter"]["sha256"])
                   if "adapter" in components else None)
        plan = PreprocessingPlan.from_dict(card["preprocessing"]["plan"])
        scheduler = SchedulerConfig.from_dict(card["scheduler"])
        scale = float(card["latent_scale"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BadDataError(f"{model_dir}: the model does not match its model card ({exc})") from exc
    log.info("loaded the model in %s (counterseg %s, preset %s)", model_dir, card.get("version"), card.get("preset"))
    return TrainedModels(card, card_sha, vqgan, unet, scheduler, scale, plan, adapter)


def _verify_config(path: Path, expected: str | None) -> None:
    """A component's config must be the one the card recorded (BadDataError, 65)."""
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise BadDataError(f"{path}: unreadable component config ({exc.strerror or exc})") from exc
    if actual != expected:
        raise BadDataError(f"{path}: checksum mismatch with the model card: the config was modified after training")


def _config(cls: Any, directory: Path) -> Any:
    try:
        return cls.from_dict(load_component_config(directory)["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadDataError(f"{Path(directory) / CONFIG_FILE}: config not valid for this version ({exc})") from exc


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
