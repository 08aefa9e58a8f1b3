"""Synthetic spinal-cord phantom BIDS dataset, with ground-truth cord and lesion masks.

Every test and the demo need a dataset that is small, fast to make, byte-reproducible and still
hard enough that a naive method (a global threshold, an assumption of RAS float images) fails.
So each participant gets a curved elliptical cord with grey/white matter, a CSF annulus, a
vertebral column with discs, textured soft tissue, a bias field and Rician noise, and the images
vary in voxel size, axis order, obliquity, data type and intensity scale.

Run ``python -m bids_app.synthetic OUTDIR`` or call :func:`generate_dataset`.

Layout written (``[...]`` only with sessions)::

    OUTDIR/dataset_description.json, README.md, participants.tsv, participants.json
    OUTDIR/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_<contrast>.nii.gz (+ .json)
    OUTDIR/derivatives/labels/dataset_description.json
    OUTDIR/derivatives/labels/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_<contrast>_label-SC_seg.nii.gz (+ .json)
    OUTDIR/derivatives/labels/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY]_<contrast>_label-lesion_seg.nii.gz (+ .json)

Lesion masks exist only for lesion participants (pathology ``MS``); healthy ones are ``HC``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from bids_app.errors import CannotCreateError, CountersegError, OutputIOError, UsageError

logger = logging.getLogger(__name__)

GENERATOR_NAME = "counterseg-synthetic"
BIDS_VERSION = "1.10.0"
DEFAULT_SHAPE: tuple[int, int, int] = (40, 40, 64)
MIN_SHAPE: tuple[int, int, int] = (24, 24, 8)  # smaller grids lose the CSF and lesions to partial volume
MAX_PARTICIPANTS = 99  # labels are two zero-padded digits
HEALTHY = "HC"
LESION_PATHOLOGY = "MS"

# Tissue labels of the internal anatomy volume.
TISSUE, BONE, DISC, DURA, CSF, WM, GM = range(7)

# Relative tissue intensities per contrast; lesion_gain scales lesion contrast against the tissue
# it replaces (positive: hyperintense, negative: hypointense). Values mimic cervical-cord MRI.
CONTRASTS: dict[str, dict[str, float]] = {
    "T2w": {"tissue": 0.22, "bone": 0.17, "disc": 0.55, "dura": 0.08, "csf": 1.0,
            "wm": 0.32, "gm": 0.40, "lesion_gain": 1.0},
    "T1w": {"tissue": 0.50, "bone": 0.58, "disc": 0.38, "dura": 0.10, "csf": 0.12,
            "wm": 0.78, "gm": 0.64, "lesion_gain": -0.45},
    "T2starw": {"tissue": 0.25, "bone": 0.12, "disc": 0.45, "dura": 0.06, "csf": 0.90,
                "wm": 0.36, "gm": 0.56, "lesion_gain": 0.6},
}

# Sidecar fields shared by all images; filling the validator's "recommended" keys keeps its
# report short enough that real problems stand out.
COMMON_SIDECAR: dict[str, object] = {
    "Manufacturer": GENERATOR_NAME, "ManufacturersModelName": "phantom",
    "DeviceSerialNumber": "synthetic-0000", "StationName": "phantom", "SoftwareVersions": "none",
    "MagneticFieldStrength": 3, "ReceiveCoilName": "synthetic spine array",
    "ReceiveCoilActiveElements": "all", "MatrixCoilMode": "none", "CoilCombinationMethod": "rSOS",
    "NonlinearGradientCorrection": False, "DwellTime": 5e-06,
    "InstitutionName": "none (simulated)", "InstitutionAddress": "none (simulated)",
    "InstitutionalDepartmentName": "none (simulated)",
}
SIDECARS: dict[str, dict[str, object]] = {
    "T2w": {"PulseSequenceType": "turbo spin echo", "ScanningSequence": "SE", "SequenceVariant": "SK",
            "SequenceName": "synthetic_tse3d", "PulseSequenceDetails": "simulated by bids_app.synthetic",
            "RepetitionTime": 1.5, "EchoTime": 0.12, "FlipAngle": 120, "MRAcquisitionType": "3D"},
    "T1w": {"PulseSequenceType": "MPRAGE", "ScanningSequence": "GR\\IR", "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "synthetic_mprage", "PulseSequenceDetails": "simulated by bids_app.synthetic",
            "RepetitionTime": 2.0, "EchoTime": 0.0037, "InversionTime": 0.9, "FlipAngle": 9,
            "MRAcquisitionType": "3D"},
    "T2starw": {"PulseSequenceType": "multi-echo gradient echo", "ScanningSequence": "GR",
                "SequenceVariant": "SP", "SequenceName": "synthetic_medic",
                "PulseSequenceDetails": "simulated by bids_app.synthetic",
                "RepetitionTime": 0.6, "EchoTime": 0.014, "FlipAngle": 30, "MRAcquisitionType": "2D"},
}

# Per-participant acquisition geometry, cycled by participant index so that even a small dataset
# mixes orientations, spacings and storage types (a random draw could give six RAS images).
ORIENTATIONS: tuple[tuple[str, bool], ...] = (
    ("RAS", False), ("PSR", False), ("LAS", False), ("RAS", True), ("LPI", False), ("AIL", True),
)
SPACINGS: tuple[tuple[float, float, float], ...] = (
    (0.8, 0.8, 1.0), (1.0, 1.0, 2.0), (0.6, 0.6, 3.0), (0.9, 1.1, 1.5),
)
STORAGE: tuple[tuple[str, float], ...] = (("float32", 1.0), ("int16", 0.5))


@dataclass(frozen=True)
class SyntheticDataset:
    """What :func:`generate_dataset` wrote; all paths are absolute.

    ``participants`` holds ``(label, pathology)`` with the label without ``sub-`` (``"01"``).
    ``cord_masks`` maps every image to its cord mask; ``lesion_masks`` maps only the images of
    lesion participants to their lesion masks.
    """

    root: Path
    participants: list[tuple[str, str]]
    images: list[Path]
    cord_masks: dict[Path, Path]
    lesion_masks: dict[Path, Path]

    @property
    def labels_root(self) -> Path:
        """Root of the ground-truth derivative dataset."""
        return self.root / "derivatives" / "labels"


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of one participant, in anatomical (RAS-ordered) axes before reorientation."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
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
    affine: np.ndarray  # RAS-ordered grid -> world (mm)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _clean_sessions(sessions: Sequence[str]) -> list[str]:
    """Accept ``01`` or ``ses-01`` so callers can pass either BIDS labels or entity strings."""
    labels = [s[4:] if s.startswith("ses-") else s for s in sessions]
    for label in labels:
        if not label or not label.isalnum() or not label.isascii():
            raise UsageError(f"session label {label!r} must be non-empty and alphanumeric")
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate session labels in {list(sessions)}")
    return labels


def _check_args(n_healthy: int, n_lesion: int, seed: int, contrasts: Sequence[str],
                shape: Sequence[int]) -> None:
    """Fail early with a usage error rather than half-writing a dataset."""
    if n_healthy < 0 or n_lesion < 0:
        raise UsageError("participant counts must be >= 0")
    if not 1 <= n_healthy + n_lesion <= MAX_PARTICIPANTS:
        raise UsageError(f"need between 1 and {MAX_PARTICIPANTS} participants in total")
    if seed < 0:
        raise UsageError("seed must be >= 0")
    if not contrasts:
        raise UsageError("need at least one contrast")
    unknown = [c for c in contrasts if c not in CONTRASTS]
    if unknown:
        raise UsageError(f"unknown contrast(s) {unknown}; choose from {sorted(CONTRASTS)}")
    if len(set(contrasts)) != len(contrasts):
        raise UsageError(f"duplicate contrasts in {list(contrasts)}")
    if len(shape) != 3 or any(int(n) != n or n < m for n, m in zip(shape, MIN_SHAPE)):
        raise UsageError(f"shape must be 3 integers >= {MIN_SHAPE}, got {tuple(shape)}")


def _prepare_out_dir(out_dir: Path) -> Path:
    """Refuse to mix phantom files into existing data; create the directory otherwise."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"output {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise UsageError(f"output directory {out_dir} is not empty")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateError(f"cannot create {out_dir}: {exc}") from exc
    return out_dir


# --------------------------------------------------------------------------------------------
# Geometry and anatomy
# --------------------------------------------------------------------------------------------


def _geometry(index: int, shape: Sequence[int]) -> Geometry:
    """Cycle orientation, spacing and storage with co-prime periods to mix combinations."""
    axcodes, oblique = ORIENTATIONS[index % len(ORIENTATIONS)]
    dtype, slope = STORAGE[index % len(STORAGE)]
    return Geometry(tuple(int(n) for n in shape), SPACINGS[index % len(SPACINGS)],
                    axcodes, oblique, dtype, slope)


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


def _smooth_noise(shape: tuple[int, ...], sigma_vox: Sequence[float], rng: np.random.Generator) -> np.ndarray:
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


def _anatomy(geom: Geometry, n_lesions: int, rng: np.random.Generator) -> Anatomy:
    """Build the tissue, cord and lesion volumes of one participant."""
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

    lesion_contrast = _lesions(n_lesions, cord, u, v, z, geom.spacing, cord_a, cord_b, rng)
    texture = _smooth_noise(shape3, [1.5 / s for s in geom.spacing], rng)
    jitter = {k: float(rng.uniform(0.9, 1.1)) for k in ("tissue", "bone", "disc", "dura", "csf", "wm", "gm")}
    affine = _grid_affine(geom, rng)
    logger.debug("anatomy: cord %.1fx%.1f mm, csf %.1fx%.1f mm, %d lesion(s)",
                 cord_a, cord_b, csf_a, csf_b, n_lesions)
    return Anatomy(tissue, cord, lesion_contrast, texture, jitter, affine)


def _lesions(n_lesions: int, cord: np.ndarray, u: np.ndarray, v: np.ndarray, z: np.ndarray,
             spacing: Sequence[float], cord_a: float, cord_b: float,
             rng: np.random.Generator) -> np.ndarray:
    """Ellipsoids elongated along the cord, clipped to the cord interior (not its rim)."""
    contrast = np.zeros(cord.shape)
    if n_lesions == 0:
        return contrast
    rim_free = ndimage.binary_erosion(cord, structure=np.ones((3, 3, 1), bool))
    inner = rim_free if rim_free.any() else cord
    placed = 0
    for _attempt in range(50 * n_lesions):
        if placed == n_lesions:
            break
        z0 = rng.uniform(0.1, 0.9) * (z[-1] - z[0]) + z[0]
        rho, theta = rng.uniform(0.0, 0.5), rng.uniform(0, 2 * np.pi)
        ru = max(rng.uniform(0.25, 0.45), 1.1 * spacing[0] / cord_a)
        rv = max(rng.uniform(0.25, 0.45), 1.1 * spacing[1] / cord_b)
        rz = max(rng.uniform(2.0, 4.0) * max(ru * cord_a, rv * cord_b), 1.2 * spacing[2])
        ell = ((u - rho * math.cos(theta)) / ru) ** 2 + ((v - rho * math.sin(theta)) / rv) ** 2 \
            + ((z[None, None, :] - z0) / rz) ** 2 <= 1.0
        mask = ell & inner
        if mask.sum() < 2:
            continue
        c = rng.uniform(0.3, 0.5) if rng.uniform() < 0.4 else rng.uniform(0.5, 1.2)  # some faint
        contrast[mask] = np.maximum(contrast[mask], c)
        placed += 1
    if placed == 0:  # pathological tiny grids: mark the cord centre so the mask is never empty
        centre = np.argwhere(inner)[len(np.argwhere(inner)) // 2]
        contrast[tuple(centre)] = 0.8
    return contrast


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


def _render(anat: Anatomy, contrast: str, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude image on the RAS-ordered grid: tissue intensities, PSF, bias, Rician noise."""
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
    img = img * _bias_field(img.shape, rng, strength=0.08)
    sigma = rng.uniform(0.02, 0.045)
    real = img + rng.normal(0, sigma, img.shape)
    imag = rng.normal(0, sigma, img.shape)
    return scale * np.sqrt(real ** 2 + imag ** 2)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip a RAS-ordered array into ``axcodes`` and return the matching affine."""
    ornt = ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple(axcodes)))
    return np.ascontiguousarray(apply_orientation(data, ornt)), affine @ inv_ornt_aff(ornt, data.shape)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, dtype: str, slope: float) -> bytes:
    """Serialise one NIfTI-1 image with an explicit, exact storage type and scale factor.

    nibabel picks its own scaling for array images, so integer data are quantised here and the
    requested ``scl_slope`` is written into the header afterwards.
    """
    if dtype == "float32" or dtype == "uint8":
        stored = data.astype(dtype)
    else:
        info = np.iinfo(dtype)
        stored = np.clip(np.round(data / slope), info.min, info.max).astype(dtype)
    img = nib.Nifti1Image(stored, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = bytearray(img.to_bytes())
    if slope != 1.0:
        hdr = nib.Nifti1Header(binaryblock=bytes(raw[:348]), endianness=img.header.endianness)
        hdr.set_slope_inter(slope, 0.0)
        raw[:348] = hdr.binaryblock
    return bytes(raw)


def _write_bytes(path: Path, payload: bytes) -> None:
    """Write, gzip-compressing with mtime 0 so equal seeds give byte-identical files."""
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    except OSError as exc:
        raise OutputIOError(f"cannot write {path}: {exc}") from exc


def _write_json(path: Path, content: object) -> None:
    """Stable, human-readable JSON."""
    _write_bytes(path, (json.dumps(content, indent=2) + "\n").encode())


def _stem(label: str, session: str | None, contrast: str) -> str:
    """BIDS file stem, e.g. ``sub-01_ses-A_T2w``."""
    ses = f"_ses-{session}" if session else ""
    return f"sub-{label}{ses}_{contrast}"


def _anat_dir(root: Path, label: str, session: str | None) -> Path:
    """``sub-XX[/ses-YY]/anat`` under ``root``."""
    base = root / f"sub-{label}"
    return (base / f"ses-{session}" if session else base) / "anat"


def _write_top_level(root: Path, participants: list[tuple[str, str]], demographics: list[tuple[int, str]],
                     seed: int) -> None:
    """Dataset description, README and participants files of the raw and label datasets."""
    _write_json(root / "dataset_description.json", {
        "Name": "counterseg synthetic spinal-cord phantom",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["counterseg developers", "bids_app.synthetic (generator)"],
        "GeneratedBy": [{"Name": GENERATOR_NAME, "Description": f"bids_app.synthetic, seed {seed}"}],
    })
    _write_bytes(root / "README.md", (
        "# counterseg synthetic spinal-cord phantom\n\n"
        f"Generated by `bids_app.synthetic` with seed {seed}. Images are simulated, not acquired.\n"
        "Ground-truth cord and lesion masks are in `derivatives/labels`.\n").encode())
    rows = ["participant_id\tage\tsex\tpathology"]
    rows += [f"sub-{label}\t{age}\t{sex}\t{path}" for (label, path), (age, sex) in zip(participants, demographics)]
    _write_bytes(root / "participants.tsv", ("\n".join(rows) + "\n").encode())
    _write_json(root / "participants.json", {
        "participant_id": {"Description": "Unique participant identifier"},
        "age": {"Description": "Age of the simulated participant", "Units": "year"},
        "sex": {"Description": "Sex of the simulated participant",
                "Levels": {"M": "male", "F": "female"}},
        "pathology": {"Description": "Spinal-cord pathology",
                      "Levels": {HEALTHY: "healthy control", LESION_PATHOLOGY: "multiple sclerosis (lesions)"}},
    })
    labels = root / "derivatives" / "labels"
    _write_json(labels / "dataset_description.json", {
        "Name": "counterseg synthetic ground-truth labels",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": GENERATOR_NAME}],
        "DatasetLinks": {"raw": "../../"},
    })


def _sidecar(contrast: str, geom: Geometry) -> dict[str, object]:
    """Acquisition metadata; 2D sequences get axial SliceTiming along the stored S-I axis."""
    meta: dict[str, object] = {**COMMON_SIDECAR, **SIDECARS[contrast]}
    if meta["MRAcquisitionType"] == "2D":
        axis = next(i for i, c in enumerate(geom.axcodes) if c in "SI")
        n_slices, tr = geom.shape[2], float(meta["RepetitionTime"])
        order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))  # interleaved
        timing = [0.0] * n_slices
        for rank, index in enumerate(order):
            timing[index] = round(rank * tr / n_slices, 6)
        meta["SliceEncodingDirection"] = "ijk"[axis]
        meta["SliceTiming"] = timing
    return meta


