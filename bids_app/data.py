"""Training data: a cached, optionally augmented torch Dataset over preprocessed volumes, and the
participant-level train/validation split.

The cache lives in the work dir, one ``.npz`` per image (no pickles), keyed by the content hash of
the source files and the plan digest, so a changed file or plan never reuses a stale entry; a
corrupted entry is rebuilt. Source files are hashed once when the dataset is built; later reads
check only ``stat`` and read the NIfTI again only when a file changed.

Augmentation is for training only. The validation and calibration data come from
``TrainingVolumes(..., augment=None)``, so they see exactly what inference sees.

The cache holds each volume covering the whole cord (``preprocess(..., cover=True)``, as
inference sees it); an item is a window of the plan's shape: at a random position for training
(so the models learn every level of the cord, not just its middle), centred otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bids_app.preprocessing.plan import PreprocessingPlan

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: entries cover the whole cord


@dataclass(frozen=True)
class Sample:
    """One image to preprocess: its source files and a stable name."""

    name: str
    image: Path
    masks: Mapping[str, Path]


@dataclass(frozen=True)
class AugmentationSettings:
    """Training-time augmentation; every draw comes from a generator seeded by (seed, epoch, index)."""

    rotation_degrees: float = 5.0
    flip_left_right: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma: float = 0.2
    #: Chance that an item is seen as a 2D acquisition with thick slices across a random axis
    #: (``thick_slices``): the healthy prior then knows what 3-4 mm slices do to a healthy cord.
    thick_slice_probability: float = 0.5
    thick_slice_mm: tuple[float, float] = (3.0, 4.0)
    crop_shape: tuple[int, int, int] | None = None


def split_participants(
    participants: Sequence[str], validation_fraction: float, seed: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split by participant (never by image), seeded; at least one of each when there are two or more."""
    labels = sorted(set(participants))
    if len(labels) < 2 or validation_fraction <= 0:
        return tuple(labels), ()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = min(len(labels) - 1, max(1, round(validation_fraction * len(labels))))
    validation = tuple(sorted(labels[i] for i in order[:n_val]))
    train = tuple(label for label in labels if label not in validation)
    return train, validation


