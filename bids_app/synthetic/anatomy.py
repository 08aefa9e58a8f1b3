"""The phantom's anatomy: a curved cord with grey and white matter, CSF, vertebrae and lesions, and its
rendering per contrast and acquisition."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
from scipy import ndimage

from bids_app.synthetic.acquisition import Acquisition, acquired_affine, acquired_mask, integrate_slices
from bids_app.synthetic.lesions import CordFrame, draw_lesions, plan_sci

logger = logging.getLogger(__name__)

# Tissue labels of the internal anatomy volume.
TISSUE, BONE, DISC, DURA, CSF, WM, GM = range(7)

# Relative tissue intensities per contrast; lesion_gain scales lesion contrast against the tissue
# it replaces (positive: hyperintense, negative: hypointense). Values mimic cervical-cord MRI.
CONTRASTS: dict[str, dict[str, float]] = {
    "T2w": {"tissue": 0.22, "bone": 0.17, "disc": 0.55, "dura": 0.08, "csf": 1.0,
            "wm": 0.32, "gm": 0.40, "lesion_gain": 1.0},
    "T1w": {"tissue": 0.50, "bone": 0.58, "disc": 0.38, "dura": 0.10, "csf": 0.34,
            "wm": 0.78, "gm": 0.64, "lesion_gain": -0.45},
    "T2starw": {"tissue": 0.25, "bone": 0.12, "disc": 0.45, "dura": 0.06, "csf": 0.55,
                "wm": 0.36, "gm": 0.46, "lesion_gain": 0.6},
}

# Per-participant storage, cycled by participant index so that even a small dataset mixes
# orientations and storage types (a random draw could give six RAS images).
ORIENTATIONS: tuple[tuple[str, bool], ...] = (
    ("RAS", False), ("PSR", False), ("LAS", False), ("RAS", True), ("LPI", False), ("AIL", True),
)
STORAGE: tuple[tuple[str, float], ...] = (("float32", 1.0), ("int16", 0.5))


@dataclass(frozen=True)
class Geometry:
    """Voxel grid the anatomy is drawn on (RAS-ordered axes, before reorientation), and how it is stored.

    ``shape`` and ``spacing`` are the fine grid's; a 2D acquisition integrates it into thick slices.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    acquisition: Acquisition
    axcodes: str
    oblique: bool
    dtype: str
    slope: float


@dataclass(frozen=True)
class Anatomy:
    """Ground truth of one participant on its RAS-ordered grid."""

    tissue: np.ndarray  # int8 tissue labels
    cord: np.ndarray  # bool
    lesion_contrast: np.ndarray  # float, 0 outside lesions, relative contrast inside
    texture: np.ndarray  # float, unit-variance smooth noise
    jitter: dict[str, float]  # per-participant multiplicative jitter of tissue intensities
    affine: np.ndarray  # RAS-ordered acquired grid -> world (mm)
    acquisition: Acquisition

    @cached_property
    def acquired_cord(self) -> np.ndarray:
        """The cord mask on the acquired grid (voxels the cord fills at least half of)."""
        return acquired_mask(self.cord, self.acquisition)

    @cached_property
    def acquired_lesions(self) -> np.ndarray:
        """The lesion mask on the acquired grid (voxels lesions fill at least half of)."""
        return acquired_mask(self.lesion_contrast > 0, self.acquisition)


def make_geometry(index: int, acquisition: Acquisition, field_of_view_mm: Sequence[float]) -> Geometry:
    """The fine grid covering the field of view; orientation and storage cycle with the index."""
    axcodes, oblique = ORIENTATIONS[index % len(ORIENTATIONS)]
    dtype, slope = STORAGE[index % len(STORAGE)]
    shape = acquisition.fine_shape(acquisition.shape_for(tuple(float(f) for f in field_of_view_mm)))
    return Geometry(shape, acquisition.fine_spacing(), acquisition, axcodes, oblique, dtype, slope)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation matrix; used to tilt oblique acquisitions by a few degrees."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _grid_affine(geom: Geometry, rng: np.random.Generator) -> np.ndarray:
    """RAS-ordered voxel -> scanner mm, centred near a plausible neck position."""
    centre = (np.array(geom.shape) - 1) / 2.0
    rot = np.eye(3)
    if geom.oblique:
        rot = _rotation(rng.normal(size=3), math.radians(rng.uniform(4.0, 12.0)))
    linear = rot @ np.diag(geom.spacing)
    offset = np.array([rng.uniform(-5, 5), rng.uniform(-25, -15), rng.uniform(-90, -60)])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = offset - linear @ centre
    return affine


