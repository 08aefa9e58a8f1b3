"""Check that input images can be read before any work is spent on them.

A truncated ``.nii.gz`` often has a readable header, so a full check decompresses the data; the
cheap check (``full=False``, used by ``--dry-run``) reads the header only.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import BadDataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSummary:
    """What a user wants to see of an image in a listing."""

    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    axcodes: str
    dtype: str

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.shape)
        zooms = "x".join(f"{z:.2g}" for z in self.zooms)
        return f"{shape} vox, {zooms} mm, {self.axcodes}, {self.dtype}"


def inspect_image(path: Path, full: bool = True) -> ImageSummary:
    """Load the header (and with ``full`` all voxels) of a NIfTI file, or raise BadDataError (65)."""
    import nibabel as nib
    import numpy as np

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadDataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if size == 0:
        raise BadDataError(f"{path}: file is empty (0 bytes), not a NIfTI image")
    try:
        img = nib.load(str(path))
        header = img.header
        if full:
            np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise BadDataError(f"{path}: cannot read NIfTI image ({_reason(exc)})") from exc
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    try:
        axcodes = "".join(nib.aff2axcodes(img.affine))
    except Exception:  # a singular affine has no orientation; preprocessing reports it precisely
        axcodes = "???"
    return ImageSummary(
        shape=tuple(int(s) for s in img.shape),
        zooms=zooms,
        axcodes=axcodes,
        dtype=str(header.get_data_dtype()),
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "Compressed file ended" in str(exc):
        return "file is truncated"
    return text[0] if text else type(exc).__name__
