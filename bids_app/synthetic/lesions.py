"""The phantom's lesion types: where each kind of spinal-cord lesion sits, how big it is, how bright.

- ``central``: 1-4 ellipsoids inside the cord's interior, elongated along it (the original phantom);
- ``ms``: 1-4 small lesions (2-5 mm across, up to 2x longer along the cord) centred in the cord's outer
  1.5 mm in the dorsal or a lateral column, clipped to the cord and mostly touching its surface, from
  faint to CSF-bright: where multiple-sclerosis lesions sit;
- ``sci``: one elongated central lesion (8-30 mm along the cord, 3-6 mm across) of uneven intensity,
  sometimes with the cord swollen at its level: a traumatic spinal-cord injury.

Lesion contrasts are relative gains over the tissue they replace (see ``anatomy.CONTRASTS``).
Every lesion must stay visible on the acquired grid (thick slices average small ones away): a
candidate that would vanish there is drawn again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

LESION_TYPES: tuple[str, ...] = ("central", "ms", "sci")
LESION_TYPE_DESCRIPTIONS: dict[str, str] = {
    "central": "1-4 ellipsoidal lesions inside the cord's interior",
    "ms": "1-4 small lesions (2-5 mm) in the cord's outer 1.5 mm, dorsal or lateral, touching its surface",
    "sci": "one elongated central lesion (8-30 mm along the cord, 3-6 mm across), uneven intensity",
}
#: Pathology written into participants.tsv for each lesion type.
PATHOLOGY: dict[str, str] = {"central": "MS", "ms": "MS", "sci": "SCI"}
#: Deepest centre of an ``ms`` lesion below the cord surface (mm).
MS_MAX_DEPTH_MM = 1.5
#: Relative contrast of a CSF-bright T2 lesion in white matter (0.32 * (1 + 2.1) ~ CSF's 1.0).
CSF_LIKE_CONTRAST = 2.1


@dataclass(frozen=True)
class CordFrame:
    """Cord-centred coordinates of the fine grid, in mm, broadcastable to its shape."""

    dx: np.ndarray  # left-right offset from the centre line, (nx, 1, nz)
    dy: np.ndarray  # anterior-posterior offset, (1, ny, nz)
    z: np.ndarray  # inferior-superior position, (nz,)
    semi_lr: np.ndarray  # cord semi-axis left-right at each z (swelling included), (nz,)
    semi_ap: np.ndarray  # cord semi-axis anterior-posterior at each z, (nz,)
    cord: np.ndarray  # bool, the fine grid's cord mask

    def ellipsoid(self, centre: tuple[float, float, float], semi: tuple[float, float, float],
                  z_power: float = 2.0) -> np.ndarray:
        """Voxels inside an axis-aligned ellipsoid (``z_power`` 4: flat-ended along the cord)."""
        cx, cy, cz = centre
        a, b, c = semi
        return (((self.dx - cx) / a) ** 2 + ((self.dy - cy) / b) ** 2
                + np.abs((self.z[None, None, :] - cz) / c) ** z_power) <= 1.0


@dataclass(frozen=True)
class SciPlan:
    """The one lesion of an ``sci`` participant, drawn before the cord so that it can swell it."""

    z0: float
    length: float
    radius: float
    swelling: float

    def swell(self, z: np.ndarray) -> np.ndarray:
        """Multiplier of the cord's radius along z: 1 away from the lesion."""
        return 1.0 + self.swelling * np.exp(-0.5 * ((z - self.z0) / (0.4 * self.length)) ** 2)


def plan_sci(z: np.ndarray, rng: np.random.Generator) -> SciPlan:
    """Length 8-30 mm (at most 80 % of the field of view), 3-6 mm across, swelling half of the time."""
    span = float(z[-1] - z[0])
    length = min(float(rng.uniform(8.0, 30.0)), 0.8 * span)
    z0 = float(rng.uniform(z[0] + 0.5 * length, z[-1] - 0.5 * length)) if span > length else float(np.mean(z))
    radius = float(rng.uniform(1.5, 3.0))
    swelling = float(rng.uniform(0.05, 0.2)) if rng.uniform() < 0.5 else 0.0
    return SciPlan(z0, length, radius, swelling)


def _interior(cord: np.ndarray) -> np.ndarray:
    """The cord less its outermost in-plane voxel (central lesions stay off the rim)."""
    rim_free = ndimage.binary_erosion(cord, structure=np.ones((3, 3, 1), bool))
    return rim_free if rim_free.any() else cord


