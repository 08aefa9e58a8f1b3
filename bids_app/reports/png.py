"""8-bit PNGs from arrays (greyscale or RGB), encoded by Pillow; windowing and side-by-side panels.

Used by the training figures and the report's layer images. Pillow (which matplotlib needs anyway)
does the encoding; what is left here is array work: a window to 0..255 and a montage.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def to_uint8(image: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Window an array to 0..255 (default window: its 1st and 99th percentiles)."""
    image = np.asarray(image, dtype=np.float64)
    finite = image[np.isfinite(image)]
    low = float(np.percentile(finite, 1)) if low is None and finite.size else (low or 0.0)
    high = float(np.percentile(finite, 99)) if high is None and finite.size else (high or 1.0)
    scaled = (np.nan_to_num(image, nan=low) - low) / max(high - low, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an (H, W) uint8 greyscale or (H, W, 3) uint8 RGB array as PNG."""
    from PIL import Image

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """:func:`png_bytes` written atomically."""
    from bids_app.io import atomic_write_bytes

    return atomic_write_bytes(Path(path), png_bytes(pixels))


def montage(images: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Side-by-side panels (same height after padding), separated by a black gap."""
    height = max(i.shape[0] for i in images)
    panels = []
    for image in images:
        pad = np.zeros((height - image.shape[0],) + image.shape[1:], dtype=image.dtype)
        panels.append(np.concatenate([image, pad], axis=0))
        panels.append(np.zeros((height, gap) + image.shape[2:], dtype=image.dtype))
    return np.concatenate(panels[:-1], axis=1)
