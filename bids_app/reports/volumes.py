"""The arrays a QC figure shows, on one grid, oriented for display, cropped and sliced around the cord.

Every output is on the source image's native grid, whatever its orientation (PSR, LIA, ...), so all
arrays of an image are reoriented the same way to the closest RAS axes: then index 0 is left-right
(sagittal slices), 1 posterior-anterior, 2 inferior-superior (axial slices) for every image. The crop
follows SCT's QC: the cord mask's extent plus a margin, so that a 2 cm cord is not lost in a 30 cm
field of view. Pure numpy/nibabel, no plotting.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bids_app.reports.outputs import ImageOutputs

log = logging.getLogger(__name__)

#: Margin around the cord mask: in-plane (left-right, anterior-posterior) and along the cord.
MARGIN_MM = (8.0, 8.0, 2.0)


@dataclass(frozen=True)
class Volumes:
    """One image's outputs (and inputs when reachable) in RAS voxel order, cropped to ``box``."""

    original: np.ndarray | None
    counterfactual: np.ndarray | None
    anomaly: np.ndarray
    mask: np.ndarray  # bool
    truth: np.ndarray | None  # bool
    cord: np.ndarray | None  # bool
    zooms: tuple[float, float, float]
    crop_source: str  # "cord mask", "analysis region" or "whole image"
    ornt: np.ndarray  # native -> RAS reorientation, to load more arrays (the sweep) the same way
    native_shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]  # the crop, in RAS voxel indices

    def load_like(self, path: Path, what: str) -> np.ndarray | None:
        """Another array on this image's grid (a sweep output), reoriented and cropped the same way."""
        data = load_array(path, what, self.native_shape, self.ornt)
        return data[self.box] if data is not None else None

    @property
    def background(self) -> np.ndarray:
        """What overlays are drawn on: the original, or the counterfactual when the raw image is gone."""
        if self.original is not None:
            return self.original
        if self.counterfactual is not None:
            return self.counterfactual
        return np.zeros(self.anomaly.shape, np.float32)

    @property
    def lesion_voxels(self) -> np.ndarray:
        """Predicted or true lesion voxels: the slices a reader wants to see."""
        return self.mask | self.truth if self.truth is not None else self.mask


def load_volumes(image: ImageOutputs) -> Volumes:
    """Load, reorient and crop every array of one image (an array whose grid differs is left out)."""
    import nibabel as nib

    reference = nib.load(str(image.probseg))
    ornt = nib.orientations.io_orientation(reference.affine)
    shape = reference.shape[:3]
    native_zooms = reference.header.get_zooms()[:3]
    zooms = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        zooms[int(target)] = float(native_zooms[axis])

    def load(path: Path | None, what: str) -> np.ndarray | None:
        return load_array(path, what, shape, ornt) if path is not None else None

    anomaly = load(image.probseg, "anomaly map")
    mask = load(image.mask, "lesion mask")
    assert anomaly is not None and mask is not None  # same grid as themselves
    truth, cord = load(image.truth, "ground truth"), load(image.cord_mask, "cord mask")
    arrays = {
        "original": load(image.image, "original image"),
        "counterfactual": load(image.counterfactual if image.counterfactual.is_file() else None, "counterfactual"),
        "anomaly": anomaly, "mask": mask > 0.5,
        "truth": truth > 0.5 if truth is not None else None,
        "cord": cord > 0.5 if cord is not None else None,
    }
    box, source = crop_box(arrays["cord"], arrays["anomaly"] > 0, tuple(zooms))
    cropped = {k: (v[box] if v is not None else None) for k, v in arrays.items()}
    return Volumes(zooms=(zooms[0], zooms[1], zooms[2]), crop_source=source, ornt=ornt,
                   native_shape=(int(shape[0]), int(shape[1]), int(shape[2])), box=box, **cropped)