def _central(frame: CordFrame, spacing: Sequence[float], rng: np.random.Generator,
             visible: Callable[[np.ndarray], bool]) -> np.ndarray:
    """1-4 ellipsoids elongated along the cord, clipped to the cord interior."""
    n_lesions = int(rng.integers(1, 5))
    contrast = np.zeros(frame.cord.shape)
    inner = _interior(frame.cord)
    cord_a, cord_b = float(np.median(frame.semi_lr)), float(np.median(frame.semi_ap))
    placed = 0
    for _attempt in range(50 * n_lesions):
        if placed == n_lesions:
            break
        z0 = rng.uniform(0.1, 0.9) * (frame.z[-1] - frame.z[0]) + frame.z[0]
        rho, theta = rng.uniform(0.0, 0.5), rng.uniform(0, 2 * np.pi)
        ru = max(rng.uniform(0.25, 0.45), 1.1 * spacing[0] / cord_a)
        rv = max(rng.uniform(0.25, 0.45), 1.1 * spacing[1] / cord_b)
        rz = max(rng.uniform(2.0, 4.0) * max(ru * cord_a, rv * cord_b), 1.2 * spacing[2])
        centre = (rho * math.cos(theta) * cord_a, rho * math.sin(theta) * cord_b, z0)
        mask = frame.ellipsoid(centre, (ru * cord_a, rv * cord_b, rz)) & inner
        if mask.sum() < 2 or not visible(mask):
            continue
        c = rng.uniform(0.3, 0.5) if rng.uniform() < 0.4 else rng.uniform(0.5, 1.2)  # some faint
        contrast[mask] = np.maximum(contrast[mask], c)
        placed += 1
    return contrast


#: Polar angle (posterior is -pi/2; right is 0) of the columns MS lesions favour.
_MS_SITES: tuple[float, ...] = (-math.pi / 2, 0.0, math.pi)  # dorsal, right lateral, left lateral


def _ms(frame: CordFrame, spacing: Sequence[float], rng: np.random.Generator,
        visible: Callable[[np.ndarray], bool]) -> np.ndarray:
    """1-4 small lesions centred within ``MS_MAX_DEPTH_MM`` of the surface, clipped to the cord."""
    n_lesions = int(rng.integers(1, 5))
    contrast = np.zeros(frame.cord.shape)
    nz = len(frame.z)
    placed = 0
    for _attempt in range(50 * n_lesions):
        if placed == n_lesions:
            break
        radius = rng.uniform(1.0, 2.5)  # 2-5 mm across
        z_index = int(rng.integers(int(0.1 * nz), max(int(0.9 * nz), int(0.1 * nz) + 1)))
        z0 = float(frame.z[z_index])
        t = _MS_SITES[int(rng.integers(len(_MS_SITES)))] + rng.uniform(-0.5, 0.5)
        a, b = float(frame.semi_lr[z_index]), float(frame.semi_ap[z_index])
        surface = np.array([a * math.cos(t), b * math.sin(t)])
        normal = np.array([math.cos(t) / a, math.sin(t) / b])
        depth = rng.uniform(0.0, MS_MAX_DEPTH_MM)
        cx, cy = surface - depth * normal / np.linalg.norm(normal)
        # Thick slices would average a lesion thinner than about one slice away: keep it visible.
        semi = (max(radius, 0.6 * spacing[0]), max(radius, 0.6 * spacing[1]),
                max(radius * rng.uniform(1.0, 2.0), 0.6 * spacing[2]))
        mask = frame.ellipsoid((float(cx), float(cy), z0), semi) & frame.cord
        if mask.sum() < 2 or not visible(mask):
            continue
        c = rng.uniform(0.3, CSF_LIKE_CONTRAST)
        contrast[mask] = np.maximum(contrast[mask], c)
        placed += 1
    return contrast


def _sci(frame: CordFrame, plan: SciPlan, heterogeneity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One flat-ended elongated lesion near the centre line, brightness varying within it."""
    contrast = np.zeros(frame.cord.shape)
    offset = rng.uniform(-0.15, 0.15, size=2) * np.array([np.median(frame.semi_lr), np.median(frame.semi_ap)])
    mask = frame.ellipsoid((float(offset[0]), float(offset[1]), plan.z0),
                           (plan.radius, plan.radius, 0.5 * plan.length), z_power=4.0) & _interior(frame.cord)
    base = rng.uniform(0.6, 1.6)
    contrast[mask] = np.clip(base * (1.0 + 0.4 * heterogeneity[mask]), 0.2, CSF_LIKE_CONTRAST)
    return contrast


def draw_lesions(lesion_type: str | None, frame: CordFrame, spacing: Sequence[float], rng: np.random.Generator,
                 visible: Callable[[np.ndarray], bool], sci: SciPlan | None = None,
                 heterogeneity: np.ndarray | None = None) -> np.ndarray:
    """Relative contrast of the lesions (0 outside them) for one participant; all zero when healthy.

    ``spacing`` is the acquired voxel size (lesions are kept at least about one voxel across).
    """
    if lesion_type is None:
        return np.zeros(frame.cord.shape)
    if lesion_type == "central":
        contrast = _central(frame, spacing, rng, visible)
    elif lesion_type == "ms":
        contrast = _ms(frame, spacing, rng, visible)
    elif lesion_type == "sci":
        if sci is None or heterogeneity is None:
            raise ValueError("an sci lesion needs its plan and heterogeneity field")
        contrast = _sci(frame, sci, heterogeneity, rng)
    else:
        raise ValueError(f"unknown lesion type {lesion_type!r}; choose from {LESION_TYPES}")
    if not (contrast > 0).any() or not visible(contrast > 0):
        # Pathological tiny grids: mark the cord across one slab at mid-height so the mask is never empty.
        z_mid = 0.5 * (frame.z[0] + frame.z[-1])
        contrast[frame.cord & (np.abs(frame.z - z_mid) <= max(spacing[2], 2.0))[None, None, :]] = 0.8
    return contrast
