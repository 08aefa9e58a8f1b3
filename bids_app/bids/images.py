"""Check input images and masks before any work is spent on them, and name the file at fault.

A truncated ``.nii.gz`` often has a readable header, so the full check decompresses the data; the
cheap check (``full=False``, used by ``--dry-run``) reads the header only. ``check_record`` applies
every check of the preprocessing pipeline up front (datatype, dimensions, voxel sizes, affine, the
float32 range, NaN/Inf, mask grids), so a bad file in a run over many images fails the run before
the first image is processed, not hours later, and nothing is written.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bids_app.errors import BadDataError

if TYPE_CHECKING:
    from bids_app.bids.layout import ImageRecord
    from bids_app.preprocessing.plan import PreprocessingPlan

log = logging.getLogger(__name__)

NIFTI1_HEADER_SIZE = 348
FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def open_image(path: Path):
    """The nibabel image (header read, voxels not yet), or BadDataError saying what the file is instead."""
    import nibabel as nib

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BadDataError(f"{path}: broken symbolic link to {os.readlink(path)} (a DataLad/git-annex file "
                           "whose content was not retrieved? run 'datalad get')")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadDataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if size == 0:
        raise BadDataError(f"{path}: file is empty (0 bytes), not a NIfTI image")
    try:
        return nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise BadDataError(f"{path}: cannot read NIfTI image ({_reason(exc, path)})") from exc


def inspect_image(path: Path, full: bool = True) -> ImageSummary:
    """Load the header (and with ``full`` all voxels) of a NIfTI file, or raise BadDataError (65)."""
    import nibabel as nib

    img = open_image(path)
    header = img.header
    warn_if_unoriented(img, Path(path))
    if full:
        _decompress(img, Path(path))
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


def check_not_placeholders(bids_dir: Path) -> None:
    """A dataset whose every image is a 0-byte placeholder (bids-examples) has no data to process:
    say so (65) before the validator reports each empty file as a structure error."""
    images = sorted(p for ext in ("*.nii", "*.nii.gz") for p in Path(bids_dir).glob(f"sub-*/**/{ext}"))
    if images and all(p.is_file() and p.stat().st_size == 0 for p in images):
        raise BadDataError(f"{images[0]}: file is empty (0 bytes), not a NIfTI image (all {len(images)} images of "
                           f"{bids_dir} are empty placeholder files, as in bids-examples: there is no image data)")


def check_record(record: "ImageRecord", max_nonfinite_fraction: float) -> None:
    """Every check preprocessing would make on an image and its masks, before any work (65).

    Cord masks may be soft (``*_softseg``): values other than 0/1 are binarised at 0.5 with a
    warning, but an empty cord mask is an error (a failed segmentation upstream). A lesion mask is
    ground truth: it must hold 0 and 1 only.
    """
    from bids_app.preprocessing.pipeline import check_header, check_mask_grid, check_nonfinite, load_voxels

    img = open_image(record.image)
    check_datatype(img, record.image)
    shape = check_header(img, record.image)
    warn_if_unoriented(img, record.image)
    voxels = _decompress(img, record.image, _float64_voxels if exceeds_float32(img) else load_voxels)
    check_float32_range(voxels, record.image)
    check_nonfinite(voxels, record.image, max_nonfinite_fraction)
    affine = np.asarray(img.affine, dtype=np.float64)
    masks = {"cord": record.cord_mask, "lesion": record.lesion_mask}
    if record.control_mask is not None and record.control_mask != record.cord_mask:
        masks["control"] = record.control_mask
    for role, path in masks.items():
        if path is None:
            continue
        mask_img = open_image(path)
        check_datatype(mask_img, path)
        check_mask_grid(mask_img, path, role, record.image, shape, affine)
        data = _decompress(mask_img, path, load_voxels)
        if not np.all(np.isfinite(data)):
            raise BadDataError(f"{path}: {role} mask has NaN or infinite values")
        if role == "cord" and not np.any(data > 0.5):
            raise BadDataError(f"{path}: cord mask is empty (no voxel above 0.5): a failed cord segmentation? "
                               "fix or remove it (without one the whole body foreground is searched)")
        if role == "lesion":
            other = np.unique(data[(data != 0) & (data != 1)])
            if other.size:
                shown = ", ".join(f"{v:g}" for v in other[:3]) + (", ..." if other.size > 3 else "")
                raise BadDataError(f"{path}: lesion mask has values other than 0 and 1 ({shown}); a label map or "
                                   "a soft segmentation? binarise it")


def check_datatype(img, path: Path) -> None:
    """One grey level per voxel: an RGB24/RGBA32 (colour) or complex image has none (65)."""
    dtype = img.header.get_data_dtype()
    if dtype.fields is not None:
        name = {3: "RGB24", 4: "RGBA32"}.get(len(dtype.fields), "structured")
        raise BadDataError(f"{path}: {name} colour image ({len(dtype.fields)} values per voxel); counterseg needs a "
                           "grey-level image (one value per voxel)")
    if dtype.kind == "c":
        raise BadDataError(f"{path}: complex-valued image ({dtype}); counterseg needs a real-valued magnitude image")


def exceeds_float32(img) -> bool:
    """Whether the file can hold finite values beyond float32 (float64 data, or integers scaled past it)."""
    dtype = img.header.get_data_dtype()
    if dtype.kind == "f":
        return dtype.itemsize > 4
    if dtype.kind not in "iu":
        return False
    slope, inter = img.header.get_slope_inter()
    info = np.iinfo(dtype)
    scale = abs(slope) if slope is not None and np.isfinite(slope) else 1.0
    offset = abs(inter) if inter is not None and np.isfinite(inter) else 0.0
    return max(abs(int(info.min)), int(info.max)) * scale + offset > FLOAT32_MAX


def check_float32_range(voxels: np.ndarray, path: Path) -> None:
    """Finite voxels beyond float32 would turn infinite when loaded (counterseg computes in
    float32): name them as what they are, not as infinite (65)."""
    if voxels.dtype.itemsize <= 4:
        return
    beyond = np.isfinite(voxels) & (np.abs(voxels) > FLOAT32_MAX)
    count = int(beyond.sum())
    if count:
        largest = float(np.max(np.abs(voxels[beyond])))
        raise BadDataError(f"{path}: {count} voxel(s) outside the float32 range (largest magnitude {largest:.3g}, "
                           f"float32 holds up to {FLOAT32_MAX:.3g}); counterseg computes in float32: rescale the "
                           "image")


def warn_if_unoriented(img, path: Path) -> None:
    """qform_code and sform_code both 0: the header does not say how the voxels lie in the scanner,
    so the orientation nibabel gives (voxel sizes only, axes taken as L-A-S) is a guess."""
    header = img.header
    try:
        codes = int(header["qform_code"]), int(header["sform_code"])
    except (KeyError, ValueError, TypeError):  # not a NIfTI header: nothing to say
        return
    if codes == (0, 0):
        log.warning("%s: qform_code and sform_code are both 0: the header does not say how the image lies in the "
                    "scanner, so its orientation is a guess (voxel axes taken as L-A-S); left-right and the "
                    "cord's direction may be wrong: set the qform/sform", path)


def _float64_voxels(img, path: Path) -> np.ndarray:
    """All voxels in float64 (scaling applied), for a file whose values may exceed float32."""
    return np.asarray(img.get_fdata(dtype=np.float64))


def check_fits_plan(path: Path, plan: "PreprocessingPlan") -> None:
    """The image must not be far smaller than the model's field of view (65)."""
    from bids_app.preprocessing.pipeline import check_field_of_view

    check_field_of_view(open_image(path), Path(path), plan)


def _decompress(img, path: Path, load=None):
    """All voxels (``load(img, path)`` when given); a truncated or corrupt stream is bad data."""
    import nibabel as nib

    try:
        return load(img, path) if load is not None else np.asanyarray(img.dataobj)
    except BadDataError:
        raise
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise BadDataError(f"{path}: cannot read NIfTI image ({_reason(exc, path)})") from exc


def _reason(exc: BaseException, path: Path | None = None) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, EOFError) or "end-of-stream" in str(exc) or "Compressed file ended" in str(exc):
        return "file is truncated"
    if path is not None and "Cannot work out file type" in str(exc) and _is_gzip(path):
        return "gzip-compressed, but not a NIfTI file inside"
    return text[0] if text else type(exc).__name__


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                return False
        with gzip.open(path, "rb") as handle:
            handle.read(NIFTI1_HEADER_SIZE)
        return True
    except (OSError, EOFError, zlib.error):
        return False