def content_hash(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _signature(paths: Sequence[Path]) -> tuple[tuple[int, int], ...]:
    stats = [os.stat(p) for p in paths]
    return tuple((s.st_size, s.st_mtime_ns) for s in stats)


class PreprocessedCache:
    """Preprocessed arrays on disk under ``cache_dir``, keyed by source content and plan."""

    def __init__(self, cache_dir: Path, plan: PreprocessingPlan) -> None:
        self.cache_dir = Path(cache_dir)
        self.plan = plan

    def key(self, sample: Sample) -> str:
        files = [sample.image, *(sample.masks[k] for k in sorted(sample.masks))]
        parts = f"{CACHE_FORMAT}:{self.plan.digest()}:{sorted(sample.masks)}:{content_hash(files)}"
        return hashlib.sha256(parts.encode()).hexdigest()[:32]

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.cache_dir / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if "image" not in arrays or "valid" not in arrays:
                raise KeyError("incomplete entry")
            return arrays
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("cache entry %s is corrupted (%s): rebuilding it", path, exc)
            return None

    def store(self, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        from bids_app.io import atomic_write_bytes
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write_bytes(self.cache_dir / f"{key}.npz", buffer.getvalue())


class TrainingVolumes(Dataset):
    """Preprocessed volumes as tensors ``(1, X, Y, Z)`` with masks and the valid-voxel map."""

    def __init__(
        self,
        samples: Sequence[Sample],
        plan: PreprocessingPlan,
        cache_dir: Path,
        augment: AugmentationSettings | None = None,
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.plan = plan
        self.cache = PreprocessedCache(cache_dir, plan)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._keys = [self._fresh_key(s) for s in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """A new epoch draws new augmentations (deterministically from the seed)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            arrays = model_window(self.covering(index), self.plan.target_shape, rng)
            arrays = augment_volume(arrays, self.augment, rng, self.plan.target_spacing)
        else:
            arrays = self.arrays(index)
        item: dict[str, Any] = {"name": self.samples[index].name, "index": index}
        for name, array in arrays.items():
            if name == "image":
                item[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
            elif name == "valid" or name.startswith("mask_"):
                item[name.removeprefix("mask_")] = torch.from_numpy(np.ascontiguousarray(array, dtype=bool))[None]
        return item

    def arrays(self, index: int) -> dict[str, np.ndarray]:
        """Un-augmented model-space arrays of one sample: the centred window of the plan's shape."""
        return model_window(self.covering(index), self.plan.target_shape, None)

    def covering(self, index: int) -> dict[str, np.ndarray]:
        """Model-space arrays covering the sample's whole cord, from the cache when it is current."""
        sample = self.samples[index]
        signature, key = self._keys[index]
        if _signature(self._files(sample)) != signature:
            signature, key = self._keys[index] = self._fresh_key(sample)
        cached = self.cache.load(key)
        if cached is not None:
            return {k: v for k, v in cached.items() if k in ("image", "valid") or k.startswith("mask_")}
        arrays = self._preprocess(sample)
        self.cache.store(key, arrays)
        return {k: v for k, v in arrays.items() if k != "trace"}

    def _preprocess(self, sample: Sample) -> dict[str, np.ndarray]:
        from bids_app.preprocessing.pipeline import preprocess

        result = preprocess(sample.image, self.plan, masks=dict(sample.masks), cover=True)
        arrays = {"image": result.image.astype(np.float32), "valid": result.valid.astype(bool)}
        for name, mask in result.masks.items():
            arrays[f"mask_{name}"] = mask.astype(np.uint8)
        arrays["trace"] = np.array(json.dumps(result.trace.to_dict()))
        return arrays

    def _fresh_key(self, sample: Sample) -> tuple[tuple[tuple[int, int], ...], str]:
        files = self._files(sample)
        return _signature(files), self.cache.key(sample)

    @staticmethod
    def _files(sample: Sample) -> list[Path]:
        return [sample.image, *(sample.masks[k] for k in sorted(sample.masks))]


def model_window(arrays: Mapping[str, np.ndarray], shape: Sequence[int],
                 rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """A ``shape`` window of covering arrays: random (``rng``) or centred (``None``); arrays
    already of that shape come back unchanged."""
    full = np.array(arrays["image"].shape)
    size = np.minimum(np.array([int(n) for n in shape]), full)
    room = full - size
    # Centred as CropPad centres (half up), so a centred window equals the plain crop.
    start = [int(rng.integers(0, r + 1)) if rng is not None else int((r + 1) // 2) for r in room]
    window = tuple(slice(a, a + c) for a, c in zip(start, size))
    return {k: np.ascontiguousarray(np.asarray(v)[window]) for k, v in arrays.items()}


def augment_volume(
    arrays: Mapping[str, np.ndarray], settings: AugmentationSettings, rng: np.random.Generator,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, np.ndarray]:
    """Random flip (left-right = axis 0 in RAS), small rotation, thick slices, intensity
    scale/shift/gamma and an optional random crop, applied consistently to the image, its masks and
    the valid map (thick slices change the image only). ``spacing``: the arrays' voxel size in mm."""
    from scipy import ndimage

    out = {k: np.asarray(v) for k, v in arrays.items()}
    if rng.random() < settings.flip_left_right:
        out = {k: np.ascontiguousarray(v[::-1]) for k, v in out.items()}
    if settings.rotation_degrees > 0:
        matrix = _small_rotation(rng, settings.rotation_degrees)
        centre = (np.array(out["image"].shape) - 1) / 2
        offset = centre - matrix @ centre
        for name, array in out.items():
            is_image = name == "image"
            out[name] = ndimage.affine_transform(
                array.astype(np.float32), matrix, offset=offset, order=1 if is_image else 0,
                mode="constant", cval=-1.0 if is_image else 0.0,
            ).astype(array.dtype)
    if settings.thick_slice_probability > 0 and rng.random() < settings.thick_slice_probability:
        axis = int(rng.integers(0, 3))
        thickness = rng.uniform(*settings.thick_slice_mm) / float(spacing[axis])
        out["image"] = thick_slices(out["image"], axis, thickness, float(rng.random()))
    image = out["image"].astype(np.float32)
    scale = 1 + rng.uniform(-settings.intensity_scale, settings.intensity_scale)
    shift = rng.uniform(-settings.intensity_shift, settings.intensity_shift)
    gamma = float(np.exp(rng.uniform(-settings.gamma, settings.gamma)))
    unit = np.clip((image + 1) / 2, 0, 1) ** gamma
    image = np.clip((unit * 2 - 1) * scale + shift, -1, 1)
    out["image"] = np.where(out["valid"].astype(bool), image, -1.0).astype(np.float32)
    if settings.crop_shape is not None:
        shape = np.array(out["image"].shape)
        crop = np.minimum(np.array(settings.crop_shape), shape)
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)]
        window = tuple(slice(a, a + c) for a, c in zip(start, crop))
        out = {k: np.ascontiguousarray(v[window]) for k, v in out.items()}
    return out


def thick_slices(image: np.ndarray, axis: int, thickness: float, phase: float = 0.0) -> np.ndarray:
    """``image`` as a 2D acquisition with slices ``thickness`` voxels thick across ``axis`` shows it
    once resampled back to this grid: each slice is the mean of the image over its slab (a
    rectangular slice profile), and the voxels between slice centres are interpolated linearly (as
    the preprocessing resamples). ``phase`` in [0, 1) shifts the slab boundaries by that fraction of
    a slice. Slabs are cut at the volume's edges."""
    if thickness <= 1:
        return np.asarray(image, dtype=np.float32)
    lines = np.moveaxis(np.asarray(image, dtype=np.float64), axis, 0)
    n = lines.shape[0]
    # Integral of the image along the axis at voxel boundaries 0..n (voxel i spans [i, i + 1)).
    integral = np.concatenate([np.zeros((1, *lines.shape[1:])), np.cumsum(lines, axis=0)])

    def integral_at(x: np.ndarray) -> np.ndarray:
        index = np.minimum(np.floor(x).astype(int), n - 1)
        fraction = (x - index).reshape(-1, *([1] * (lines.ndim - 1)))
        return integral[index] + fraction * lines[index]

    first = (phase % 1.0 - 1.0) * thickness
    bounds = np.clip(first + thickness * np.arange(int(np.ceil((n - first) / thickness)) + 1), 0, n)
    start, end = bounds[:-1], bounds[1:]
    keep = end - start > 1e-9
    start, end = start[keep], end[keep]
    width = (end - start).reshape(-1, *([1] * (lines.ndim - 1)))
    slabs = (integral_at(end) - integral_at(start)) / width
    centres = (start + end) / 2 - 0.5  # voxel-centre coordinates
    if len(centres) == 1:
        resampled = np.broadcast_to(slabs, lines.shape)
    else:
        positions = np.arange(n, dtype=float)
        left = np.clip(np.searchsorted(centres, positions, side="right") - 1, 0, len(centres) - 2)
        weight = np.clip((positions - centres[left]) / (centres[left + 1] - centres[left]), 0, 1)
        weight = weight.reshape(-1, *([1] * (lines.ndim - 1)))
        resampled = slabs[left] * (1 - weight) + slabs[left + 1] * weight
    return np.ascontiguousarray(np.moveaxis(resampled, 0, axis), dtype=np.float32)


def _small_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation by at most ``max_degrees`` about a random axis (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
