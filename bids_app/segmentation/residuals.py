"""Residual (anomaly) maps: how far an image is from its pseudo-healthy counterfactual.

The lesion evidence is the voxel-wise residual ``|x - x_hat|`` between a model-space image
``x`` (RAS voxel order, intensities normalised to [-1, 1], background near -1) and its healthy
counterfactual ``x_hat``. Several counterfactuals of one image (different noise strengths or
seeds) form an ensemble: their mean residual is the anomaly map, their spread an uncertainty
map. The map is then median-filtered (diffusion models leave salt-and-pepper residuals that are
not lesions) and restricted to an *analysis region*: the cord mask, or the body
foreground when no cord mask exists. Padded voxels (``valid == False``) never count.

Typical order, also used for calibration so thresholds mean the same at inference::

    mean, spread = residual_map(image, counterfactuals)
    mean = smooth(mean, median_footprint(spacing_mm, model_spacing_mm), valid=valid)
    region, source = analysis_region(valid, cord, image=image)
    mean = restrict(mean, region)
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Default intensity above which a voxel counts as body foreground. Images are normalised so
#: that the 0.5th percentile maps to -1; -0.8 is 10 % of the intensity range above that floor,
#: above air/noise but below every tissue of a T2w/T1w cord image.
DEFAULT_FOREGROUND_THRESHOLD = -0.8

POLARITIES = ("bright", "dark", "both")

#: Edge of the median filter of the map that is thresholded, in voxels of the model grid: isolated
#: speckle of the sampling (about a model voxel across) is not a lesion. On the native grid the
#: filter spans as many millimetres (``median_footprint``).
MEDIAN_SIZE = 3
#: The same for the map lesions grow over (hysteresis): unsmoothed, as the median filter that keeps
#: speckle from being found also rounds off a lesion's edges.
GROW_MEDIAN_SIZE = 1

#: Version of the thresholded map and of the region it is searched in, stored with each calibration:
#: a threshold calibrated on another version's maps means something else. 2: the median filter spans
#: millimetres of the model grid, and the outermost voxel layer is never searched.
RESIDUAL_MAP_VERSION = 2

_foreground_warned = False  # the fallback is announced once per process, then logged at INFO


def signed_residual(image: np.ndarray, counterfactual: np.ndarray, polarity: str) -> np.ndarray:
    """What the counterfactual removed: brighter than it (``bright``: T2-hyperintense lesions),
    darker (``dark``: T1 hypointensities), or either (``both``: ``|x - x_hat|``); never negative."""
    difference = image - counterfactual
    if polarity == "bright":
        return np.maximum(difference, 0.0)
    if polarity == "dark":
        return np.maximum(-difference, 0.0)
    if polarity == "both":
        return np.abs(difference)
    raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")


def agreement_residual(image: np.ndarray, counterfactual: np.ndarray, decoded: np.ndarray,
                       polarity: str) -> np.ndarray:
    """Geometric mean of the residual against the transferred counterfactual and against the raw
    decoding, where both point the same way (``polarity``); 0 where either does not.

    The transferred residual ``x - x_hat = D(E(x)) - D(z)`` is free of the autoencoder's
    reconstruction error but only as sharp as the latent grid (a latent voxel is 4 image voxels
    a side); the raw one ``x - D(z)`` has the input's sharp lesion edges but also every
    reconstruction error. A voxel both call lesion-like keeps a high score, and each one's own
    false alarms are damped by the other (docs/benchmarks.md, "Agreement residual").
    """
    x = np.asarray(image, dtype=np.float64)
    transferred = x - np.asarray(counterfactual, dtype=np.float64)
    raw = x - np.asarray(decoded, dtype=np.float64)
    if polarity == "bright":
        product = np.maximum(transferred, 0.0) * np.maximum(raw, 0.0)
    elif polarity == "dark":
        product = np.maximum(-transferred, 0.0) * np.maximum(-raw, 0.0)
    elif polarity == "both":
        product = np.maximum(transferred * raw, 0.0)
    else:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    return np.sqrt(product)


def residual_map(image: np.ndarray, counterfactuals: Sequence[np.ndarray],
                 polarity: str = "both",
                 decodings: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the residual (:func:`signed_residual`) over an ensemble of counterfactuals.

    Averaging over strengths/seeds suppresses residuals that one sample alone reconstructs
    badly; the per-voxel standard deviation (population, ddof=0) across samples tells where
    the model is unsure (all zeros for a single sample). Both are float32. With ``decodings``
    (each counterfactual's raw decoding, reference ``both``) the residual of each sample is
    :func:`agreement_residual` instead.
    """
    image = np.asarray(image)
    if len(counterfactuals) == 0:
        raise ValueError("residual_map needs at least one counterfactual")
    if decodings is not None and len(decodings) != len(counterfactuals):
        raise ValueError(f"{len(decodings)} decodings for {len(counterfactuals)} counterfactuals")
    x = image.astype(np.float64)
    total = np.zeros(x.shape, dtype=np.float64)
    total_sq = np.zeros(x.shape, dtype=np.float64)
    for k, cf in enumerate(counterfactuals):
        cf = np.asarray(cf)
        if cf.shape != image.shape:
            raise ValueError(f"counterfactual {k} has shape {cf.shape}, image has {image.shape}")
        if not np.all(np.isfinite(cf)):
            raise ValueError(f"counterfactual {k} has non-finite values")
        if decodings is None:
            r = signed_residual(x, cf.astype(np.float64), polarity)
        else:
            decoded = np.asarray(decodings[k])
            if decoded.shape != image.shape:
                raise ValueError(f"decoding {k} has shape {decoded.shape}, image has {image.shape}")
            r = agreement_residual(x, cf, decoded, polarity)
        total += r
        total_sq += r * r
    n = len(counterfactuals)
    mean = total / n
    # Residuals lie in [0, 2], so the one-pass variance in float64 is exact enough; clip the
    # tiny negative round-off before the square root.
    spread = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0)) if n > 1 else np.zeros_like(mean)
    return mean.astype(np.float32), spread.astype(np.float32)


