"""Training checkpoints: atomic, complete (weights, optimisers, scalers, step, RNG states, config),
and loaded with ``torch.load(weights_only=True)`` so a checkpoint can never execute code.

A checkpoint is written to a temporary file and renamed, so a run killed at any moment leaves
either the previous checkpoint or the new one, never a half-written file.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from bids_app.io import atomic_write_bytes
from bids_app.errors import BadDataError
from bids_app.weights import first_line

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random state a training step may draw from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> Path:
    """Serialise to memory, then write atomically."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buffer)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Weights-only loading; a corrupted file or one holding code is refused (BadDataError, 65)."""
    try:
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "refuse this file"
        raise BadDataError(f"{path}: not a loadable weights-only checkpoint ({first_line(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise BadDataError(f"{path}: unknown checkpoint format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__}")
    return payload
