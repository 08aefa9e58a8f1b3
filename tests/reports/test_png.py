"""The PNG writer produces files that a real decoder reads back pixel for pixel."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from bids_app.reports.png import montage, png_bytes, to_uint8, write_png


def decode(data: bytes) -> tuple[int, int, int, bytes]:
    """A small independent PNG reader (filter type 0 only), to check what we wrote."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    return width, height, header[9], zlib.decompress(idat)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3)])
def test_round_trip(shape: tuple[int, ...], tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_png(tmp_path / "x.png", pixels)
    width, height, colour, raw = decode(path.read_bytes())
    assert (height, width) == shape[:2] and colour == (0 if len(shape) == 2 else 2)
    stride = 1 + width * (1 if len(shape) == 2 else 3)
    rows = [raw[i * stride + 1:(i + 1) * stride] for i in range(height)]
    assert np.array_equal(np.frombuffer(b"".join(rows), np.uint8).reshape(shape), pixels)


def test_windowing_and_montage() -> None:
    window = to_uint8(np.array([[0.0, 0.5, 1.0]]), 0.0, 1.0)
    assert window.tolist() == [[0, 128, 255]]
    assert montage([np.ones((2, 2), np.uint8), np.ones((3, 1), np.uint8)], gap=1).shape == (3, 4)
    with pytest.raises(ValueError):
        png_bytes(np.zeros((2, 2, 2), np.uint8))
