"""The phantom's acquisitions: 3D isotropic sagittal, and 2D thick-slice axial or sagittal.

A thick slice is not a thin slice picked out of a volume: the scanner excites a slab and every voxel
sums the signal across the slice profile, so a lesion or a tissue edge inside the slab is averaged
with its neighbours (partial volume). The phantom therefore draws its anatomy on a fine grid (the
thick axis cut into ``SUBSLICES`` sub-slices) and integrates each slice over a smooth profile before
the noise is added on the acquired grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

#: Sub-slices per thick slice on the fine grid the anatomy is drawn on.
SUBSLICES = 5
#: Width of the profile's soft edges, as a fraction of the slice thickness (a real RF pulse has no
#: sharp slab boundary: neighbouring slices see a little of each other).
PROFILE_EDGE = 0.15


@dataclass(frozen=True)
class Acquisition:
    """How one participant was scanned: voxel size in RAS axis order and, for 2D ones, the slice axis."""

    name: str
    spacing: tuple[float, float, float]
    thick_axis: int | None  # RAS axis across the slices of a 2D acquisition; None for 3D

    @property
    def is_2d(self) -> bool:
        return self.thick_axis is not None

    @property
    def slice_thickness(self) -> float | None:
        return None if self.thick_axis is None else self.spacing[self.thick_axis]

    def fine_spacing(self) -> tuple[float, float, float]:
        """Spacing of the grid the anatomy is drawn on (thick axis cut into sub-slices)."""
        if self.thick_axis is None:
            return self.spacing
        return tuple(s / SUBSLICES if a == self.thick_axis else s  # type: ignore[return-value]
                     for a, s in enumerate(self.spacing))

    def shape_for(self, field_of_view_mm: tuple[float, float, float]) -> tuple[int, int, int]:
        """Voxels of the acquired grid covering the field of view (at least 3 slices)."""
        return tuple(max(3, int(round(f / s))) for f, s in zip(field_of_view_mm, self.spacing))  # type: ignore[return-value]

    def fine_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if self.thick_axis is None:
            return shape
        return tuple(n * SUBSLICES if a == self.thick_axis else n for a, n in enumerate(shape))  # type: ignore[return-value]


#: Acquisition names, in the order a dataset cycles through them.
ACQUISITIONS: tuple[str, ...] = ("sag-iso", "ax-thick", "sag-thick")
ACQUISITION_DESCRIPTIONS: dict[str, str] = {
    "sag-iso": "3D sagittal, isotropic 0.8-1.0 mm voxels",
    "ax-thick": "2D axial, 0.5-0.8 mm in plane, 3-4 mm slices along the cord",
    "sag-thick": "2D sagittal, 0.6-0.9 mm in plane, 3 mm slices left-right",
}
ISOTROPIC_SPACINGS: tuple[float, ...] = (0.8, 1.0, 0.9)


def draw_acquisition(name: str, index: int, rng: np.random.Generator) -> Acquisition:
    """Voxel size of one participant's acquisition (RAS order: left-right, anterior-posterior, inferior-superior)."""
    if name == "sag-iso":
        s = ISOTROPIC_SPACINGS[index % len(ISOTROPIC_SPACINGS)]
        return Acquisition(name, (s, s, s), None)
    if name == "ax-thick":
        in_plane = round(float(rng.uniform(0.5, 0.8)), 2)
        return Acquisition(name, (in_plane, in_plane, round(float(rng.uniform(3.0, 4.0)), 1)), 2)
    if name == "sag-thick":
        in_plane = round(float(rng.uniform(0.6, 0.9)), 2)
        return Acquisition(name, (3.0, in_plane, in_plane), 0)
    raise ValueError(f"unknown acquisition {name!r}; choose from {ACQUISITIONS}")


def slice_profile(subslices: int = SUBSLICES, edge: float = PROFILE_EDGE) -> np.ndarray:
    """Weights of one slice over its own and its neighbours' sub-slices (sums to 1).

    A rectangle as wide as the slice, smoothed by a Gaussian of ``edge`` slice widths: flat in the
    middle of the slab, soft at its boundaries, with a small tail into the adjacent slices.
    """
    offsets = np.arange(-2 * subslices + 1, 2 * subslices) / subslices  # in slice widths
    scale = edge * math.sqrt(2.0)
    weights = 0.5 * (special.erf((offsets + 0.5) / scale) - special.erf((offsets - 0.5) / scale))
    weights = weights[weights > 1e-4]
    return weights / weights.sum()


def integrate_slices(volume: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """The acquired grid's values: each thick slice integrates the fine volume over its profile."""
    axis = acquisition.thick_axis
    if axis is None:
        return volume.astype(float, copy=False)
    averaged = ndimage.convolve1d(volume.astype(float), slice_profile(), axis=axis, mode="nearest")
    centres = np.arange(volume.shape[axis] // SUBSLICES) * SUBSLICES + SUBSLICES // 2
    return np.take(averaged, centres, axis=axis)


def acquired_mask(mask: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """A structure's mask on the acquired grid: voxels it fills at least half of."""
    return integrate_slices(mask.astype(float), acquisition) >= 0.5


def acquired_affine(fine_affine: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """Affine of the acquired grid: a slice's centre is the centre of its sub-slices."""
    axis = acquisition.thick_axis
    if axis is None:
        return fine_affine
    step = np.eye(4)
    step[axis, axis] = SUBSLICES
    step[axis, 3] = SUBSLICES // 2
    return fine_affine @ step
