"""Sliding model-sized windows over a larger model-space volume, blended back smoothly.

The models see volumes of the plan's shape; a cord is longer than that (48 mm of 64-192 mm in the
tiny preset), so inference slides overlapping windows along every axis where the volume is larger,
and blends their outputs with weights that fall towards each window's faces (as nnU-Net's
sliding-window prediction does): seams get no weight from the window whose border they are.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

#: Weight kept at a window's faces, so a voxel covered by a single window never has weight 0.
EDGE_WEIGHT = 0.05


def window_starts(extent: int, size: int, overlap: float) -> list[int]:
    """Start indices of windows of ``size`` covering ``extent`` voxels with at least ``overlap``.

    Evenly spaced from 0 to ``extent - size`` (both ends included), so every voxel is covered and
    no window leaves the volume; a volume no larger than a window gets a single window at 0.
    """
    if size < 1 or not 0 <= overlap < 1:
        raise ValueError(f"need size >= 1 and 0 <= overlap < 1, got {size}, {overlap}")
    if extent <= size:
        return [0]
    stride = max(1, int(size * (1 - overlap)))
    count = math.ceil((extent - size) / stride) + 1
    return sorted({int(round(i * (extent - size) / (count - 1))) for i in range(count)})


def blend_weights(shape: Sequence[int]) -> np.ndarray:
    """Separable weights, 1 in the middle of a window and ``EDGE_WEIGHT`` at its faces (a raised
    cosine along each axis)."""
    weight = np.ones(tuple(shape), dtype=np.float64)
    for axis, n in enumerate(shape):
        position = (np.arange(n) + 0.5) / n
        profile = EDGE_WEIGHT + (1 - EDGE_WEIGHT) * np.sin(np.pi * position) ** 2
        view = [1] * len(shape)
        view[axis] = n
        weight = weight * profile.reshape(view)
    return weight


def windows(shape: Sequence[int], size: Sequence[int], overlap: float) -> Iterator[tuple[slice, ...]]:
    """Every window (as slices) of a sliding-window pass over ``shape``."""
    if len(shape) != len(size):
        raise ValueError(f"volume shape {tuple(shape)} and window size {tuple(size)} differ in rank")
    if any(s < w for s, w in zip(shape, size)):
        raise ValueError(f"volume {tuple(shape)} is smaller than the window {tuple(size)}")
    starts = [window_starts(n, w, overlap) for n, w in zip(shape, size)]
    for corner in itertools.product(*starts):
        yield tuple(slice(c, c + w) for c, w in zip(corner, size))


def slide(volume_shape: Sequence[int], size: Sequence[int],
          apply: Callable[[int, tuple[slice, ...]], Sequence[np.ndarray]], overlap: float) -> list[np.ndarray]:
    """Blend the outputs of ``apply(window_index, window)`` over a sliding-window pass.

    ``apply`` returns any number of window-shaped arrays (the same number for every window: e.g.
    one per strength and sample); each is blended into its own full-volume float32 array.
    """
    weight = blend_weights(size)
    totals: list[np.ndarray] | None = None
    norm = np.zeros(tuple(volume_shape), dtype=np.float64)
    for index, window in enumerate(windows(volume_shape, size, overlap)):
        outputs = apply(index, window)
        if totals is None:
            totals = [np.zeros(tuple(volume_shape), dtype=np.float64) for _ in outputs]
        if len(outputs) != len(totals):
            raise ValueError(f"window {index} gave {len(outputs)} outputs, the first gave {len(totals)}")
        for total, output in zip(totals, outputs):
            total[window] += weight * output
        norm[window] += weight
    return [(total / norm).astype(np.float32) for total in totals or []]
