"""The model card: the one file that says a model directory holds a finished, usable model.

It is written last, after every component's weights and config, so a directory without it is an
unfinished training run. It records what inference must match (version, configs, preprocessing
plan, latent normalisation) and the SHA-256 of every weight and config file, so a corrupted or
modified model is refused instead of silently producing wrong segmentations. The card carries the
SHA-256 of its own content too (``content_sha256``): a hand-edited card is refused like an edited
weight file, so every value a run takes from the card is the value the model was trained with.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from bids_app import __version__
from bids_app.errors import BadDataError, MissingInputError

MODEL_CARD = "model_card.json"
CARD_FORMAT = 1
CONTENT_KEY = "content_sha256"


def content_sha256(card: Mapping[str, Any]) -> str:
    """The digest of a card's content (every key but the digest itself, canonical JSON)."""
    content = {k: v for k, v in card.items() if k != CONTENT_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_model_card(model_dir: Path, card: Mapping[str, Any]) -> Path:
    from bids_app.io import atomic_write_json

    content = json.loads(json.dumps({"format": CARD_FORMAT, "version": __version__, **card}))
    return atomic_write_json(Path(model_dir) / MODEL_CARD, {**content, CONTENT_KEY: content_sha256(content)})


def read_model_card(model_dir: Path) -> dict[str, Any]:
    """The card of a finished model; missing is exit 66, unreadable or incompatible is exit 65."""
    path = Path(model_dir) / MODEL_CARD
    if not path.is_file():
        if Path(model_dir).is_dir() and any(Path(model_dir).iterdir()):
            raise MissingInputError(
                f"the model in {model_dir} is not finished ({MODEL_CARD}, written last, is missing): the group "
                "level is still training or was interrupted; wait for it to end, or rerun it to resume")
        raise MissingInputError(f"no trained model in {model_dir} ({MODEL_CARD} missing): run the group level first")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadDataError(f"{path}: unreadable model card ({exc})") from exc
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise BadDataError(f"{path}: unsupported model card format {card.get('format') if isinstance(card, dict) else '?'}")
    if not compatible(str(card.get("version", "")), __version__):
        raise BadDataError(
            f"{path}: model trained with counterseg {card.get('version')} cannot be used by counterseg "
            f"{__version__}: retrain it with the group level"
        )
    if card.get(CONTENT_KEY) != content_sha256(card):
        raise BadDataError(f"{path}: the model card was modified after training (its content does not match its "
                           f"{CONTENT_KEY}): restore the original card or retrain the model")
    return card


def compatible(model_version: str, app_version: str) -> bool:
    """Same major version (same major and minor while the major is 0)."""
    def parts(version: str) -> tuple[str, ...]:
        numbers = version.split("+")[0].split(".")
        return tuple(numbers[:2] if numbers and numbers[0] == "0" else numbers[:1])

    return bool(model_version) and parts(model_version) == parts(app_version)


def untrained_contrasts(card: Mapping[str, Any], suffixes: Iterable[str]) -> list[str]:
    """The contrasts (BIDS suffixes) among ``suffixes`` that the model was not trained on; a card
    that records none (a model without contrasts, e.g. trained on a plain folder) accepts all."""
    trained = card.get("contrasts")
    if not trained:
        return []
    return sorted(set(suffixes) - set(trained))
