"""Training figures: mid-slices of volumes side by side, as PNG, for a user to look at progress."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bids_app.reports.png import montage, to_uint8, write_png


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Sagittal, coronal and axial mid-slices of an RAS volume, oriented for display (up = S/A)."""
    x, y, z = (s // 2 for s in volume.shape)
    return [np.flipud(volume[x].T), np.flipud(volume[:, y].T), np.flipud(volume[:, :, z].T)]


def save_volume_figure(path: Path, volumes: Sequence[torch.Tensor | np.ndarray], zoom: int = 4) -> Path:
    """Rows of volumes (e.g. original, reconstruction), each shown by its three mid-slices, all in
    the model's intensity window [-1, 1]."""
    rows = []
    for volume in volumes:
        array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
        array = array.reshape(array.shape[-3:])
        slices = [np.kron(to_uint8(s, -1.0, 1.0), np.ones((zoom, zoom), np.uint8)) for s in mid_slices(array)]
        rows.append(montage(slices))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows]
    return write_png(path, np.concatenate(padded, axis=0))
