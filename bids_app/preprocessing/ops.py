"""Small invertible preprocessing ops, MONAI style: forward returns a record, inverse consumes it.

Each op's ``forward`` takes a :class:`Volume` (an image, its masks and the grid's affine) and
returns the transformed volume plus an :class:`OpRecord` holding everything its ``inverse`` needs,
as JSON-native values. ``inverse`` is a static function of (array, record params, kind), so a trace
read back from disk can be inverted without the plan or the op objects that produced it.

The ops are pure: no I/O and no logging. Anything worth a warning (a flat image, a cord cut by the
crop window) is a flag in the record, and the pipeline, which knows the file name, reports it.

Array kinds on the inverse path:
  * ``image``: intensities; resampled with the recorded spline order, de-normalised.
  * ``probability``: a continuous map in [0, 1]; resampled linearly.
  * ``mask``: resampled exactly like a probability; thresholding happens once, at the very end of
    the inverse (nnU-Net: resample the continuous map first, threshold after), see ``Trace``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

KINDS = ("image", "probability", "mask")
MASK_THRESHOLD = 0.5  # a resampled mask value >= this is inside
BACKGROUND = -1.0  # normalised value of the low percentile: the pad value of model-space images
RAS_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


@dataclass(frozen=True)
class OpRecord:
    """What one forward op did: its name and JSON-native parameters for the inverse."""

    op: str
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "params": self.params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OpRecord":
        return cls(op=str(data["op"]), params=dict(data["params"]))


@dataclass(frozen=True, eq=False)
class Volume:
    """An image, masks on the same grid, the grid's voxel -> world affine, and its real voxels.

    ``valid`` is True where a voxel holds image data (False on padding); it travels with the
    image through every op so that later statistics never see padded voxels.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    affine: np.ndarray
    valid: np.ndarray

    @classmethod
    def from_arrays(cls, image: np.ndarray, affine: np.ndarray,
                    masks: Mapping[str, np.ndarray] | None = None) -> "Volume":
        """A freshly loaded volume: every voxel is real."""
        return cls(image=np.asarray(image, dtype=np.float32),
                   masks={k: np.asarray(m, dtype=np.uint8) for k, m in (masks or {}).items()},
                   affine=np.asarray(affine, dtype=np.float64),
                   valid=np.ones(np.shape(image), dtype=bool))


class Op(Protocol):
    """The interface every preprocessing op implements."""

    name: ClassVar[str]

    def forward(self, vol: Volume) -> tuple[Volume, OpRecord]: ...

    @staticmethod
    def inverse(array: np.ndarray, params: Mapping[str, Any], kind: str) -> np.ndarray: ...


def check_kind(kind: str) -> None:
    """Refuse an unknown array kind early rather than resampling it the wrong way."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --------------------------------------------------------------------------------------------
# Reorient: exact axis permutation and flips to the closest canonical (RAS) voxel order
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reorient:
    """Permute and flip voxel axes so that they run R, A, S (closest canonical; no interpolation).

    An oblique affine stays oblique: only the voxel order changes, so no voxel value is touched.
    """

    name: ClassVar[str] = "reorient"

    def forward(self, vol: Volume) -> tuple[Volume, OpRecord]:
        ornt = io_orientation(vol.affine)
        if not np.all(np.isfinite(ornt)):
            raise ValueError("affine has no unambiguous axis orientation")
        shape = vol.image.shape

        def apply(arr: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(apply_orientation(arr, ornt))

        out = Volume(image=apply(vol.image), masks={k: apply(m) for k, m in vol.masks.items()},
                     affine=vol.affine @ inv_ornt_aff(ornt, shape), valid=apply(vol.valid))
        return out, OpRecord(self.name, {"ornt": ornt.tolist(), "in_shape": list(shape)})

    @staticmethod
    def inverse(array: np.ndarray, params: Mapping[str, Any], kind: str) -> np.ndarray:
        back = ornt_transform(RAS_ORNT, np.asarray(params["ornt"], dtype=float))
        out = np.ascontiguousarray(apply_orientation(array, back))
        if list(out.shape) != list(params["in_shape"]):
            raise ValueError(f"reorient inverse gave shape {out.shape}, expected {params['in_shape']}")
        return out


# --------------------------------------------------------------------------------------------
# Resample: target spacing along the voxel axes, field of view centred
# --------------------------------------------------------------------------------------------


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Length in mm of one step along each voxel axis (column norms; right for oblique too)."""
    return np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))


def resampled_grid(shape: tuple[int, ...], zooms: np.ndarray,
                   spacing: tuple[float, ...]) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """New shape and the index map ``old = scale * new + offset`` of a centred resampling.

    The new shape is the old field of view divided by the new spacing, rounded half up (a 1e-6
    slack keeps float noise in the zooms from rounding 12.4999999 down). The grid
    centres coincide exactly, so the rounding residual (< half a new voxel) is split evenly over
    both ends instead of all landing on one side, as left-edge alignment
    ``old = (new + 0.5) * t / z - 0.5`` would do; the two agree when the FOV divides exactly.
    """
    n_old = np.asarray(shape, dtype=float)
    scale = np.asarray(spacing, dtype=float) / np.asarray(zooms, dtype=float)
    n_new = np.maximum(1, np.floor(n_old / scale + 0.5 + 1e-6)).astype(int)
    offset = (n_old - 1) / 2 - scale * (n_new - 1) / 2
    return tuple(int(n) for n in n_new), scale, offset


