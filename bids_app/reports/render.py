"""Display slices to RGB pixels at native resolution: every voxel one block of whole pixels, no interpolation.

The report's layer images are drawn here rather than through a plotting library, so that a rater
sees the image's own voxels (``np.repeat`` by a whole factor per axis, chosen from the voxel size
so that the physical aspect ratio holds, anisotropic grids included) and so that a layer colours
exactly the voxels its rule names: the anomaly score only where it exceeds the threshold, outlines
around exactly the lesion voxels. The layers of one view share their size, so that they can be
stacked and flicked between in the page.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Outline colours (RGB): the predicted lesion mask and the ground truth.
PREDICTION_RGB = (255, 212, 0)
TRUTH_RGB = (0, 229, 255)
#: Colour map of the anomaly score above the threshold (threshold: its first colour, 1: its last) and its opacity.
SCORE_CMAP = "autumn"
SCORE_ALPHA = 0.85
#: Light grey columns between the slices of a strip (slices end in dark background).
GAP_PX = 6
GAP_RGB = (200, 205, 212)
#: The layers every view has, in the order the page offers them: (key, label).
LAYERS = (("original", "original"), ("counterfactual", "counterfactual"),
          ("score", "anomaly score above threshold"), ("lesions", "lesion outlines"))


@dataclass(frozen=True)
class Cut:
    """The arrays of one displayed slice (rows, columns as shown), all the same shape."""

    background: np.ndarray
    counterfactual: np.ndarray | None
    score: np.ndarray
    mask: np.ndarray  # bool
    truth: np.ndarray | None  # bool


def repeats(spacing_mm: Sequence[float], pixels_per_mm: float) -> tuple[int, int]:
    """Whole pixels per voxel along rows and columns (at least 1: never fewer pixels than voxels)."""
    return tuple(max(1, int(round(float(s) * pixels_per_mm))) for s in spacing_mm)  # type: ignore[return-value]


def upscale(array: np.ndarray, reps: tuple[int, int]) -> np.ndarray:
    """Each voxel becomes a ``reps[0]`` x ``reps[1]`` block (nearest neighbour by construction)."""
    return np.repeat(np.repeat(array, reps[0], axis=0), reps[1], axis=1)


def grey(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Greyscale RGB (uint8) of a slice in the given intensity window."""
    low, high = window
    scaled = np.clip((np.nan_to_num(image, nan=low) - low) / max(high - low, 1e-12), 0.0, 1.0)
    level = (scaled * 255).round().astype(np.uint8)
    return np.repeat(level[..., None], 3, axis=2)


def above(score: np.ndarray, threshold: float) -> np.ndarray:
    """The voxels a score layer colours: strictly above the threshold (as the lesion candidates are)."""
    return np.nan_to_num(score, nan=0.0) > threshold


def colour_scores(rgb: np.ndarray, score: np.ndarray, threshold: float) -> np.ndarray:
    """``rgb`` with the voxels whose score exceeds ``threshold`` coloured from the threshold (red) to 1 (yellow)."""
    from matplotlib import colormaps

    out = rgb.copy()
    where = above(score, threshold)
    if not where.any():
        return out
    span = max(1.0 - threshold, 1e-6)
    level = np.clip((score[where] - threshold) / span, 0.0, 1.0)
    colours = colormaps[SCORE_CMAP](level)[:, :3] * 255
    out[where] = np.round(SCORE_ALPHA * colours + (1 - SCORE_ALPHA) * rgb[where]).astype(np.uint8)
    return out


def ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels more than ``inner`` and at most ``outer`` pixels (4-connected steps) outside ``mask``:
    an outline that leaves the outlined voxels themselves visible."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    grow = (lambda m, n: ndimage.binary_dilation(m, iterations=n) if n > 0 else m)
    return grow(mask, outer) & ~grow(mask, inner)


def outlines(rgb: np.ndarray, mask: np.ndarray, truth: np.ndarray | None, reps: tuple[int, int]) -> np.ndarray:
    """Upscaled ``rgb`` with the predicted lesions outlined in yellow just outside their voxels and the
    ground truth in cyan just outside that, so that both show where they agree."""
    out = upscale(rgb, reps)
    width = 2 if min(reps) >= 4 else 1
    if truth is not None:
        out[ring(upscale(truth, reps), width, 2 * width)] = TRUTH_RGB
    out[ring(upscale(mask, reps), 0, width)] = PREDICTION_RGB
    return out


def layers(cut: Cut, window: tuple[float, float], threshold: float, reps: tuple[int, int]) -> dict[str, np.ndarray]:
    """Every layer of one slice, upscaled by ``reps``; the counterfactual layer only when there is one."""
    base = grey(cut.background, window)
    drawn = {"original": upscale(base, reps)}
    if cut.counterfactual is not None:
        drawn["counterfactual"] = upscale(grey(cut.counterfactual, window), reps)
    drawn["score"] = upscale(colour_scores(base, cut.score, threshold), reps)
    drawn["lesions"] = outlines(base, cut.mask, cut.truth, reps)
    return drawn


def side_by_side(images: Sequence[np.ndarray], gap: int = GAP_PX) -> np.ndarray:
    """RGB images in a row, top-aligned, ``gap`` pixels apart (light grey between and below them)."""
    height = max(i.shape[0] for i in images)
    width = sum(i.shape[1] for i in images) + gap * (len(images) - 1)
    out = np.empty((height, width, 3), np.uint8)
    out[:] = GAP_RGB
    column = 0
    for image in images:
        out[: image.shape[0], column: column + image.shape[1]] = image
        column += image.shape[1] + gap
    return out


def tick_marks(rgb: np.ndarray, row: int, reps: tuple[int, int], length: int = 8) -> np.ndarray:
    """White ticks at both edges of a sagittal image at the height of the axial slice shown beside it."""
    out = rgb.copy()
    top, bottom = row * reps[0], (row + 1) * reps[0]
    length = min(length, out.shape[1] // 4)
    out[top:bottom, :length] = 255
    out[top:bottom, out.shape[1] - length:] = 255
    return out


def css_gradient(stops: int = 6) -> str:
    """The score colour map as a CSS ``linear-gradient`` (the legend's colour bar)."""
    from matplotlib import colormaps

    cmap = colormaps[SCORE_CMAP]
    colours = [cmap(i / (stops - 1))[:3] for i in range(stops)]
    return "linear-gradient(to right, " + ", ".join(
        "#{:02x}{:02x}{:02x}".format(*(int(round(c * 255)) for c in colour)) for colour in colours) + ")"