def _write_image_set(root: Path, label: str, session: str | None, contrast: str, anat: Anatomy,
                     geom: Geometry, scale: float, rng: np.random.Generator) -> tuple[Path, Path, Path | None]:
    """Write one image, its cord mask and (for lesion participants) its lesion mask."""
    stem = _stem(label, session, contrast)
    image = _anat_dir(root, label, session) / f"{stem}.nii.gz"
    data, affine = _reorient(_render(anat, contrast, scale, rng), anat.affine, geom.axcodes)
    _write_bytes(image, _nifti_bytes(data, affine, geom.dtype, geom.slope))
    _write_json(image.with_name(f"{stem}.json"), _sidecar(contrast, geom))
    rel_image = image.relative_to(root).as_posix()
    deriv = _anat_dir(root / "derivatives" / "labels", label, session)
    masks: list[Path | None] = []
    for kind, volume, desc in (("SC", anat.cord, "spinal cord"), ("lesion", anat.lesion_contrast > 0, "lesion")):
        if kind == "lesion" and not volume.any():
            masks.append(None)
            continue
        mask = deriv / f"{stem}_label-{kind}_seg.nii.gz"
        mdata, maffine = _reorient(volume.astype(np.uint8), anat.affine, geom.axcodes)
        _write_bytes(mask, _nifti_bytes(mdata, maffine, "uint8", 1.0))
        _write_json(mask.with_name(mask.name.replace(".nii.gz", ".json")), {
            "Type": kind, "Description": f"Ground-truth {desc} mask of the synthetic phantom",
            "Sources": [f"bids:raw:{rel_image}"], "SpatialReference": f"bids:raw:{rel_image}"})
        masks.append(mask)
    logger.info("wrote %s (%s, %s, %s)", rel_image, geom.axcodes, geom.spacing, geom.dtype)
    return image, masks[0], masks[1]  # type: ignore[return-value]


