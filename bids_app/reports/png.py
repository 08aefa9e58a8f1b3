"""Minimal PNG writing (greyscale and RGB, 8 bit) with the standard library, for training figures
and report mosaics; avoids a plotting dependency for what is a few rows of pixels."""
from __future__ import annotations

import struct
import zlib
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
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour_type, channels = 0, 1
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: Path, pixels: np.ndarray) -> Path:
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
