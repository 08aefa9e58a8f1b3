"""From an anomaly map to a binary lesion mask and a per-lesion table.

Conventions (shared with :mod:`bids_app.segmentation.metrics`):

* a voxel is lesion when its residual is strictly greater than the threshold, inside the
  analysis region (so ``1 - quantile`` of healthy voxels pass, see ``calibration``);
* lesions are 26-connected components (face, edge and corner neighbours): small lesions on
  anisotropic or oblique grids often touch only diagonally, and splitting them would count one
  lesion several times and drop its parts as "too small";
* lesion volume = voxel count x voxel volume (mm^3);
* with a ``grow_threshold`` (hysteresis, as in Canny's edge detector) a lesion found at the
  threshold is extended over the connected voxels above the lower ``grow_threshold``: the
  threshold decides *whether* an image has a lesion (so the healthy false-positive rate is the
  threshold's), the lower one *how far* it reaches. A counterfactual removes a lesion's core
  better than its faint margin, so the threshold alone keeps only cores (docs/benchmarks.md).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

# The lesion table's columns are declared with their sidecar descriptions (format_tsv_value: re-exported).
from bids_app.bids.tables import LESION_COLUMNS, format_tsv_value, tsv_text, write_lesion_sidecar  # noqa: F401
from bids_app.io import atomic_write_text
from bids_app.segmentation.residuals import check_spacing

logger = logging.getLogger(__name__)

#: 26-connectivity structuring element for 3D component labelling.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a binary 3D mask: (labels, count)."""
    mask = np.asarray(mask) > 0
    if mask.ndim != 3:
        raise ValueError(f"lesion masks are 3D, got {mask.ndim} dimensions")
    labels, count = ndimage.label(mask, structure=CONNECTIVITY_26)
    return labels, int(count)


def remove_small_components(
    mask: np.ndarray, spacing_mm: Sequence[float], min_volume_mm3: float
) -> np.ndarray:
    """Drop 26-connected components whose volume is below ``min_volume_mm3`` (equal is kept)."""
    labels, count = label_components(mask)
    if count == 0 or min_volume_mm3 <= 0:
        return labels > 0
    voxel_volume = math.prod(check_spacing(spacing_mm, 3))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # Compare voxel counts, not float volumes, with a tolerance so 10 x 0.5 mm^3 counts as 5 mm^3.
    min_voxels = min_volume_mm3 / voxel_volume * (1.0 - 1e-9)
    keep = sizes >= min_voxels
    keep[0] = False
    removed = int(count - keep[1:].sum())
    if removed:
        logger.debug("removed %d of %d lesion(s) below %.3g mm^3", removed, count, min_volume_mm3)
    return keep[labels]


def grow_lesions(seeds: np.ndarray, residual: np.ndarray, region: np.ndarray, grow_threshold: float) -> np.ndarray:
    """The seeds, extended over the 26-connected voxels of ``region`` with ``residual >
    grow_threshold`` that reach them; components of that lower mask without a seed are dropped."""
    seeds = np.asarray(seeds) > 0
    candidates = ((np.asarray(residual) > grow_threshold) & np.asarray(region, dtype=bool)) | seeds
    labels, _ = label_components(candidates)
    reached = np.unique(labels[seeds])
    return np.isin(labels, reached[reached > 0])


def lesion_mask(
    residual: np.ndarray,
    region: np.ndarray,
    threshold: float,
    spacing_mm: Sequence[float],
    min_lesion_mm3: float,
    grow_threshold: float | None = None,
    grow_residual: np.ndarray | None = None,
    detection_region: np.ndarray | None = None,
) -> np.ndarray:
    """Binary (uint8) lesion mask: ``residual > threshold`` in ``region``, then clean-up, then
    (with ``grow_threshold`` below the threshold) each lesion grown over its connected voxels
    above ``grow_threshold`` (:func:`grow_lesions`; the module doc says why).

    ``grow_residual``: the map lesions grow over, when it is not ``residual`` (the app's is the
    unsmoothed residual: the median filter that keeps healthy specks from becoming lesions also
    rounds off a lesion's edges); ``grow_threshold`` is then on its scale and always applies.

    ``detection_region`` (a part of ``region``; default all of it): where the threshold finds
    lesions (:func:`~bids_app.segmentation.residuals.detection_region`); they grow within ``region``.

    Growth comes after the size filter: it never creates a lesion, so an image has one exactly when it has one
    without growth (:func:`lesion_free_threshold` holds for both).
    """
    residual = np.asarray(residual)
    region = np.asarray(region, dtype=bool)
    if region.shape != residual.shape:
        raise ValueError(f"region has shape {region.shape}, residual has {residual.shape}")
    check_spacing(spacing_mm, residual.ndim)
    seeds_in = region
    if detection_region is not None:
        seeds_in = np.asarray(detection_region, dtype=bool)
        if seeds_in.shape != residual.shape:
            raise ValueError(f"detection_region has shape {seeds_in.shape}, residual has {residual.shape}")
        seeds_in = seeds_in & region
    mask = (residual > threshold) & seeds_in
    mask = remove_small_components(mask, spacing_mm, min_lesion_mm3)
    if grow_residual is not None:
        grow_residual = np.asarray(grow_residual)
        if grow_residual.shape != residual.shape:
            raise ValueError(f"grow_residual has shape {grow_residual.shape}, residual has {residual.shape}")
        if grow_threshold is not None and mask.any():
            mask = grow_lesions(mask, grow_residual, region, grow_threshold)
    elif grow_threshold is not None and grow_threshold < threshold and mask.any():
        mask = grow_lesions(mask, residual, region, grow_threshold)
    return mask.astype(np.uint8)


