"""Final weights on disk: written atomically with their SHA-256, read back weights-only.

``torch.load(weights_only=True)`` never executes code from a file, and a checksum that differs from
the model card's refuses a corrupted or modified file (exit 65) before it can give wrong results.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Mapping

import torch

from bids_app.errors import BadDataError
from bids_app.io import atomic_write_bytes


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Final weights only (what inference needs); returns their SHA-256 for the model card."""
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_weights(path: Path, expected_sha256: str | None = None, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load final weights, refusing a file whose checksum differs from the model card's."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadDataError(f"{path}: cannot read weights ({exc.strerror or exc})") from exc
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BadDataError(f"{path}: checksum mismatch with the model card: the file is corrupted or was modified")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # see load_checkpoint
        raise BadDataError(f"{path}: not loadable as weights-only ({first_line(exc)})") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