def median_footprint(spacing_mm: Sequence[float], model_spacing_mm: Sequence[float],
                     model_voxels: int = MEDIAN_SIZE) -> tuple[int, ...]:
    """Edge of the median filter along each axis of a grid of ``spacing_mm``: the odd number of
    voxels nearest to ``model_voxels`` voxels of the model grid (``model_spacing_mm``, the same axis
    order), at least 1.

    The speckle the filter removes is as fine as the model grid, whatever the image's own grid:
    ``model_voxels`` on a grid like the model's, more across finer voxels, and 1 across thick
    slices, whose neighbours are other anatomy (a 3-voxel median across 3 mm slices drops every
    lesion one slice thick).
    """
    spacing = check_spacing(spacing_mm, len(spacing_mm))
    model = check_spacing(model_spacing_mm, len(spacing))
    return tuple(max(1, 2 * math.floor((model_voxels * m / s - 1) / 2 + 0.5) + 1) for s, m in zip(spacing, model))


def smooth(residual: np.ndarray, median_size: int | Sequence[int], valid: np.ndarray | None = None) -> np.ndarray:
    """3D median filter of a residual map (``median_size`` voxels a side, or one edge per axis;
    1 returns a copy).

    A median removes isolated bright voxels (diffusion sampling noise) while keeping the edges
    of lesions larger than half the window. With ``valid``, padded voxels are set to 0 first, so
    the (meaningless) residual of padding cannot bleed into real voxels next to it.
    """
    residual = np.asarray(residual, dtype=np.float32)
    sizes = tuple(median_size) if isinstance(median_size, Sequence) else (median_size,) * residual.ndim
    if len(sizes) != residual.ndim or any(int(n) != n or n < 1 for n in sizes):
        raise ValueError(f"median_size must be an integer >= 1 or one per axis, got {median_size!r}")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != residual.shape:
            raise ValueError(f"valid has shape {valid.shape}, residual has {residual.shape}")
        residual = np.where(valid, residual, np.float32(0.0))
    if all(n == 1 for n in sizes):
        return residual.copy()
    return ndimage.median_filter(residual, size=[int(n) for n in sizes], mode="nearest")


def body_foreground(image: np.ndarray, threshold: float = DEFAULT_FOREGROUND_THRESHOLD) -> np.ndarray:
    """Voxels brighter than ``threshold``, with enclosed dark holes (e.g. CSF, bone) filled."""
    fg = np.asarray(image) > threshold
    return ndimage.binary_fill_holes(fg)


