"""Thresholds without lesion labels: calibrate the anomaly map on held-out healthy images.

A counterfactual model never sees lesions, so its threshold cannot be tuned for Dice. Instead
the residuals of healthy participants the model was *not* trained on (the validation split)
describe what "healthy" looks like, and a voxel is called lesion when its residual exceeds a
high quantile of that healthy distribution.

Two rules set the threshold. The voxel quantile alone bounds the fraction of healthy cord voxels
above it; the image rule (``lesion_free``, the app's) raises it until a new healthy image gets a
lesion, after the same size filter as at inference, with probability ``image_fpr``.

The residuals passed to :func:`calibrate` must be computed exactly as at inference (the same
pipeline and calibrated settings, :func:`bids_app.pipelines.segment.native_residual`), otherwise
the threshold means something else.

Serialised form (``to_dict``)::

    {"format_version": 1, "threshold": 0.31, "quantile": 0.999, "n_voxels": 412345,
     "n_images": 8, "source": "calibrated",
     "reference": {"encoding": "zlib+base64", "dtype": "<f4", "count": 100000, "data": "eJz..."}}

The reference (sorted float32 healthy residuals) is stored as zlib-compressed little-endian
float32 bytes in base64: 100k values take ~0.3-0.5 MB instead of ~1.2 MB as a JSON list, and
round-trip bit-exactly. ``from_dict`` also accepts ``"reference": [..]`` (a plain list).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from bids_app.io import atomic_write_bytes, json_bytes
from bids_app.errors import BadDataError, MissingInputError

logger = logging.getLogger(__name__)

MAX_REFERENCE = 100_000
FORMAT_VERSION = 1
SOURCES = ("calibrated", "user")
RULES = ("voxels", "images")
_ENCODING = "zlib+base64"
_DTYPE = "<f4"


@dataclass(frozen=True, eq=False)
class Calibration:
    """A residual threshold and the healthy reference distribution it came from.

    ``quantile`` is the healthy quantile the threshold sits at (for a user threshold, the
    fraction of the reference at or below it). ``reference`` is sorted, 1-D, float32 and
    read-only. ``eq=False``: the array makes field-wise equality ambiguous.
    """

    threshold: float
    quantile: float
    reference: np.ndarray
    n_voxels: int
    n_images: int
    source: str = "calibrated"
    rule: str = "voxels"
    #: Rule ``images``: the healthy image false-positive rate the threshold was set for (None: the
    #: highest lesion-free threshold of the calibration images, i.e. none of them has a lesion).
    image_fpr: float | None = None
    #: Sorted healthy values of the map lesions grow over (the unsmoothed residual), when it is not
    #: the thresholded one; None: growth reads ``reference``.
    grow_reference: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.image_fpr is not None:
            if not 0.0 < float(self.image_fpr) < 1.0:
                raise ValueError(f"image_fpr must be in (0, 1), got {self.image_fpr!r}")
            object.__setattr__(self, "image_fpr", float(self.image_fpr))
        ref = np.array(self.reference, dtype=np.float32).reshape(-1)
        if ref.size == 0:
            raise ValueError("calibration reference is empty")
        if not np.all(np.isfinite(ref)):
            raise ValueError("calibration reference has non-finite values")
        if np.any(ref[1:] < ref[:-1]):
            raise ValueError("calibration reference must be sorted ascending")
        ref.setflags(write=False)
        object.__setattr__(self, "reference", ref)
        if self.grow_reference is not None:
            grow = np.array(self.grow_reference, dtype=np.float32).reshape(-1)
            if grow.size == 0 or not np.all(np.isfinite(grow)) or np.any(grow[1:] < grow[:-1]):
                raise ValueError("grow_reference must be non-empty, finite and sorted ascending")
            grow.setflags(write=False)
            object.__setattr__(self, "grow_reference", grow)
        if not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold!r}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "quantile", float(self.quantile))
        object.__setattr__(self, "n_voxels", int(self.n_voxels))
        object.__setattr__(self, "n_images", int(self.n_images))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (module doc); the reference is compressed, see there."""
        return {
            "format_version": FORMAT_VERSION,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "n_voxels": self.n_voxels,
            "n_images": self.n_images,
            "source": self.source,
            "rule": self.rule,
            **({"image_fpr": self.image_fpr} if self.image_fpr is not None else {}),
            "reference": _encode_reference(self.reference),
            **({"grow_reference": _encode_reference(self.grow_reference)} if self.grow_reference is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; raises ValueError on malformed content."""
        try:
            version = int(data.get("format_version", FORMAT_VERSION))
            if version > FORMAT_VERSION:
                raise ValueError(f"calibration format {version} is newer than this version reads "
                                 f"({FORMAT_VERSION})")
            return cls(threshold=float(data["threshold"]), quantile=float(data["quantile"]),
                       reference=_decode_reference(data["reference"]),
                       n_voxels=int(data["n_voxels"]), n_images=int(data["n_images"]),
                       source=str(data.get("source", "calibrated")), rule=str(data.get("rule", "voxels")),
                       image_fpr=None if data.get("image_fpr") is None else float(data["image_fpr"]),
                       grow_reference=(None if data.get("grow_reference") is None
                                       else _decode_reference(data["grow_reference"])))
        except KeyError as exc:
            raise ValueError(f"calibration lacks the field {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"malformed calibration: {exc}") from None


#: The calibration file's name in a model directory.
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class CalibrationFile:
    """The model directory's calibration file: what the threshold holds for (``identity``: the
    models' checksums and every calibrated setting), a ``summary`` for the model card, and the
    calibration itself."""

    identity: Mapping[str, Any]
    summary: Mapping[str, Any]
    calibration: Calibration


def write_calibration_file(path: str | Path, content: CalibrationFile) -> str:
    """Write atomically; returns the file's SHA-256 (the model card records it)."""
    data = json_bytes({"identity": content.identity, "summary": content.summary,
                       "calibration": content.calibration.to_dict()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_calibration_file(path: str | Path, expected_sha256: str | None = None) -> CalibrationFile:
    """Read the file; missing -> MissingInputError (66), modified or malformed -> BadDataError (65)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingInputError(f"calibration file not found: {path}") from None
    except OSError as exc:
        raise BadDataError(f"cannot read calibration {path}: {exc.strerror or exc}") from exc
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BadDataError(f"{path}: checksum mismatch with the model card: the calibration is corrupted or was "
                           "modified")
    try:
        stored = json.loads(data)
        if not isinstance(stored, dict):
            raise ValueError("expected a JSON object")
        return CalibrationFile(stored["identity"], stored["summary"], Calibration.from_dict(stored["calibration"]))
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise BadDataError(f"invalid calibration {path}: {exc}") from exc


def _encode_reference(values: np.ndarray) -> dict[str, Any]:
    payload = zlib.compress(values.astype(_DTYPE).tobytes(), level=9)
    return {"encoding": _ENCODING, "dtype": _DTYPE, "count": int(values.size),
            "data": base64.b64encode(payload).decode("ascii")}


def _decode_reference(obj: Any) -> np.ndarray:
    """The reference from its serialised form: the compressed mapping, or a plain list."""
    if isinstance(obj, list):
        return np.asarray(obj, dtype=np.float32)
    if not isinstance(obj, Mapping):
        raise ValueError("reference must be a list or an encoded mapping")
    if obj.get("encoding") != _ENCODING or obj.get("dtype") != _DTYPE:
        raise ValueError(f"unsupported reference encoding {obj.get('encoding')!r}/{obj.get('dtype')!r}")
    try:
        raw = zlib.decompress(base64.b64decode(obj["data"], validate=True))
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"reference data is corrupt: {exc}") from None
    ref = np.frombuffer(raw, dtype=_DTYPE)
    if ref.size != int(obj["count"]):
        raise ValueError(f"reference has {ref.size} values, header says {obj['count']}")
    return ref.astype(np.float32)


def subsample_sorted(values: np.ndarray, max_values: int = MAX_REFERENCE) -> np.ndarray:
    """At most ``max_values`` evenly spaced order statistics of ``values`` (sorted float32).

    Deterministic, and better than a random subset: taking evenly spaced ranks keeps the
    empirical CDF within ``1 / max_values`` of the full one everywhere, tails included.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float32).reshape(-1))
    if ordered.size <= max_values:
        return ordered
    ranks = np.round(np.linspace(0, ordered.size - 1, max_values)).astype(np.int64)
    return ordered[ranks]


def image_bound(lesion_free: Sequence[float], image_fpr: float | None) -> float:
    """The threshold above which a new healthy image has a lesion with probability ``image_fpr``.

    ``lesion_free`` holds, per calibration image, the lowest threshold that leaves it without a
    lesion: a new healthy image gets a false positive when the threshold is below its own value.
    Modelling these values as normal, the one-sided prediction bound for one more draw is
    ``mean + t(1 - fpr; n - 1) * sd * sqrt(1 + 1/n)`` (Student t, sample sd): it accounts for the
    mean and spread being estimated from ``n`` images, so it is wide for few images and tends to
    the normal quantile for many (docs/benchmarks.md, "Image-level calibration"). ``image_fpr=None``,
    or a single image, gives the calibration images' maximum.
    """
    values = np.asarray(lesion_free, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("image_bound needs at least one lesion-free threshold")
    if not np.all(np.isfinite(values)):
        raise ValueError("lesion-free thresholds must be finite")
    if image_fpr is None or values.size == 1:
        if image_fpr is not None:
            logger.warning("calibration: one calibration image cannot estimate a %.0f %% image false-positive "
                           "rate; its own lesion-free threshold is used", 100 * image_fpr)
        return float(values.max())
    if not 0.0 < image_fpr < 1.0:
        raise ValueError(f"image_fpr must be in (0, 1), got {image_fpr!r}")
    n = values.size
    spread = float(values.std(ddof=1)) * math.sqrt(1.0 + 1.0 / n)
    return float(values.mean() + stats.t.ppf(1.0 - image_fpr, n - 1) * spread)


def calibrate(
    healthy_residuals: Sequence[np.ndarray],
    regions: Sequence[np.ndarray],
    quantile: float,
    max_reference: int = MAX_REFERENCE,
    lesion_free: Sequence[float] | None = None,
    image_fpr: float | None = None,
    grow_residuals: Sequence[np.ndarray] | None = None,
) -> Calibration:
    """Threshold = ``quantile`` of the pooled in-region residuals of held-out healthy images.

    ``lesion_free`` (rule ``images``): each calibration image's :func:`~bids_app.segmentation.
    lesions.lesion_free_threshold`; the threshold is then raised, where it is lower, to
    :func:`image_bound` at ``image_fpr`` (None: their maximum, so that no calibration image gets a
    lesion after the size filter). The voxel quantile alone bounds healthy voxels, not healthy
    images (docs/benchmarks.md). ``quantile`` then records where the threshold sits in the healthy
    distribution.

    ``grow_residuals``: per image, the map lesions grow over when it is not the thresholded one
    (the unsmoothed residual); its in-region values are kept as ``grow_reference``.

    Pooling voxels (not per-image thresholds) weights images by their region size, which is
    what the voxel-wise false-positive bound in the module doc needs. ``np.quantile``'s default
    (linear) interpolation is used on the full pool; only the stored reference is subsampled.
    """
    if len(healthy_residuals) == 0:
        raise ValueError("calibration needs at least one healthy image")
    if len(healthy_residuals) != len(regions):
        raise ValueError(f"{len(healthy_residuals)} residual maps but {len(regions)} regions")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    if max_reference < 2:
        raise ValueError(f"max_reference must be at least 2, got {max_reference}")
    parts = []
    for k, (res, reg) in enumerate(zip(healthy_residuals, regions)):
        res, reg = np.asarray(res), np.asarray(reg, dtype=bool)
        if res.shape != reg.shape:
            raise ValueError(f"image {k}: residual shape {res.shape} != region shape {reg.shape}")
        parts.append(res[reg].astype(np.float64))
    pool = np.concatenate(parts)
    if pool.size == 0:
        raise ValueError("the analysis regions of the calibration images are all empty")
    if not np.all(np.isfinite(pool)):
        raise ValueError("calibration residuals have non-finite values")
    threshold = float(np.quantile(pool, quantile))
    rule = "voxels"
    if lesion_free is not None:
        if len(lesion_free) != len(parts):
            raise ValueError(f"{len(lesion_free)} lesion-free thresholds for {len(parts)} images")
        rule = "images"
        bound = image_bound(lesion_free, image_fpr)
        if bound > threshold:
            logger.info("calibration: threshold raised from %.4g (quantile %.4g) to %.4g for %s", threshold,
                        quantile, bound, "no calibration image with a lesion" if image_fpr is None else
                        f"a {100 * image_fpr:.0f} % healthy image false-positive rate ({len(lesion_free)} images)")
            threshold = bound
            quantile = float(np.mean(pool <= threshold))
    tail = pool.size * (1.0 - quantile)
    if rule == "voxels" and tail < 10:
        logger.warning("calibration: only %.1f healthy voxels expected above the %.4g quantile; the "
                       "threshold is poorly determined (use more images or a lower quantile)",
                       tail, quantile)
    logger.info("calibrated threshold %.4g at quantile %.4g from %d voxels of %d healthy image(s)",
                threshold, quantile, pool.size, len(parts))
    grow_reference = None
    if grow_residuals is not None:
        if len(grow_residuals) != len(parts):
            raise ValueError(f"{len(grow_residuals)} growth maps for {len(parts)} images")
        grow_pool = np.concatenate([np.asarray(g)[np.asarray(reg, dtype=bool)] for g, reg in zip(grow_residuals, regions)])
        if not np.all(np.isfinite(grow_pool)):
            raise ValueError("calibration growth maps have non-finite values")
        grow_reference = subsample_sorted(grow_pool, max_reference)
    return Calibration(threshold=threshold, quantile=float(quantile),
                       reference=subsample_sorted(pool, max_reference), n_voxels=int(pool.size),
                       n_images=len(parts), source="calibrated", rule=rule,
                       image_fpr=image_fpr if rule == "images" else None, grow_reference=grow_reference)


def healthy_cdf(values: np.ndarray | float, calibration: Calibration) -> np.ndarray:
    """Empirical CDF of the healthy reference: fraction of reference values <= ``values``."""
    ref = calibration.reference
    return np.searchsorted(ref, np.asarray(values, dtype=np.float32), side="right") / ref.size


def probability_map(
    residual: np.ndarray, calibration: Calibration, region: np.ndarray | None = None
) -> np.ndarray:
    """The anomaly score written as the ``_probseg`` image: where each voxel's residual ``r`` sits in
    the healthy reference distribution, ``(#{reference <= r} + 1 + [r > threshold]) / (N + 2)``.

    About the fraction of healthy in-region voxels with a residual at most this high (0.99: higher
    than 99 % of them); ``N`` is the reference size. The ``+ 1`` (the voxel itself) keeps every
    in-region score above 0, so ``score > 0`` is the analysis region; counting the threshold as
    one more reference value once it is exceeded makes ``score > probseg_threshold(calibration)``
    exactly ``residual > calibration.threshold`` (the voxel ECDF alone is flat between two reference
    values, where the threshold usually falls). 0 outside ``region``. This is a healthy-tail score,
    not a posterior: a typical healthy voxel scores ~0.5, and the threshold is not at 0.5.
    """
    residual = np.asarray(residual)
    counts = _reference_counts(residual, calibration) + 1 + (residual > calibration.threshold)
    prob = (counts / (calibration.reference.size + 2)).astype(np.float32)
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != residual.shape:
            raise ValueError(f"region has shape {region.shape}, residual has {residual.shape}")
        prob[~region] = 0.0
    return prob


def probseg_threshold(calibration: Calibration) -> float:
    """The threshold in the units of :func:`probability_map`: ``score > probseg_threshold`` exactly
    where ``residual > calibration.threshold`` (also after the score is stored as float32)."""
    count = _reference_counts(np.asarray(calibration.threshold), calibration) + 1
    return float((count / (calibration.reference.size + 2)).astype(np.float32))


def _reference_counts(values: np.ndarray, calibration: Calibration) -> np.ndarray:
    """How many reference values are <= each value (compared in float32, as the reference is stored)."""
    return np.searchsorted(calibration.reference, np.asarray(values, dtype=np.float32), side="right")


def with_threshold(calibration: Calibration, threshold: float) -> Calibration:
    """A user-chosen threshold (``--threshold``) on top of a calibration: source ``"user"``.

    The reference is kept for the probability map; ``quantile`` becomes the healthy quantile
    of the user threshold, so reports can say how far into the healthy tail it lies.
    """
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    quantile = float(healthy_cdf(threshold, calibration))
    logger.info("user threshold %.4g (healthy quantile %.4g; calibrated was %.4g)",
                threshold, quantile, calibration.threshold)
    return replace(calibration, threshold=threshold, quantile=quantile, source="user")


def grow_threshold(calibration: Calibration, quantile: float | None) -> float | None:
    """The lower threshold lesions grow to (:func:`~bids_app.segmentation.lesions.grow_lesions`):
    the ``quantile`` of the healthy values of the map they grow over (``grow_reference`` when the
    calibration has one, else the thresholded map's ``reference``), or None (no growth) when
    ``quantile`` is None or, on the thresholded map itself, the value is not below the threshold
    (e.g. a user threshold lower than it)."""
    if quantile is None:
        return None
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"grow quantile must be in (0, 1), got {quantile!r}")
    if calibration.grow_reference is not None:
        return float(np.quantile(calibration.grow_reference.astype(np.float64), quantile))
    value = float(np.quantile(calibration.reference.astype(np.float64), quantile))
    return value if value < calibration.threshold else None