def _smooth_curve(z: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Sum of two random long-wavelength sinusoids plus a tilt: a plausible cord centre line."""
    curve = rng.uniform(-0.03, 0.03) * z
    for _ in range(2):
        wavelength = rng.uniform(60.0, 200.0)
        curve = curve + rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * z / wavelength + rng.uniform(0, 2 * np.pi))
    peak = np.max(np.abs(curve)) if curve.size else 0.0
    return curve * (amplitude / peak) if peak > 0 else curve


def smooth_noise(shape: tuple[int, ...], sigma_vox: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance correlated noise, the basis of tissue texture."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    std = field.std()
    return field / std if std > 0 else field


def _butterfly(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Grey-matter mask in unit-cord coordinates (u: left-right, v: posterior-anterior)."""
    gm = (np.abs(u) < 0.32) & (np.abs(v) < 0.13)  # grey commissure
    for side in (-1.0, 1.0):
        for vsign, du, tilt in ((1.0, 0.36, 0.45), (-1.0, 0.30, -0.35)):  # anterior / posterior horn
            cu, cv = side * du, vsign * 0.32
            a = side * tilt
            ru = (u - cu) * math.cos(a) + (v - cv) * math.sin(a)
            rv = -(u - cu) * math.sin(a) + (v - cv) * math.cos(a)
            gm |= (ru / 0.14) ** 2 + (rv / 0.42) ** 2 <= 1.0
    return gm & (u ** 2 + v ** 2 < 0.8)


def _fit_in_plane(half_fov: float, spacing: float, cord: float, csf: float,
                  amplitude: float) -> tuple[float, float, float]:
    """Shrink cord, CSF and curve to fit a small field of view, keeping CSF >= 2 voxels thick.

    Without the floor a tiny grid would lose the CSF annulus to partial volume entirely.
    """
    room = half_fov - 1.0 - spacing
    need = cord + csf + amplitude
    if need > room:
        shrink = max(room, 0.0) / need
        cord, csf, amplitude = cord * shrink, csf * shrink, amplitude * shrink
    floor = 2.0 * spacing
    if csf < floor:
        cord, csf = max(cord - (floor - csf), 1.5 * spacing), floor
    return cord, csf, amplitude


def make_anatomy(geom: Geometry, lesion_type: str | None, rng: np.random.Generator) -> Anatomy:
    """Build the tissue, cord and lesion volumes of one participant (``lesion_type`` None: healthy)."""
    nx, ny, nz = geom.shape
    sx, sy, sz = geom.spacing
    x = (np.arange(nx) - (nx - 1) / 2.0) * sx
    y = (np.arange(ny) - (ny - 1) / 2.0) * sy
    z = (np.arange(nz) - (nz - 1) / 2.0) * sz
    half_x, half_y = x[-1], y[-1]

    # Left-right (a, x) and anterior-posterior (b, y) semi-axes of cord and CSF, curve amplitudes.
    cord_a, thick_a, amp_x = _fit_in_plane(half_x, sx, rng.uniform(4.5, 6.5), rng.uniform(1.5, 3.0),
                                           rng.uniform(0.5, 2.0))
    cord_b, thick_b, amp_y = _fit_in_plane(half_y, sy, rng.uniform(3.0, 4.2), rng.uniform(1.8, 3.2),
                                           rng.uniform(1.0, 3.0))
    csf_a, csf_b = cord_a + thick_a, cord_b + thick_b
    shrink = min(cord_a / 4.5, cord_b / 3.0, 1.0)  # < 1 only where the field of view is small

    cx = _smooth_curve(z, amp_x, rng)
    cy = _smooth_curve(z, amp_y, rng)
    swell = 1.0 + 0.08 * np.sin(2 * np.pi * z / rng.uniform(80, 160) + rng.uniform(0, 2 * np.pi))
    sci = plan_sci(z, rng) if lesion_type == "sci" else None
    if sci is not None:
        swell = swell * sci.swell(z)
    canal_dy = rng.uniform(-0.6, 0.6) * shrink

    X = x[:, None, None]
    Y = y[None, :, None]
    dx = X - cx[None, None, :]
    dy = Y - cy[None, None, :]
    u = dx / (cord_a * swell[None, None, :])
    v = dy / (cord_b * swell[None, None, :])
    r_cord = u ** 2 + v ** 2
    r_canal = (dx / csf_a) ** 2 + ((dy - canal_dy) / csf_b) ** 2
    r_dura = (dx / (csf_a + 0.8 * shrink)) ** 2 + ((dy - canal_dy) / (csf_b + 0.8 * shrink)) ** 2

    shape3 = (nx, ny, nz)
    tissue = np.full(shape3, TISSUE, dtype=np.int8)
    # Vertebral bodies anterior to the canal, separated by intervertebral discs.
    body_front = cy + canal_dy + csf_b + rng.uniform(1.5, 3.0) * shrink
    body = (Y > body_front[None, None, :]) & (np.abs(dx) < rng.uniform(9, 13) * shrink)
    body = np.broadcast_to(body, shape3)
    period, phase = rng.uniform(16.0, 22.0), rng.uniform(0, 1)
    disc_z = ((z / period + phase) % 1.0) < (rng.uniform(4.0, 6.0) / period)
    tissue[body] = BONE
    tissue[body & np.broadcast_to(disc_z[None, None, :], shape3)] = DISC
    tissue[np.broadcast_to(r_dura <= 1.0, shape3)] = DURA
    tissue[np.broadcast_to(r_canal <= 1.0, shape3)] = CSF
    cord = np.broadcast_to(r_cord <= 1.0, shape3).copy()
    tissue[cord] = WM
    tissue[cord & np.broadcast_to(_butterfly(u, v), shape3)] = GM

    frame = CordFrame(dx, dy, z, cord_a * swell, cord_b * swell, cord)
    heterogeneity = smooth_noise(shape3, [1.0 / s for s in geom.spacing], rng) if sci is not None else None
    acquisition = geom.acquisition
    lesion_contrast = draw_lesions(lesion_type, frame, acquisition.spacing, rng,
                                   lambda mask: bool(acquired_mask(mask, acquisition).any()), sci, heterogeneity)
    texture = smooth_noise(shape3, [1.5 / s for s in geom.spacing], rng)
    jitter = {k: float(rng.uniform(0.9, 1.1)) for k in ("tissue", "bone", "disc", "dura", "csf", "wm", "gm")}
    affine = acquired_affine(_grid_affine(geom, rng), acquisition)
    logger.debug("anatomy: cord %.1fx%.1f mm, csf %.1fx%.1f mm, lesions %s, %s",
                 cord_a, cord_b, csf_a, csf_b, lesion_type, acquisition.name)
    return Anatomy(tissue, cord, lesion_contrast, texture, jitter, affine, acquisition)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _bias_field(shape: tuple[int, int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field from low-order polynomials, plus posterior-coil falloff."""
    coords = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    log_b = -0.2 * coords[1]  # posterior coil: brighter posteriorly
    for i in range(3):
        log_b = log_b + rng.normal(0, strength) * coords[i] + rng.normal(0, strength / 2) * coords[i] ** 2
    log_b = log_b + rng.normal(0, strength / 2) * coords[0] * coords[2]
    return np.exp(log_b)


def render(anat: Anatomy, contrast: str, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude image on the RAS-ordered acquired grid: tissue intensities and PSF on the fine grid,
    integration over the slice profile, then bias and Rician noise on the acquired voxels."""
    table = CONTRASTS[contrast]
    lut = np.zeros(7)
    for name, label in (("tissue", TISSUE), ("bone", BONE), ("disc", DISC), ("dura", DURA),
                        ("csf", CSF), ("wm", WM), ("gm", GM)):
        lut[label] = table[name] * anat.jitter[name]
    img = lut[anat.tissue]
    lesion = anat.lesion_contrast > 0
    # Scale the local tissue (white or grey matter) so a lesion stands out from what it replaces.
    img[lesion] = img[lesion] * (1.0 + table["lesion_gain"] * anat.lesion_contrast[lesion])
    soft = ~np.isin(anat.tissue, (CSF, WM, GM, DURA))
    img = img * (1.0 + np.where(soft, 0.18, 0.03) * anat.texture)
    img = ndimage.gaussian_filter(img, 0.5, mode="nearest")  # point-spread: partial volume at edges
    img = integrate_slices(img, anat.acquisition)
    img = img * _bias_field(img.shape, rng, strength=0.08)
    sigma = rng.uniform(0.02, 0.045)
    real = img + rng.normal(0, sigma, img.shape)
    imag = rng.normal(0, sigma, img.shape)
    return scale * np.sqrt(real ** 2 + imag ** 2)