def index_affine(scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """4x4 map from new voxel indices to old ones: ``old = diag(scale) @ new + offset``."""
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = offset
    return m


def sample_grid(array: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                out_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Sample ``array`` at ``scale * j + offset`` for every index j of ``out_shape`` (float32).

    Edges extend by the nearest voxel: the centred grid may reach up to half a voxel past the old
    field of view, and zero-filling there would invent a dark rim.
    """
    if tuple(out_shape) == array.shape and np.all(scale == 1) and np.all(offset == 0):
        return np.asarray(array, dtype=np.float32).copy()
    out = ndimage.affine_transform(np.asarray(array, dtype=np.float64), scale, offset=offset,
                                   output_shape=tuple(out_shape), order=order, mode="nearest",
                                   prefilter=order > 1)
    return out.astype(np.float32)


@dataclass(frozen=True)
class Resample:
    """Resample to ``target_spacing`` (mm, RAS voxel-axis order) keeping the FOV centred.

    Images use spline ``image_order``; masks nearest neighbour, or linear followed by the 0.5
    threshold, so a mask never leaves this op fractional.
    """

    target_spacing: tuple[float, float, float]
    image_order: int = 1
    mask_interpolation: str = "nearest"
    name: ClassVar[str] = "resample"

    def forward(self, vol: Volume) -> tuple[Volume, OpRecord]:
        shape = vol.image.shape
        out_shape, scale, offset = resampled_grid(shape, voxel_sizes(vol.affine), self.target_spacing)

        def mask(arr: np.ndarray) -> np.ndarray:
            order = 0 if self.mask_interpolation == "nearest" else 1
            return (sample_grid(arr, scale, offset, out_shape, order) >= MASK_THRESHOLD).astype(arr.dtype)

        out = Volume(image=sample_grid(vol.image, scale, offset, out_shape, self.image_order),
                     masks={k: mask(m) for k, m in vol.masks.items()},
                     affine=vol.affine @ index_affine(scale, offset),
                     valid=mask(vol.valid))
        return out, OpRecord(self.name, {
            "in_shape": list(shape), "out_shape": list(out_shape), "scale": scale.tolist(),
            "offset": offset.tolist(), "image_order": int(self.image_order)})

    @staticmethod
    def inverse(array: np.ndarray, params: Mapping[str, Any], kind: str) -> np.ndarray:
        scale = np.asarray(params["scale"], dtype=float)
        offset = np.asarray(params["offset"], dtype=float)
        order = int(params["image_order"]) if kind == "image" else 1
        # Invert old = scale * new + offset: new = old / scale - offset / scale.
        return sample_grid(array, 1.0 / scale, -offset / scale, tuple(params["in_shape"]), order)


# --------------------------------------------------------------------------------------------
# Normalise: per-image percentiles -> [-1, 1]
# --------------------------------------------------------------------------------------------


def intensity_range(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float, bool]:
    """(low, high, flat): the percentile range, widened so that it never has zero width.

    A degenerate percentile range (e.g. a mostly constant image) falls back to min/max; a truly
    flat image gets ``high = low + 1`` so the map stays invertible; ``flat`` says it happened.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0, 1.0, True
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high > low:
        return low, high, False
    low, high = float(values.min()), float(values.max())
    if high > low:
        return low, high, False
    return low, low + 1.0, True


@dataclass(frozen=True)
class Normalize:
    """Map the ``percentiles`` of the real voxels linearly to [-1, 1], clipping outside."""

    percentiles: tuple[float, float] = (0.5, 99.5)
    name: ClassVar[str] = "normalize"

    def forward(self, vol: Volume) -> tuple[Volume, OpRecord]:
        low, high, flat = intensity_range(vol.image[vol.valid], self.percentiles)
        image = self.scale(vol.image, {"low": low, "high": high})
        image[~vol.valid] = BACKGROUND
        out = Volume(image=image.astype(np.float32), masks=vol.masks, affine=vol.affine, valid=vol.valid)
        return out, OpRecord(self.name, {"low": low, "high": high, "flat": flat,
                                         "percentiles": [float(p) for p in self.percentiles]})

    @staticmethod
    def scale(array: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """The recorded intensity mapping applied to any array (float64): also the source image on
        its own grid, so that residuals can be taken there (``native_intensities``)."""
        low, high = float(params["low"]), float(params["high"])
        return np.clip(2.0 * (np.asarray(array, dtype=np.float64) - low) / (high - low) - 1.0, -1.0, 1.0)

    @staticmethod
    def inverse(array: np.ndarray, params: Mapping[str, Any], kind: str) -> np.ndarray:
        if kind != "image":
            return array
        low, high = float(params["low"]), float(params["high"])
        return ((np.asarray(array, dtype=np.float64) + 1.0) * 0.5 * (high - low) + low).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Crop / pad to the target shape
# --------------------------------------------------------------------------------------------


def bounding_box(mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (first, last) voxel indices of a mask's non-zero voxels, or None if empty."""
    if mask is None or not np.any(mask):
        return None
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0)


def window_start(n: int, t: int, centre: float) -> int:
    """Start index of a length-``t`` window over ``n`` voxels, centred on ``centre`` (half up).

    The window never leaves the image when ``n >= t`` (no needless padding) and never cuts it
    when ``n < t``. Centred on a bbox of L <= t voxels it contains the bbox: the unrounded start
    ``b0 - (t - L) / 2`` rounds into ``[b1 - t + 1, b0]``, and the clamp keeps it there because the
    bbox lies inside the image. So no separate "contain the cord" rule is needed.
    """
    start = int(math.floor(centre - (t - 1) / 2.0 + 0.5))
    low, high = (0, n - t) if n >= t else (n - t, 0)
    return min(max(start, low), high)


def window_slices(in_shape: tuple[int, ...], start: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(source, destination) slices of the overlap between the image and the window."""
    src, dst = [], []
    for n, s, t in zip(in_shape, start, out_shape):
        a, b = max(s, 0), min(s + t, n)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    return tuple(src), tuple(dst)


def take_window(array: np.ndarray, start: tuple[int, ...], out_shape: tuple[int, ...],
                fill: float) -> np.ndarray:
    """The window of ``array`` starting at ``start`` (may be negative), ``fill`` outside it."""
    out = np.full(out_shape, fill, dtype=array.dtype)
    src, dst = window_slices(array.shape, start, out_shape)
    out[dst] = array[src]
    return out


def put_window(array: np.ndarray, start: tuple[int, ...], in_shape: tuple[int, ...],
               fill: float) -> np.ndarray:
    """Inverse of :func:`take_window`: place the window back on the ``in_shape`` grid."""
    out = np.full(in_shape, fill, dtype=array.dtype)
    src, dst = window_slices(in_shape, start, array.shape)
    out[src] = array[dst]
    return out


@dataclass(frozen=True)
class CropPad:
    """Crop and/or pad to ``target_shape``, centred on ``centre_mask``'s bbox (else the image).

    Padding takes ``pad_value`` (the normalised background) in the image, 0 in masks and False in
    ``valid``. The record flags ``cord_cut`` when the mask's bbox is larger than the target.
    With ``cover`` the window grows, along any axis where it would cut the mask's bbox (the whole
    image without a mask), to cover it: inference then slides model-sized windows over all of it.
    """

    target_shape: tuple[int, int, int]
    centre_mask: str | None = "cord"
    pad_value: float = BACKGROUND
    cover: bool = False
    name: ClassVar[str] = "crop_pad"

    def forward(self, vol: Volume) -> tuple[Volume, OpRecord]:
        shape = vol.image.shape
        bbox = bounding_box(vol.masks.get(self.centre_mask) if self.centre_mask else None)
        target = tuple(int(t) for t in self.target_shape)
        if self.cover:
            extent = np.asarray(shape) if bbox is None else bbox[1] - bbox[0] + 1
            target = tuple(max(t, int(e)) for t, e in zip(target, extent))
        centre = (np.asarray(shape) - 1) / 2.0 if bbox is None else (bbox[0] + bbox[1]) / 2.0
        start = tuple(window_start(n, t, float(c)) for n, t, c in zip(shape, target, centre))
        cut_axes = [] if bbox is None else [int(a) for a in np.nonzero(bbox[1] - bbox[0] + 1 > np.asarray(target))[0]]
        cut = bool(cut_axes)
        out = Volume(image=take_window(vol.image, start, target, self.pad_value),
                     masks={k: take_window(m, start, target, 0) for k, m in vol.masks.items()},
                     affine=vol.affine @ index_affine(np.ones(3), np.asarray(start, dtype=float)),
                     valid=take_window(vol.valid, start, target, False))
        return out, OpRecord(self.name, {
            "in_shape": list(shape), "start": list(start), "out_shape": list(target),
            "centred_on": "image" if bbox is None else str(self.centre_mask), "cord_cut": cut,
            "cord_cut_axes": cut_axes})

    @staticmethod
    def inverse(array: np.ndarray, params: Mapping[str, Any], kind: str) -> np.ndarray:
        fill = BACKGROUND if kind == "image" else 0.0
        return put_window(np.asarray(array, dtype=np.float32), tuple(params["start"]),
                          tuple(params["in_shape"]), fill)


OPS: dict[str, type] = {op.name: op for op in (Reorient, Resample, Normalize, CropPad)}


def inverse_op(record: OpRecord) -> Any:
    """The inverse function of a record's op; an unknown op is a corrupt or foreign trace."""
    try:
        return OPS[record.op].inverse
    except KeyError:
        raise ValueError(f"unknown preprocessing op {record.op!r} in trace") from None
