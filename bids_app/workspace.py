"""The work dir's layout: scratch space that several runs may share (``-w`` on a scratch disk)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def checkpoints_dir(work_dir: Path, model_dir: Path) -> Path:
    """Where the training checkpoints of one model directory live: one folder per model directory, so
    runs sharing a work dir never resume from each other. The folder is named by a digest of the model
    directory's path relative to the work dir: an output folder moved whole (work dir and models
    together, the default layout) keeps its checkpoints."""
    relative = os.path.relpath(Path(model_dir).resolve(), Path(work_dir).resolve())
    return Path(work_dir) / "checkpoints" / hashlib.sha256(relative.encode()).hexdigest()[:12]
