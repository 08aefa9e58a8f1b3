"""The work dir's layout: scratch space that several runs may share (``-w`` on a scratch disk)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def checkpoints_dir(work_dir: Path, model_dir: Path) -> Path:
    """Where the training checkpoints of one model directory live: one folder per model directory
    (named by a digest of its absolute path), so runs sharing a work dir never resume from each other."""
    key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12]
    return Path(work_dir) / "checkpoints" / key