def load_array(path: Path, what: str, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray | None:
    """A 3D float32 array reoriented by ``ornt``; None (with a warning) when its grid differs."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != tuple(shape):
        log.warning("%s %s: shape %s differs from the outputs' %s; not shown", what, path, data.shape, tuple(shape))
        return None
    return np.ascontiguousarray(nib.orientations.apply_orientation(np.nan_to_num(data), ornt), dtype=np.float32)


def crop_box(cord: np.ndarray | None, region: np.ndarray, zooms: Sequence[float],
             margin_mm: Sequence[float] = MARGIN_MM) -> tuple[tuple[slice, slice, slice], str]:
    """Bounding box of the cord mask (else of the analysis region) plus ``margin_mm``, clipped."""
    shape = region.shape
    for mask, source in ((cord, "cord mask"), (region, "analysis region")):
        if mask is not None and mask.any():
            box = []
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                hits = np.flatnonzero(mask.any(axis=other))
                pad = int(math.ceil(margin_mm[axis] / max(float(zooms[axis]), 1e-6)))
                box.append(slice(max(int(hits[0]) - pad, 0), min(int(hits[-1]) + 1 + pad, shape[axis])))
            return (box[0], box[1], box[2]), source
    return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])), "whole image"


def slice_range(volumes: Volumes, axis: int) -> tuple[int, int]:
    """Indices along ``axis`` where the cord is (the whole cropped extent without a cord mask)."""
    cord = volumes.cord
    if cord is not None and cord.any():
        hits = np.flatnonzero(cord.any(axis=tuple(a for a in range(3) if a != axis)))
        return int(hits[0]), int(hits[-1])
    return 0, volumes.anomaly.shape[axis] - 1


def lesion_slices(lesions: np.ndarray, axis: int) -> list[int]:
    """Per lesion (26-connected component), the slice along ``axis`` where it is largest."""
    from bids_app.segmentation.lesions import label_components

    if not lesions.any():
        return []
    labels, count = label_components(lesions)
    other = tuple(a for a in range(3) if a != axis)
    wanted = []
    for k in range(1, count + 1):
        area = (labels == k).sum(axis=other)
        wanted.append(int(np.argmax(area)))
    return sorted(set(wanted))


def choose_slices(low: int, high: int, count: int, wanted: Sequence[int] = ()) -> list[int]:
    """``count`` slices spread evenly over [low, high], each wanted slice replacing its nearest
    neighbour, so that every lesion is seen and the cord is still covered end to end."""
    high = max(high, low)
    count = max(1, min(count, high - low + 1))
    grid = [int(round(v)) for v in np.linspace(low, high, count + 2)[1:-1]] if count < high - low + 1 \
        else list(range(low, high + 1))
    wanted = sorted({int(w) for w in wanted if low <= w <= high})
    if len(wanted) > count:
        wanted = [wanted[int(round(i))] for i in np.linspace(0, len(wanted) - 1, count)]
    chosen = list(grid)
    free = set(range(len(grid)))
    for slice_index in wanted:
        if slice_index in chosen:
            free.discard(chosen.index(slice_index))
            continue
        nearest = min(free, key=lambda i: (abs(grid[i] - slice_index), i))
        chosen[nearest] = slice_index
        free.discard(nearest)
    return sorted(set(chosen))


def sagittal(volume: np.ndarray, index: int) -> np.ndarray:
    """A sagittal slice for display: superior up, anterior right."""
    return np.flipud(volume[index].T)


def axial(volume: np.ndarray, index: int) -> np.ndarray:
    """An axial slice for display: anterior up, the patient's left on the left (neurological)."""
    return np.flipud(volume[:, :, index].T)


def strip(volume: np.ndarray, view: str, indices: Sequence[int], gap: int = 1) -> np.ndarray:
    """Slices side by side, separated by ``gap`` columns of NaN (float) or False (bool)."""
    cut = sagittal if view == "sagittal" else axial
    panels = [cut(volume, i) for i in indices]
    fill = False if volume.dtype == bool else np.nan
    spacer = np.full((panels[0].shape[0], gap), fill, dtype=volume.dtype if volume.dtype == bool else np.float32)
    parts: list[np.ndarray] = []
    for panel in panels:
        parts.extend([panel.astype(spacer.dtype), spacer])
    return np.concatenate(parts[:-1], axis=1)


def pixel_spacing(zooms: Sequence[float], view: str) -> tuple[float, float]:
    """(row, column) spacing in mm of a displayed slice."""
    return (zooms[2], zooms[1]) if view == "sagittal" else (zooms[1], zooms[0])


def window(volume: np.ndarray, where: np.ndarray | None = None) -> tuple[float, float]:
    """Grey window: 0.5th to 99.5th percentile (inside ``where`` when given and not empty)."""
    values = volume[where] if where is not None and where.any() else volume
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1.0)


@dataclass(frozen=True)
class Lesion:
    """One predicted lesion (26-connected component) in the cropped RAS arrays, numbered as in the lesion TSV."""

    index: int
    n_voxels: int
    box: tuple[slice, slice, slice]  # its bounding box
    centre: tuple[int, int, int]  # the lesion voxel nearest its centroid: the slices shown through it


def lesion_components(volumes: Volumes) -> list[Lesion]:
    """The predicted lesions, largest first, ties broken by the first voxel in the native voxel order:
    the order (and so the numbers) of ``segmentation.lesions.lesion_table``, whatever the orientation."""
    from scipy import ndimage

    from bids_app.segmentation.lesions import label_components

    labels, count = label_components(volumes.mask)
    found = []
    for k, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:
            continue
        coords = np.argwhere(labels[box] == k) + [s.start for s in box]
        centroid = coords.mean(axis=0)
        centre = coords[int(np.argmin(((coords - centroid) ** 2).sum(axis=1)))]
        first = int(native_flat_indices(volumes, coords).min())
        found.append((-len(coords), first, tuple(box), tuple(int(c) for c in centre), len(coords)))
    found.sort(key=lambda item: (item[0], item[1]))
    return [Lesion(rank, size, box, centre) for rank, (_, _, box, centre, size) in enumerate(found, 1)]


def native_flat_indices(volumes: Volumes, coords: np.ndarray) -> np.ndarray:
    """C-order flat indices, on the native grid, of voxels given in the cropped RAS arrays."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    native = np.zeros_like(coords)
    for axis, (target, flip) in enumerate(np.asarray(volumes.ornt, dtype=int)):
        position = coords[:, target] + volumes.box[target].start
        native[:, axis] = volumes.native_shape[axis] - 1 - position if flip < 0 else position
    return np.ravel_multi_index(native.T, volumes.native_shape)
