"""Paint the phantom's lesion types into a real scan, given its cord mask.

Real anatomy and noise with a known ground truth: the lesions are drawn by the same rules as the
phantom's (``lesions.draw_lesions``) in a cord frame estimated from the mask (per-slice centre and
semi-axes), and the image is scaled inside them as the phantom renders lesions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from bids_app.synthetic.anatomy import CONTRASTS, smooth_noise
from bids_app.synthetic.lesions import CordFrame, SciPlan, draw_lesions, plan_sci


def cord_frame(cord: np.ndarray, spacing: Sequence[float]) -> CordFrame:
    """Cord-centred coordinates of a RAS-ordered grid from its cord mask (axis 2 along the cord).

    A uniform ellipse of semi-axis ``a`` has a standard deviation of ``a / 2`` along it, so each
    slice's semi-axes are twice the mask's spread; slices without cord take the nearest slice's.
    """
    cord = np.asarray(cord, bool)
    if not cord.any():
        raise ValueError("the cord mask is empty")
    nx, ny, nz = cord.shape
    sx, sy, sz = (float(s) for s in spacing)
    x = np.arange(nx) * sx
    y = np.arange(ny) * sy
    z = np.arange(nz) * sz
    present = cord.any(axis=(0, 1))
    stats = np.zeros((nz, 4))
    for k in np.flatnonzero(present):
        ix, iy = np.nonzero(cord[:, :, k])
        px, py = x[ix], y[iy]
        stats[k] = (px.mean(), py.mean(), max(2 * px.std(), sx), max(2 * py.std(), sy))
    nearest = np.flatnonzero(present)[np.abs(np.arange(nz)[:, None] - np.flatnonzero(present)[None, :]).argmin(1)]
    stats = stats[nearest]
    dx = x[:, None, None] - stats[None, None, :, 0]
    dy = y[None, :, None] - stats[None, None, :, 1]
    return CordFrame(dx, dy, z, stats[:, 2], stats[:, 3], cord)


def paint_lesions(image: np.ndarray, cord: np.ndarray, spacing: Sequence[float], lesion_type: str,
                  contrast: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image with lesions of ``lesion_type`` painted in, and their mask (both on the image's grid).

    ``image`` and ``cord`` are RAS-ordered (axis 2 inferior-superior). ``contrast`` picks the lesion
    gain of the phantom (T2w bright, T1w dark). An ``sci`` lesion keeps the real cord's width (a
    painted lesion cannot swell it).
    """
    frame = cord_frame(cord, spacing)
    sci: SciPlan | None = None
    heterogeneity = None
    if lesion_type == "sci":
        drawn = plan_sci(frame.z, rng)
        sci = SciPlan(drawn.z0, drawn.length, drawn.radius, swelling=0.0)
        heterogeneity = smooth_noise(cord.shape, [1.0 / s for s in spacing], rng)
    relative = draw_lesions(lesion_type, frame, spacing, rng, lambda mask: bool(mask.any()), sci, heterogeneity)
    lesion = relative > 0
    painted = np.asarray(image, float).copy()
    painted[lesion] *= 1.0 + CONTRASTS[contrast]["lesion_gain"] * relative[lesion]
    return painted, lesion
