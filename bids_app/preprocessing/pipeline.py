"""Native NIfTI -> model-space volume (with a trace) and back: the preprocessing entry points.

Forward, in this order: load (checks, scaling, non-finite repair), reorient to RAS, resample to
the plan's spacing, normalise intensities, crop/pad to the plan's shape. Each op records what it
did in the :class:`Trace`; :func:`to_native` replays the records backwards onto the source grid.
Everything a user can get wrong about an input file is a :class:`BadDataError` naming the file.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np

from bids_app.errors import BadDataError
from bids_app.preprocessing.ops import CropPad, Normalize, Op, Reorient, Resample, Volume
from bids_app.preprocessing.plan import PreprocessingPlan
from bids_app.preprocessing.trace import SourceGeometry, Trace

logger = logging.getLogger(__name__)

CORD = "cord"  # the mask name that centres the crop window
AFFINE_ATOL_MM = 1e-4  # masks written by other tools carry float32-rounded affines
#: Plausible voxel sizes of spinal-cord MRI; outside, the header is wrong (often its units), and
#: resampling a 100 mm grid to 1 mm would ask for 10^6 times the memory.
VOXEL_MM_RANGE = (0.01, 20.0)
#: Largest input grid loaded (2^28 voxels: 1 GiB as float32, several copies while preprocessing).
MAX_INPUT_VOXELS = 2 ** 28


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """A model-space volume: image in [-1, 1], 0/1 masks, real-voxel flags, trace and affine."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    valid: np.ndarray
    trace: Trace
    affine: np.ndarray
    #: The source image on its own grid in model intensity units (the plan's normalisation, no
    #: resampling): residuals are taken against it, at the image's own resolution.
    native: np.ndarray


# --------------------------------------------------------------------------------------------
# Loading and checks
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file (header only), or raise BadDataError naming it."""
    try:
        return nib.load(str(path))
    except FileNotFoundError as exc:
        raise BadDataError(f"{path}: file not found") from exc
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise BadDataError(f"{path}: cannot read NIfTI image ({exc})") from exc


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3D grid of an image; trailing singleton dimensions (one volume) are dropped."""
    if len(shape) > 3:
        volumes = int(np.prod(shape[3:]))
        if volumes != 1:
            raise BadDataError(f"{path}: {len(shape)}D image with {volumes} volumes; "
                               "counterseg needs a 3D image")
    if len(shape) < 3:
        raise BadDataError(f"{path}: {len(shape)}D image (shape {tuple(shape)}); counterseg needs a 3D image")
    if min(shape[:3]) < 2:
        raise BadDataError(f"{path}: image has a single voxel along an axis (shape {tuple(shape)}), "
                           "a 2D slice; counterseg needs a 3D image")
    return tuple(int(s) for s in shape[:3])  # type: ignore[return-value]


def check_header(img: nib.spatialimages.SpatialImage, path: Path) -> tuple[int, int, int]:
    """Everything the header alone can show wrong (before any voxel is read): dimensions, grid size,
    voxel sizes, affine. Returns the 3D grid shape."""
    shape = _spatial_shape(tuple(img.shape), path)
    count = int(np.prod(shape))
    if count > MAX_INPUT_VOXELS:
        raise BadDataError(f"{path}: image grid {'x'.join(map(str, shape))} has {count} voxels, more than the "
                           f"{MAX_INPUT_VOXELS} counterseg loads; crop or downsample it first")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise BadDataError(f"{path}: the affine (qform/sform) has non-finite entries")
    _check_voxel_sizes(img, affine, path)
    _check_affine(affine, path)
    return shape


def _raw_pixdim(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """pixdim[1:4] as stored: nibabel silently replaces negative values by their absolute value."""
    from nibabel.openers import ImageOpener

    header = img.header
    try:
        holder = img.file_map.get("header") or img.file_map["image"]  # .nii files have one "image"
        with ImageOpener(holder.filename) as handle:
            return np.asarray(type(header).from_fileobj(handle, check=False)["pixdim"][1:4], dtype=np.float64)
    except Exception:  # an in-memory image or a format without pixdim: the parsed header is all there is
        return np.asarray(header.get_zooms()[:3], dtype=np.float64)


def _check_voxel_sizes(img: nib.spatialimages.SpatialImage, affine: np.ndarray, path: Path) -> None:
    for axis, size in enumerate(_raw_pixdim(img), 1):
        if not size > 0:
            raise BadDataError(f"{path}: voxel size {size:g} mm along axis {axis} (header pixdim[{axis}]) "
                               "is not positive")
    low, high = VOXEL_MM_RANGE
    for axis, size in enumerate(np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0)), 1):
        if size <= 0:
            raise BadDataError(f"{path}: voxel size 0 mm along axis {axis} in the affine (qform/sform)")
        if not low <= size <= high:
            raise BadDataError(f"{path}: voxel size {size:.4g} mm along axis {axis} is outside the plausible "
                               f"range {low:g}-{high:g} mm of spinal-cord MRI (wrong units in the header?)")


