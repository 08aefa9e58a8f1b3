"""What a model is trained on and with: the identity that a model directory and every training
checkpoint carry, so that nothing resumes from, or silently replaces, another training.

The identity holds the settings that shape a model (preset, preprocessing, training, architecture,
the calibrated segmentation settings, the seed) and the content digest of every training file (image
and masks). The group level stores it in the model directory before the first stage
(``training_identity.json``) and in the model card at the end. A rerun compares:

- a finished model (its card exists) whose identity differs is refused (exit 64) unless ``--retrain``;
  an identical one is left untouched: there is nothing to train;
- an unfinished model or a checkpoint resumes only when everything but the budget agrees (a longer
  budget continues a run), and is refused otherwise (exit 64, naming what differs).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from bids_app.bids.layout import TrainingSelection
from bids_app.errors import BadDataError, UsageError
from bids_app.io import atomic_write_json
from bids_app.settings import RunSettings, settings_to_dict
from bids_app.settings.fields import calibrated_values, flatten

log = logging.getLogger(__name__)

IDENTITY_FILE = "training_identity.json"
#: Stage settings that say how long and how loudly a stage trains, not what it learns: a rerun may
#: change them to continue an unfinished training.
BUDGET_KEYS = ("max_steps", "max_time_s", "checkpoint_every", "log_every", "figure_every")
#: Training settings that choose what this run does, not what a model is.
RUN_KEYS = ("stages", "retrain")
_MAX_LISTED = 8


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def training_identity(settings: RunSettings, selection: TrainingSelection) -> dict[str, Any]:
    """The settings that shape the model and the digests of the files it is trained on (JSON-ready)."""
    training = {k: v for k, v in settings_to_dict(settings.training).items() if k not in RUN_KEYS}
    preprocessing = settings_to_dict(settings.preprocessing)
    preprocessing.pop("max_nonfinite_fraction")  # how many NaN voxels to tolerate is each run's choice
    data: dict[str, dict[str, str]] = {}
    for record in selection.images:
        files = {"image": record.image, "cord_mask": record.cord_mask, "control": record.control_mask}
        data[record.relpath] = {role: file_sha256(path) for role, path in files.items() if path is not None}
    return {
        "settings": {
            "preset": settings.preset,
            "preprocessing": preprocessing,
            "training": training,
            "models": settings_to_dict(settings.models),
            "segmentation": calibrated_values(settings.segmentation),
            "seed": settings.compute.seed,
        },
        "data": data,
        # A plain folder of images names no contrast ("unknown"): such a model accepts every contrast.
        "contrasts": sorted({record.suffix for record in selection.images} - {"unknown"}),
    }


def without_budget(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity less the stages' budgets (what may change while a training continues)."""
    copy = json.loads(json.dumps(identity))
    for stage in copy.get("settings", {}).get("training", {}).values():
        if isinstance(stage, dict):
            for key in BUDGET_KEYS:
                stage.pop(key, None)
    return copy


def differences(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two identities (``setting: then -> now``, file changes)."""
    lines = []
    old, new = flatten(then.get("settings", {})), flatten(now.get("settings", {}))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}")
    old_data, new_data = then.get("data", {}), now.get("data", {})
    lines += [f"training image removed: {name}" for name in sorted(old_data.keys() - new_data.keys())]
    lines += [f"training image added: {name}" for name in sorted(new_data.keys() - old_data.keys())]
    for name in sorted(old_data.keys() & new_data.keys()):
        changed = sorted(role for role in old_data[name].keys() | new_data[name].keys()
                         if old_data[name].get(role) != new_data[name].get(role))
        if changed:
            lines.append(f"training file content differs: {name} ({', '.join(changed)})")
    for key in sorted(then.keys() - {"settings", "data"} | now.keys() - {"settings", "data"}):
        if then.get(key) != now.get(key):
            lines.append(f"{key} differs")
    return lines


def describe_differences(lines: Iterable[str]) -> str:
    lines = list(lines)
    shown = "; ".join(lines[:_MAX_LISTED])
    return shown + (f"; and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else "")


def read_identity(path: Path) -> dict[str, Any] | None:
    """A stored identity, or None where there is none."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadDataError(f"{path}: unreadable training identity ({exc})") from exc
    if not isinstance(stored, dict):
        raise BadDataError(f"{path}: not a training identity")
    return stored


def check_resumable(path: Path, identity: Mapping[str, Any], what: str) -> None:
    """Refuse (exit 64) to continue from ``path``'s training when anything but the budget differs."""
    stored = read_identity(path)
    if stored is None:
        return
    changed = differences(without_budget(stored), without_budget(identity))
    if changed:
        raise UsageError(f"{what} was made by another training ({path}): {describe_differences(changed)}; "
                         "rerun with the settings and data it was made with, or --retrain to start afresh "
                         "(it is replaced), or another --model-dir")


def record_identity(path: Path, identity: Mapping[str, Any]) -> None:
    atomic_write_json(path, identity)


def stored_settings(model_dir: Path) -> dict[str, Any] | None:
    """The settings a model directory was (or is being) trained with, as overrides for a rerun that
    gives neither ``--preset`` nor ``--config``; None when the directory has none."""
    from bids_app.model_card import MODEL_CARD

    card_path = Path(model_dir) / MODEL_CARD
    stored = None
    if card_path.is_file():
        try:
            stored = json.loads(card_path.read_text(encoding="utf-8")).get("training_identity")
        except (OSError, json.JSONDecodeError, AttributeError):
            stored = None  # the card's own check reports it when the model is loaded
    stored = stored or read_identity(Path(model_dir) / IDENTITY_FILE)
    if not stored or "settings" not in stored:
        return None
    settings = stored["settings"]
    overrides = {key: settings[key] for key in ("preset", "preprocessing", "training", "models", "segmentation")
                 if key in settings}
    if "seed" in settings:
        overrides["compute"] = {"seed": settings["seed"]}
    return overrides


def _shown(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def model_is_current(model_dir: Path, identity: Mapping[str, Any], retrain: bool) -> bool:
    """Whether the group level has nothing to train: the model in ``model_dir`` is finished and was
    trained with exactly this identity. A finished model trained otherwise is never modified without
    ``--retrain`` (exit 64 naming the differences); an unfinished one continues only when everything
    but the budget agrees."""
    from bids_app.model_card import MODEL_CARD, read_model_card

    model_dir = Path(model_dir)
    if retrain:
        if (model_dir / MODEL_CARD).is_file():
            log.warning("--retrain: the finished model in %s is trained again and replaced", model_dir)
        return False
    if not (model_dir / MODEL_CARD).is_file():
        check_resumable(model_dir / IDENTITY_FILE, identity, f"the unfinished model in {model_dir}")
        return False
    stored = read_model_card(model_dir).get("training_identity")
    if not isinstance(stored, dict):
        raise UsageError(f"the finished model in {model_dir} does not record what it was trained on and with, so "
                         "a rerun cannot tell whether it would change it: it is never modified without --retrain "
                         "(it is replaced); or use another --model-dir")
    changed = differences(stored, identity)
    if changed:
        raise UsageError(f"the finished model in {model_dir} was trained with other settings or data: "
                         f"{describe_differences(changed)}; a finished model is never modified without --retrain "
                         "(it is replaced); rerun with its settings (a rerun without --preset and --config uses "
                         "them) or use another --model-dir")
    return True
