"""Data fingerprint of the training images, and the preprocessing plan derived from it.

As nnU-Net does, the group level summarises what the healthy training images look like (spacings,
shapes, orientations, intensity percentiles, cord sizes) and derives the target spacing and shape
from that summary instead of a fixed 1 mm: resampling spine-generic 0.8 mm data to 1 mm would throw
resolution away. Values fixed in the settings win over derived ones.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_app.errors import BadDataError
from bids_app.preprocessing.plan import PreprocessingPlan

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "dataset_fingerprint.json"
PERCENTILES = (0.5, 50.0, 99.5)


@dataclass(frozen=True)
class ImageFingerprint:
    """One image, described in RAS voxel-axis order (as after reorientation)."""

    image: str
    axcodes: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    percentiles: tuple[float, float, float]
    cord_extent_mm: tuple[float, float, float] | None = None

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        return tuple(n * z for n, z in zip(self.shape, self.spacing))  # type: ignore[return-value]


@dataclass(frozen=True)
class Fingerprint:
    """All training images; the medians drive the plan."""

    images: tuple[ImageFingerprint, ...]

    def median_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median([i.spacing for i in self.images], axis=0))  # type: ignore[return-value]

    def median_field_of_view(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median([i.field_of_view_mm for i in self.images], axis=0))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": [dataclasses.asdict(i) for i in self.images],
            "median_spacing": list(self.median_spacing()),
            "median_field_of_view_mm": list(self.median_field_of_view()),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fingerprint":
        images = []
        for item in data["images"]:
            extent = item.get("cord_extent_mm")
            images.append(ImageFingerprint(
                image=item["image"], axcodes=item["axcodes"], shape=tuple(item["shape"]),
                spacing=tuple(item["spacing"]), percentiles=tuple(item["percentiles"]),
                cord_extent_mm=tuple(extent) if extent is not None else None,
            ))
        return cls(tuple(images))


def fingerprint_image(image: Path, cord_mask: Path | None = None, name: str | None = None) -> ImageFingerprint:
    """Geometry and intensity summary of one image (and its cord mask's extent)."""
    import nibabel as nib

    try:
        img = nib.load(str(image))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for bad files; all are bad data here
        raise BadDataError(f"{image}: cannot read NIfTI image ({exc})") from exc
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise BadDataError(f"{image}: expected a 3D image, got shape {data.shape}")
    ornt = nib.orientations.io_orientation(img.affine)
    order = [int(a) for a in ornt[:, 0]]
    ras_axes = np.argsort(order)  # the source axis that becomes R, A, S
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    finite = data[np.isfinite(data)]
    percentiles = np.percentile(finite, PERCENTILES) if finite.size else np.zeros(3)
    extent = None
    if cord_mask is not None:
        mask = np.asanyarray(nib.load(str(cord_mask)).dataobj) > 0.5
        mask = mask.reshape(mask.shape[:3])
        if mask.any():
            coords = np.nonzero(mask)
            size = np.array([c.max() - c.min() + 1 for c in coords]) * zooms
            extent = tuple(round(float(size[a]), 3) for a in ras_axes)
    return ImageFingerprint(
        image=name or str(image),
        axcodes="".join(nib.aff2axcodes(img.affine)),
        shape=tuple(int(data.shape[a]) for a in ras_axes),  # type: ignore[arg-type]
        spacing=tuple(round(float(zooms[a]), 4) for a in ras_axes),  # type: ignore[arg-type]
        percentiles=tuple(round(float(p), 4) for p in percentiles),  # type: ignore[arg-type]
        cord_extent_mm=extent,  # type: ignore[arg-type]
    )


def compute_fingerprint(items: Sequence[tuple[Path, Path | None, str]]) -> Fingerprint:
    """Fingerprint of (image, cord mask or None, display name) triples."""
    if not items:
        raise ValueError("a fingerprint needs at least one image")
    return Fingerprint(tuple(fingerprint_image(image, mask, name) for image, mask, name in items))


def plan_from_fingerprint(
    fingerprint: Fingerprint,
    max_shape: Sequence[int],
    shape_multiple: int = 16,
    fixed: Mapping[str, Any] | None = None,
) -> PreprocessingPlan:
    """Median spacing; a shape covering the median field of view, capped at ``max_shape`` and
    rounded to a multiple of ``shape_multiple`` (the networks' total downsampling)."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    spacing = tuple(fixed.get("target_spacing") or (round(s, 3) for s in fingerprint.median_spacing()))
    if "target_shape" in fixed:
        shape = tuple(int(v) for v in fixed["target_shape"])
    else:
        fov = fingerprint.median_field_of_view()
        shape = tuple(
            _fit(math.ceil(f / s - 1e-6), int(cap), shape_multiple) for f, s, cap in zip(fov, spacing, max_shape)
        )
    values = {k: v for k, v in fixed.items() if k not in ("target_spacing", "target_shape")}
    plan = PreprocessingPlan(target_spacing=tuple(float(s) for s in spacing), target_shape=shape, **values)
    log.info("preprocessing plan: spacing %s mm, shape %s (from %d training images)",
             plan.target_spacing, plan.target_shape, len(fingerprint.images))
    return plan


def save_fingerprint(fingerprint: Fingerprint, directory: Path) -> Path:
    from bids_app.io import atomic_write_json

    return atomic_write_json(Path(directory) / FINGERPRINT_FILE, fingerprint.to_dict())


def load_fingerprint(directory: Path) -> Fingerprint:
    path = Path(directory) / FINGERPRINT_FILE
    try:
        return Fingerprint.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadDataError(f"{path}: invalid dataset fingerprint: {exc}") from exc


def _fit(voxels: int, cap: int, multiple: int) -> int:
    """Round up to the multiple, but never past the cap (itself rounded down to the multiple)."""
    cap = max(multiple, cap // multiple * multiple)
    return min(cap, max(multiple, -(-voxels // multiple) * multiple))