def _load_data(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """All voxels as float32 with scl_slope/scl_inter applied, squeezed to 3D."""
    shape = _spatial_shape(tuple(img.shape), path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        truncated = isinstance(exc, EOFError) or "Compressed file ended" in str(exc)
        raise BadDataError(f"{path}: cannot read the voxel data ({'file is truncated' if truncated else exc})") from exc
    return data.reshape(shape)


def _check_affine(affine: np.ndarray, path: Path) -> None:
    """A voxel grid must map to world space invertibly, or no geometry step means anything."""
    if not np.all(np.isfinite(affine)):
        raise BadDataError(f"{path}: the affine (qform/sform) has non-finite entries")
    linear = affine[:3, :3]
    sizes = np.sqrt(np.sum(linear ** 2, axis=0))
    if np.min(sizes) <= 0 or abs(np.linalg.det(linear)) <= 1e-6 * np.prod(sizes):
        raise BadDataError(f"{path}: the affine (qform/sform) is singular; the voxel grid has no "
                           "valid world orientation")


def check_nonfinite(data: np.ndarray, path: Path, max_fraction: float) -> np.ndarray:
    """The NaN/Inf voxels of an image (a boolean array); more than ``max_fraction`` is bad data.

    By default (0) any NaN or infinite voxel is an error naming the file and the count: a silent
    repair would hide a broken reconstruction. ``preprocessing.max_nonfinite_fraction`` lets a
    few be replaced by the background instead, with a warning.
    """
    bad = ~np.isfinite(data)
    count = int(bad.sum())
    if count and (count / data.size > max_fraction or count == data.size):
        n_nan = int(np.isnan(data).sum())
        allowed = (f"at most {max_fraction:.3%} may be replaced by the background" if max_fraction
                   else "none is replaced unless allowed")
        raise BadDataError(
            f"{path}: {count} of {data.size} voxels ({count / data.size:.3%}) are not finite ({n_nan} NaN, "
            f"{count - n_nan} infinite); {allowed} (preprocessing.max_nonfinite_fraction in a --config file)")
    return bad


def _repair_nonfinite(data: np.ndarray, path: Path, plan: PreprocessingPlan) -> int:
    """Replace the (few, allowed) NaN/Inf voxels by the background (low-percentile) value in place."""
    bad = check_nonfinite(data, path, plan.max_nonfinite_fraction)
    count = int(bad.sum())
    if count == 0:
        return 0
    fill = float(np.percentile(data[~bad], plan.percentiles[0]))
    data[bad] = fill
    logger.warning("%s: replaced %d NaN/infinite voxel(s) by the background value %.4g", path, count, fill)
    return count


def _load_mask(path: Path, name: str, image_path: Path, shape: tuple[int, int, int],
               affine: np.ndarray) -> np.ndarray:
    """A 0/1 uint8 mask on the image's grid; a different grid is bad data, other values warn."""
    img = _read(path)
    check_mask_grid(img, path, name, image_path, shape, affine)
    data = _load_data(img, path)
    binary = (data == 0) | (data == 1)
    if not np.all(binary):
        values = np.unique(data[~binary])
        logger.warning("%s: %s mask has %d voxel(s) with values other than 0 and 1 (e.g. %s); "
                       "binarised at > 0.5", path, name, int((~binary).sum()), values[:3].tolist())
    return (data > 0.5).astype(np.uint8)


def check_mask_grid(img: nib.spatialimages.SpatialImage, path: Path, name: str, image_path: Path,
                    shape: tuple[int, ...], affine: np.ndarray) -> None:
    """A mask must be on its image's grid: same shape and affine (BadDataError otherwise)."""
    mask_shape = tuple(img.shape)
    if len(mask_shape) < 3 or _spatial_shape(mask_shape, path) != tuple(shape):
        raise BadDataError(f"{path}: {name} mask shape {mask_shape} does not match the shape {tuple(shape)} "
                           f"of image {image_path}")
    maffine = np.asarray(img.affine, dtype=np.float64)
    if not np.allclose(maffine, affine, rtol=1e-5, atol=AFFINE_ATOL_MM):
        diff = float(np.max(np.abs(maffine - affine)))
        raise BadDataError(f"{path}: {name} mask affine differs from the affine of image {image_path} "
                           f"(largest difference {diff:.4g}); the mask is not on the image grid")


#: An image narrower than this fraction of the model's window along an axis is refused: the model
#: would see mostly padding. Larger images are fine: the crop keeps the window around the cord.
MIN_FOV_FRACTION = 0.25


def check_field_of_view(img: nib.spatialimages.SpatialImage, path: Path, plan: PreprocessingPlan) -> None:
    """Refuse an image far smaller than the model's field of view (BadDataError)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    sizes = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    world_axis = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    fov = np.zeros(3)
    for axis in range(3):
        fov[world_axis[axis]] = img.shape[axis] * sizes[axis]
    window = np.asarray(plan.target_shape, dtype=float) * np.asarray(plan.target_spacing, dtype=float)
    narrow = [name for name, f, w in zip("RAS", fov, window) if f < MIN_FOV_FRACTION * w]
    if narrow:
        def mm(values: np.ndarray) -> str:
            return "x".join(f"{v:.3g}" for v in values)

        raise BadDataError(f"{path}: field of view {mm(fov)} mm is under a quarter of the model's {mm(window)} mm "
                           f"window along {'/'.join(narrow)}: far too small an image for this model")


def load_voxels(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    """All voxels as a 3D float32 array (scaling applied), or BadDataError for unreadable data."""
    return _load_data(img, path)


# --------------------------------------------------------------------------------------------
# Forward and inverse
# --------------------------------------------------------------------------------------------


def build_ops(plan: PreprocessingPlan, centre_mask: str | None = CORD, cover: bool = False) -> list[Op]:
    """The forward ops of a plan, in the order they run (``cover``: see :class:`CropPad`)."""
    return [
        Reorient(),
        Resample(tuple(plan.target_spacing), plan.image_order, plan.mask_interpolation),  # type: ignore[arg-type]
        Normalize(tuple(plan.percentiles)),  # type: ignore[arg-type]
        CropPad(tuple(plan.target_shape), centre_mask=centre_mask, cover=cover),  # type: ignore[arg-type]
    ]


def _report(trace: Trace, path: Path) -> None:
    """Warn about what the ops flagged, naming the file they flagged it for."""
    for record in trace.records:
        if record.op == Normalize.name and record.params.get("flat"):
            logger.warning("%s: image intensities are flat (%.4g); normalised without contrast",
                           path, record.params["low"])
        if record.op == CropPad.name and record.params.get("cord_cut"):
            # The cord runs the whole superior-inferior length of most images: a cut along S (RAS
            # axis 2) is expected; a cut across the cord (R or A) loses anatomy the model needs.
            across = [a for a in record.params.get("cord_cut_axes", [0]) if a != 2]
            report = logger.warning if across else logger.debug
            report("%s: the cord mask is larger than the target shape %s along %s; the crop cuts it",
                   path, record.params["out_shape"], "/".join("RAS"[a] for a in record.params.get("cord_cut_axes", [])))


def preprocess(image_path: Path, plan: PreprocessingPlan,
               masks: Mapping[str, Path] | None = None, cover: bool = False) -> Preprocessed:
    """Bring a native image (and masks on its grid) into model space, recording a trace.

    The ``"cord"`` mask, when given and not empty, centres the crop window; otherwise the
    window is centred on the image (with a warning for an empty cord mask). With ``cover`` the
    window is at least the plan's shape and covers the whole cord (or image): the volume is then
    processed in model-sized windows (:mod:`bids_app.pipelines.windows`), none of it lost.
    """
    image_path = Path(image_path)
    img = _read(image_path)
    check_header(img, image_path)
    data = _load_data(img, image_path)
    affine = np.asarray(img.affine, dtype=np.float64)
    trace = Trace(SourceGeometry.from_image(img, str(image_path)))
    trace.nonfinite_replaced = _repair_nonfinite(data, image_path, plan)

    mask_arrays = {name: _load_mask(Path(p), name, image_path, data.shape, affine)
                   for name, p in (masks or {}).items()}
    centre_mask: str | None = CORD
    if CORD in mask_arrays and not mask_arrays[CORD].any():
        logger.warning("%s: cord mask %s is empty; the crop is centred on the image centre",
                       image_path, masks[CORD])  # type: ignore[index]
        centre_mask = None

    vol = Volume.from_arrays(data, affine, mask_arrays)
    for op in build_ops(plan, centre_mask, cover):
        vol, record = op.forward(vol)
        trace.push(record)
    crop = trace.records[-1].params
    if centre_mask and CORD in mask_arrays and crop["centred_on"] != CORD:
        logger.warning("%s: the cord mask vanished on resampling to %s mm; crop centred on the image",
                       image_path, plan.target_spacing)
    _report(trace, image_path)
    logger.debug("%s: preprocessed to %s (records: %s)", image_path, vol.image.shape,
                 [r.op for r in trace.records])
    return Preprocessed(image=vol.image, masks=vol.masks, valid=vol.valid, trace=trace, affine=vol.affine,
                        native=native_intensities(data, trace))


def native_intensities(data: np.ndarray, trace: Trace) -> np.ndarray:
    """The source voxels (as loaded, non-finite values repaired) through the trace's intensity ops
    only: what the model-space image is, on the source grid (float32)."""
    out = np.asarray(data, dtype=np.float64)
    for record in trace.records:
        if record.op == Normalize.name:
            out = Normalize.scale(out, record.params)
    return out.astype(np.float32)


def to_native(array: np.ndarray, trace: Trace, kind: str) -> nib.Nifti1Image:
    """Map a model-space array back onto the exact source grid and header geometry.

    ``kind``: ``"image"`` (plan spline order, de-normalised; voxels outside the crop window get
    the low-percentile background, i.e. model value -1), ``"probability"`` (linear, 0 outside),
    ``"mask"`` (linear as a probability, then >= 0.5; 0 outside; uint8).
    """
    return trace.source.to_nifti(trace.inverse(array, kind), kind)
