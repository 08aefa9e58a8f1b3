"""The trace: where an image came from and what preprocessing did to it, in one JSON-able place.

A :class:`Trace` holds the source geometry (grid, affine, qform/sform with codes, units) and the
ordered op records. It is the only thing needed to map a model-space array back onto the source
grid, so it is saved in the work directory next to the model-space volume and read back at
export time (nnU-Net keeps its crop bbox and shapes for the same reason). Keeping geometry and
op records together avoids MONAI's "three places to keep the trace".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from bids_app.preprocessing.ops import MASK_THRESHOLD, OpRecord, check_kind, inverse_op

logger = logging.getLogger(__name__)

TRACE_FORMAT = 1


def _matrix(value: Any) -> np.ndarray:
    """A 4x4 float64 matrix from a JSON list (or an array)."""
    m = np.asarray(value, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    return m


@dataclass(frozen=True, eq=False)
class SourceGeometry:
    """The native grid an image was read from, enough to write results back onto it exactly.

    ``shape`` is the stored shape (a single-volume 4D image keeps its trailing 1);
    ``spatial_shape`` is the 3D grid the results are written on. ``affine`` is nibabel's best
    affine of the source (sform if coded, else qform), the one preprocessing used.
    """

    path: str
    shape: tuple[int, ...]
    spatial_shape: tuple[int, int, int]
    affine: np.ndarray
    qform: np.ndarray
    qform_code: int
    sform: np.ndarray
    sform_code: int
    zooms: tuple[float, ...]
    dtype: str
    xyzt_units: tuple[str, str]

    @classmethod
    def from_image(cls, img: nib.spatialimages.SpatialImage, path: str) -> "SourceGeometry":
        """Capture the geometry of a loaded image; non-NIfTI formats get an aligned sform."""
        header = img.header
        affine = np.asarray(img.affine, dtype=np.float64)
        if isinstance(header, nib.Nifti1Header):  # NIfTI-2 headers subclass it
            qform, qcode = header.get_qform(coded=False), int(header["qform_code"])
            sform, scode = header.get_sform(coded=False), int(header["sform_code"])
            units = tuple(str(u) for u in header.get_xyzt_units())
        else:
            qform, qcode, sform, scode, units = affine, 0, affine, 2, ("mm", "unknown")
        return cls(path=str(path), shape=tuple(int(s) for s in img.shape),
                   spatial_shape=tuple(int(s) for s in img.shape[:3]),  # type: ignore[arg-type]
                   affine=affine, qform=np.asarray(qform, dtype=np.float64), qform_code=qcode,
                   sform=np.asarray(sform, dtype=np.float64), sform_code=scode,
                   zooms=tuple(float(z) for z in header.get_zooms()),
                   dtype=str(header.get_data_dtype()), xyzt_units=units)  # type: ignore[arg-type]

    def to_nifti(self, data: np.ndarray, kind: str) -> nib.Nifti1Image:
        """A NIfTI-1 image of ``data`` on this grid with the source's qform/sform, codes and units.

        Results are always 3D (a single-volume 4D source gives a 3D output): a mask or a
        probability map of one volume is a 3D image in BIDS. Images and probabilities are
        float32 without scaling (slope 1, inter 0); masks are uint8.
        """
        check_kind(kind)
        if tuple(data.shape) != tuple(self.spatial_shape):
            raise ValueError(f"data shape {data.shape} does not match the source grid {self.spatial_shape}")
        dtype = np.uint8 if kind == "mask" else np.float32
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), self.affine)
        header = img.header
        header.set_data_dtype(dtype)
        # Set through the image, not the header: nibabel re-syncs the header from img.affine on save.
        img.set_qform(self.qform, code=self.qform_code)
        img.set_sform(self.sform, code=self.sform_code)
        header.set_zooms(self.zooms[:3])
        header.set_xyzt_units(*self.xyzt_units)
        header.set_slope_inter(1.0, 0.0)
        return img

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "shape": list(self.shape), "spatial_shape": list(self.spatial_shape),
                "affine": self.affine.tolist(), "qform": self.qform.tolist(), "qform_code": self.qform_code,
                "sform": self.sform.tolist(), "sform_code": self.sform_code, "zooms": list(self.zooms),
                "dtype": self.dtype, "xyzt_units": list(self.xyzt_units)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SourceGeometry":
        return cls(path=str(data["path"]), shape=tuple(int(s) for s in data["shape"]),
                   spatial_shape=tuple(int(s) for s in data["spatial_shape"]),  # type: ignore[arg-type]
                   affine=_matrix(data["affine"]), qform=_matrix(data["qform"]),
                   qform_code=int(data["qform_code"]), sform=_matrix(data["sform"]),
                   sform_code=int(data["sform_code"]), zooms=tuple(float(z) for z in data["zooms"]),
                   dtype=str(data["dtype"]),
                   xyzt_units=tuple(str(u) for u in data["xyzt_units"]))  # type: ignore[arg-type]


@dataclass(eq=False)
class Trace:
    """Source geometry plus the ordered records of the forward ops (first applied first)."""

    source: SourceGeometry
    records: list[OpRecord] = field(default_factory=list)
    nonfinite_replaced: int = 0

    def push(self, record: OpRecord) -> None:
        """Append the record of the op just applied."""
        self.records.append(record)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """Shape of the model-space arrays this trace maps back from."""
        for record in reversed(self.records):
            if "out_shape" in record.params:
                return tuple(int(n) for n in record.params["out_shape"])
        return tuple(self.source.spatial_shape)

    def inverse(self, array: np.ndarray, kind: str) -> np.ndarray:
        """Map a model-space array back onto the source voxel grid (records popped last-first).

        The records are read, not consumed, so the same trace can map an image, a probability
        map and a mask. A mask is carried as a continuous map through every inverse op and
        thresholded once at the end; an image comes back float32, a mask uint8 0/1.
        """
        check_kind(kind)
        array = np.asarray(array)
        if tuple(array.shape) != self.model_shape:
            raise ValueError(f"array shape {array.shape} does not match the model shape {self.model_shape}")
        out = array.astype(np.float32)
        for record in reversed(self.records):
            out = inverse_op(record)(out, record.params, kind)
        if kind == "mask":
            return (out >= MASK_THRESHOLD).astype(np.uint8)
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "source": self.source.to_dict(),
                "records": [r.to_dict() for r in self.records],
                "nonfinite_replaced": self.nonfinite_replaced}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Trace":
        fmt = data.get("format", TRACE_FORMAT)
        if fmt != TRACE_FORMAT:
            raise ValueError(f"trace format {fmt} is not supported (expected {TRACE_FORMAT})")
        return cls(source=SourceGeometry.from_dict(data["source"]),
                   records=[OpRecord.from_dict(r) for r in data["records"]],
                   nonfinite_replaced=int(data.get("nonfinite_replaced", 0)))