def analysis_region(
    valid: np.ndarray,
    cord_mask: np.ndarray | None,
    image: np.ndarray | None = None,
    foreground_threshold: float = DEFAULT_FOREGROUND_THRESHOLD,
) -> tuple[np.ndarray, str]:
    """Where lesions are looked for: ``(region, source)`` with source ``"cord"`` or ``"foreground"``.

    The cord mask when it is given and non-empty (not dilated: the bright CSF next to the cord would
    dominate a dilated region); otherwise the body foreground of ``image`` (a much larger region, so expect
    more false positives; announced by a warning). Always intersected with ``valid`` so padded
    voxels never count.
    """
    global _foreground_warned
    valid = np.asarray(valid, dtype=bool)
    if cord_mask is not None:
        cord = np.asarray(cord_mask) > 0
        if cord.shape != valid.shape:
            raise ValueError(f"cord mask has shape {cord.shape}, valid has {valid.shape}")
        if (cord & valid).any():
            return cord & valid, "cord"
        reason = "the cord mask is empty" if not cord.any() else "the cord mask lies only in padding"
    else:
        reason = "no cord mask is available"
    if image is None:
        raise ValueError(f"{reason} and no image was given for the body-foreground fallback")
    image = np.asarray(image)
    if image.shape != valid.shape:
        raise ValueError(f"image has shape {image.shape}, valid has {valid.shape}")
    message = ("%s: lesions are searched in the whole body foreground (intensity > %.3g), "
               "which gives more false positives than a cord mask")
    if not _foreground_warned:
        logger.warning(message, reason, foreground_threshold)
        _foreground_warned = True
    else:
        logger.info(message, reason, foreground_threshold)
    region = body_foreground(image, foreground_threshold) & valid
    if not region.any():
        logger.warning("the analysis region is empty: no voxel above %.3g", foreground_threshold)
    return region, "foreground"


def detection_region(region: np.ndarray, spacing_mm: Sequence[float], inset_mm: float) -> np.ndarray:
    """The voxels of ``region`` deeper than ``inset_mm`` below its surface and off its outermost
    voxel layer, where lesions may be found.

    The healthy residual is highest in the outermost voxel layer of the cord, half cord and half
    CSF, and at the ends of the field of view (the array border counts as surface), where most
    lesions' is deeper (docs/benchmarks.md). A lesion that reaches the surface is still found by its
    deeper voxels and grows back into the layer. Depth is the Euclidean distance in mm to the
    nearest voxel outside (1e-6 mm tolerance, so a 1 mm inset drops the first layer of a 1 mm grid).
    The outermost layer (voxels with a face neighbour outside) is dropped whatever its depth: across
    3 mm slices it lies 3 mm deep and is as much partial volume as on a fine grid. When this would
    leave nothing (a region thinner than twice the inset, or than three voxels), the whole region
    is returned.
    """
    region = np.asarray(region, dtype=bool)
    spacing = check_spacing(spacing_mm, region.ndim)
    if not np.isfinite(inset_mm) or inset_mm < 0:
        raise ValueError(f"inset_mm must be a finite number >= 0, got {inset_mm!r}")
    if inset_mm == 0 or not region.any():
        return region.copy()
    depth = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[(slice(1, -1),) * region.ndim]
    inner = region & (depth > inset_mm + 1e-6) & ndimage.binary_erosion(region, border_value=0)
    if not inner.any():
        logger.warning("the analysis region is nowhere deeper than %.3g mm and its outermost voxel layer: "
                       "lesions are searched in all of it", inset_mm)
        return region.copy()
    return inner


def restrict(residual: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The residual inside ``region``, 0 elsewhere (same dtype)."""
    residual = np.asarray(residual)
    region = np.asarray(region, dtype=bool)
    if region.shape != residual.shape:
        raise ValueError(f"region has shape {region.shape}, residual has {residual.shape}")
    return np.where(region, residual, np.zeros((), dtype=residual.dtype))


def check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Validated voxel spacing: one positive finite value per axis."""
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be {ndim} positive numbers, got {spacing_mm!r}")
    return spacing
