"""Each lesion's vertebral level, from a disc-label derivative or a cord segmentation labelled by level.

Both use the Spinal Cord Toolbox's numbering (1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5), told apart by how
many voxels carry each value:

* **disc labels** (spine-generic's ``_labels-disc-manual``, SCT's ``_seg_labeled_discs``): one voxel
  (or a small blob) per value at the posterior tip of a disc, value n marking the disc above vertebra n
  (3 = C2/C3). Vertebra n lies between discs n and n + 1: a lesion is at level n when its centroid,
  projected onto the segment from disc n + 1 to disc n, falls within it (both discs labelled; at a bend
  where two segments take it, the nearer one). Projecting onto the segment follows the spine's curve and
  needs no assumption about which world axis is inferior-superior.
* **level labels** (SCT's ``_seg_labeled``): every cord voxel holds its vertebral level; a lesion gets the
  level of the labelled voxel nearest its centroid, if that voxel is within one voxel diagonal of it.

Anywhere else (outside the labelled levels, a disc missing) the level is unknown (None, ``n/a`` in the TSV).
A label image that cannot be read gives unknown levels with a warning: the level is an annotation, and
the segmentation it annotates stands without it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.bids.tables import VERTEBRAL_LEVELS

log = logging.getLogger(__name__)

#: At most this many voxels per value: disc labels (points); more: a cord segmentation labelled by level.
POINT_VOXELS = 27
_LAST_LEVEL = max(int(n) for n in VERTEBRAL_LEVELS)
_LAST_DISC = _LAST_LEVEL + 1  # the disc below the last vertebra (L5/S1) closes its interval


@dataclass(frozen=True)
class VertebralLabels:
    """Disc positions (``discs``: value -> world position in mm), or labelled voxels (``points``, world
    mm, with their ``levels``) and the largest distance a centroid may lie from them (``reach_mm``)."""

    discs: dict[int, np.ndarray]
    points: np.ndarray
    levels: np.ndarray
    reach_mm: float

    @property
    def are_discs(self) -> bool:
        return bool(self.discs)


def read_vertebral_labels(path: str | Path) -> VertebralLabels:
    """Disc or level labels from a NIfTI image (see the module doc for which is which)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise ValueError(f"expected a 3D label image, got shape {data.shape}")
    values = np.where(np.isfinite(data), np.rint(data), 0).astype(np.int64)
    ijk = np.argwhere((values >= 1) & (values <= _LAST_DISC))
    labels = values[tuple(ijk.T)]
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    counts = np.bincount(labels, minlength=_LAST_DISC + 1)
    if labels.size and counts.max() <= POINT_VOXELS:
        discs = {int(v): world[labels == v].mean(axis=0) for v in np.unique(labels)}
        return VertebralLabels(discs, np.empty((0, 3)), np.empty(0, np.int64), 0.0)
    keep = labels <= _LAST_LEVEL
    reach = float(np.linalg.norm(img.affine[:3, :3] @ np.ones(3)))  # a voxel's diagonal
    return VertebralLabels({}, world[keep], labels[keep], reach)


def level_at(labels: VertebralLabels, centroid_mm: Sequence[float]) -> int | None:
    """The vertebral level of a point in world mm, or None where the labels do not tell."""
    point = np.asarray(centroid_mm, dtype=np.float64)
    if not np.all(np.isfinite(point)):
        return None
    if labels.are_discs:
        return _between_discs(labels.discs, point)
    if labels.levels.size == 0:
        return None
    distances = np.linalg.norm(labels.points - point, axis=1)
    nearest = int(np.argmin(distances))
    return int(labels.levels[nearest]) if distances[nearest] <= labels.reach_mm else None


def _between_discs(discs: dict[int, np.ndarray], point: np.ndarray) -> int | None:
    found = []
    for level in range(1, _LAST_LEVEL + 1):
        if level not in discs or level + 1 not in discs:
            continue
        top, bottom = discs[level], discs[level + 1]
        axis = top - bottom
        length2 = float(axis @ axis)
        if length2 == 0.0:
            continue
        t = float((point - bottom) @ axis) / length2
        if 0.0 <= t <= 1.0:
            found.append((float(np.linalg.norm(point - (bottom + t * axis))), level))
    return min(found)[1] if found else None


def add_vertebral_levels(rows: list[dict[str, Any]], path: str | Path | None) -> list[dict[str, Any]]:
    """Set each lesion row's ``vertebral_level`` from the labels at ``path`` (rows as
    :func:`~bids_app.segmentation.lesions.lesion_table` makes them); unchanged when ``path`` is None."""
    if path is None:
        return rows
    try:
        labels = read_vertebral_labels(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable annotation leaves the levels unknown (module doc)
        log.warning("%s: cannot read the disc labels (%s: %s); vertebral levels are n/a", path, type(exc).__name__, exc)
        return rows
    for row in rows:
        row["vertebral_level"] = level_at(labels, (row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]))
    return rows