def lesion_free_threshold(
    residual: np.ndarray,
    region: np.ndarray,
    spacing_mm: Sequence[float],
    min_lesion_mm3: float,
) -> float:
    """The lowest threshold at which :func:`lesion_mask` finds no lesion in this (healthy) image:
    the score of its most lesion-like false positive, after the same clean-up as at inference.

    Found by bisection over the distinct in-region scores (the mask only shrinks as the
    threshold rises); an empty region gives -inf.
    """
    region = np.asarray(region, dtype=bool)
    values = np.unique(np.asarray(residual)[region])
    if values.size == 0:
        return float("-inf")

    def empty(threshold: float) -> bool:
        return not lesion_mask(residual, region, threshold, spacing_mm, min_lesion_mm3).any()

    if empty(float(values[0]) - 1.0):
        return float(values[0]) - 1.0  # no component is large enough even with every voxel in
    low, high = 0, values.size - 1  # empty(values[high]) holds: nothing lies above the maximum
    while low < high:
        middle = (low + high) // 2
        if empty(float(values[middle])):
            high = middle
        else:
            low = middle + 1
    return float(values[low])


def lesion_table(mask: np.ndarray, scores: np.ndarray | None, affine: np.ndarray) -> list[dict[str, Any]]:
    """One row per 26-connected lesion of ``mask``, largest first (ties: first in voxel order).

    Works on any grid (model or native space): volumes use ``|det(affine[:3, :3])|`` and
    centroids (mean voxel centre) are mapped to world mm through ``affine``. ``scores`` (same
    shape, e.g. the probability map) gives max/mean per lesion; NaN when None.
    """
    mask = np.asarray(mask)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got {affine.shape}")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != mask.shape:
            raise ValueError(f"scores have shape {scores.shape}, mask has {mask.shape}")
    voxel_volume = abs(float(np.linalg.det(affine[:3, :3])))
    labels, count = label_components(mask)
    if count == 0:
        return []
    ids = np.arange(1, count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(labels > 0, labels, ids), dtype=np.float64)
    centroids = centroids.reshape(count, 3)
    world = centroids @ affine[:3, :3].T + affine[:3, 3]
    if scores is not None:
        maxima = np.asarray(ndimage.maximum(scores, labels, ids), dtype=np.float64).reshape(count)
        means = np.asarray(ndimage.mean(scores, labels, ids), dtype=np.float64).reshape(count)
    else:
        maxima = means = np.full(count, np.nan)
    order = np.argsort(-sizes, kind="stable")
    rows = []
    for rank, k in enumerate(order, start=1):
        rows.append({
            "index": rank,
            "volume_mm3": float(sizes[k] * voxel_volume),
            "centroid_x_mm": float(world[k, 0]),
            "centroid_y_mm": float(world[k, 1]),
            "centroid_z_mm": float(world[k, 2]),
            "max_score": float(maxima[k]),
            "mean_score": float(means[k]),
            "n_voxels": int(sizes[k]),
            "vertebral_level": None,  # known only from disc labels: segmentation.vertebrae
        })
    return rows


def write_lesion_tsv(path: str | Path, rows: Sequence[dict[str, Any]], levels_from: str | None = None) -> Path:
    """Write the lesion table (header always, also when there is no lesion) and its JSON sidecar,
    each atomically; ``levels_from``: the BIDS URI of the disc labels the vertebral levels come from."""
    write_lesion_sidecar(path, levels_from)
    return atomic_write_text(path, tsv_text(tuple(LESION_COLUMNS), rows))
