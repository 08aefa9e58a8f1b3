"""PNGs written from arrays decode back pixel for pixel, in the colour type of the array."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bids_app.reports.png import montage, png_bytes, to_uint8, write_png


@pytest.mark.parametrize("shape, mode", [((5, 7), "L"), ((4, 3, 3), "RGB")])
def test_round_trip(shape: tuple[int, ...], mode: str, tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_png(tmp_path / "x.png", pixels)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == mode and image.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(image), pixels)


def test_windowing_and_montage() -> None:
    window = to_uint8(np.array([[0.0, 0.5, 1.0]]), 0.0, 1.0)
    assert window.tolist() == [[0, 128, 255]]
    assert montage([np.ones((2, 2), np.uint8), np.ones((3, 1), np.uint8)], gap=1).shape == (3, 4)
    with pytest.raises(ValueError):
        png_bytes(np.zeros((2, 2, 2), np.uint8))