def _stream(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent random stream per (participant, session, contrast), stable under additions."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


def generate_dataset(out_dir: Path, n_healthy: int = 4, n_lesion: int = 2, seed: int = 0,
                     sessions: Sequence[str] = (), contrasts: Sequence[str] = ("T2w",),
                     shape: Sequence[int] = DEFAULT_SHAPE) -> SyntheticDataset:
    """Write a synthetic BIDS dataset with ground-truth masks and return where everything is.

    ``shape`` is the voxel count along left-right, anterior-posterior and inferior-superior; the
    stored array is that shape permuted to the image's axis order (e.g. PSR stores (AP, SI, LR)).
    Healthy participants come first (``HC``), then lesion participants (``MS``). Same seed, same
    bytes. Raises UsageError for bad arguments or a non-empty ``out_dir``.
    """
    _check_args(n_healthy, n_lesion, seed, contrasts, shape)
    session_labels = _clean_sessions(sessions)
    root = _prepare_out_dir(Path(out_dir))
    n_total = n_healthy + n_lesion
    participants = [(f"{i + 1:02d}", HEALTHY if i < n_healthy else LESION_PATHOLOGY) for i in range(n_total)]
    images: list[Path] = []
    cord_masks: dict[Path, Path] = {}
    lesion_masks: dict[Path, Path] = {}
    demographics: list[tuple[int, str]] = []
    for index, (label, pathology) in enumerate(participants):
        rng = _stream(seed, index, "anatomy")
        demographics.append((int(rng.integers(20, 70)), "M" if rng.uniform() < 0.5 else "F"))
        n_lesions = int(rng.integers(1, 5)) if pathology != HEALTHY else 0
        geom = _geometry(index, shape)
        anat = _anatomy(geom, n_lesions, rng)
        scale = float(np.exp(rng.uniform(math.log(50.0), math.log(3000.0))))
        for session in session_labels or [None]:
            for contrast in contrasts:
                noise_rng = _stream(seed, index, session or "", contrast)
                image, cord, lesion = _write_image_set(root, label, session, contrast, anat, geom, scale, noise_rng)
                images.append(image)
                cord_masks[image] = cord
                if lesion is not None:
                    lesion_masks[image] = lesion
    _write_top_level(root, participants, demographics, seed)
    return SyntheticDataset(root, participants, images, cord_masks, lesion_masks)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors carry the BIDS usage exit code instead of 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bids_app.synthetic",
                description="Write a synthetic spinal-cord phantom BIDS dataset with ground-truth masks.")
    p.add_argument("out_dir", type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--n-healthy", type=int, default=4, help="healthy participants (default 4)")
    p.add_argument("--n-lesion", type=int, default=2, help="participants with lesions (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sessions", nargs="*", default=[], help="session labels (default: no sessions)")
    p.add_argument("--contrasts", nargs="+", default=["T2w"], choices=sorted(CONTRASTS),
                   help="contrasts to write (default T2w)")
    p.add_argument("--shape", nargs=3, type=int, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                   help="voxels along left-right, anterior-posterior, inferior-superior")
    p.add_argument("-v", "--verbose", action="store_true", help="log each file written")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        ds = generate_dataset(args.out_dir, n_healthy=args.n_healthy, n_lesion=args.n_lesion,
                              seed=args.seed, sessions=args.sessions, contrasts=args.contrasts,
                              shape=tuple(args.shape))
    except CountersegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(f"wrote {len(ds.images)} image(s) for {len(ds.participants)} participant(s) to {ds.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
