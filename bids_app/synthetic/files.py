"""The phantom dataset's files: NIfTI images in their acquisition's orientation and storage type,
sidecars, and the top-level BIDS files."""
from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from bids_app.errors import OutputIOError
from bids_app.synthetic.acquisition import ACQUISITION_DESCRIPTIONS
from bids_app.synthetic.anatomy import Anatomy, Geometry, render
from bids_app.synthetic.lesions import LESION_TYPE_DESCRIPTIONS, PATHOLOGY

logger = logging.getLogger(__name__)

GENERATOR_NAME = "counterseg-synthetic"
BIDS_VERSION = "1.10.0"
HEALTHY = "HC"

# Sidecar fields shared by all images; filling the validator's "recommended" keys keeps its
# report short enough that real problems stand out.
COMMON_SIDECAR: dict[str, object] = {
    "Manufacturer": GENERATOR_NAME, "ManufacturersModelName": "phantom",
    "DeviceSerialNumber": "synthetic-0000", "StationName": "phantom", "SoftwareVersions": "none",
    "MagneticFieldStrength": 3, "ReceiveCoilName": "synthetic spine array",
    "ReceiveCoilActiveElements": "all", "MatrixCoilMode": "none", "CoilCombinationMethod": "rSOS",
    "NonlinearGradientCorrection": False, "DwellTime": 5e-06,
    "InstitutionName": "none (simulated)", "InstitutionAddress": "none (simulated)",
    "InstitutionalDepartmentName": "none (simulated)",
}
SIDECARS: dict[str, dict[str, object]] = {
    "T2w": {"PulseSequenceType": "turbo spin echo", "ScanningSequence": "SE", "SequenceVariant": "SK",
            "SequenceName": "synthetic_tse3d", "PulseSequenceDetails": "simulated by bids_app.synthetic",
            "RepetitionTime": 1.5, "EchoTime": 0.12, "FlipAngle": 120, "MRAcquisitionType": "3D"},
    "T1w": {"PulseSequenceType": "MPRAGE", "ScanningSequence": "GR\\IR", "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "synthetic_mprage", "PulseSequenceDetails": "simulated by bids_app.synthetic",
            "RepetitionTime": 2.0, "EchoTime": 0.0037, "InversionTime": 0.9, "FlipAngle": 9,
            "MRAcquisitionType": "3D"},
    "T2starw": {"PulseSequenceType": "multi-echo gradient echo", "ScanningSequence": "GR",
                "SequenceVariant": "SP", "SequenceName": "synthetic_medic",
                "PulseSequenceDetails": "simulated by bids_app.synthetic",
                "RepetitionTime": 0.6, "EchoTime": 0.014, "FlipAngle": 30, "MRAcquisitionType": "2D"},
}


def _reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip a RAS-ordered array into ``axcodes`` and return the matching affine."""
    ornt = ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple(axcodes)))
    return np.ascontiguousarray(apply_orientation(data, ornt)), affine @ inv_ornt_aff(ornt, data.shape)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, dtype: str, slope: float) -> bytes:
    """Serialise one NIfTI-1 image with an explicit, exact storage type and scale factor.

    nibabel picks its own scaling for array images, so integer data are quantised here and the
    requested ``scl_slope`` is written into the header afterwards.
    """
    if dtype == "float32" or dtype == "uint8":
        stored = data.astype(dtype)
    else:
        info = np.iinfo(dtype)
        stored = np.clip(np.round(data / slope), info.min, info.max).astype(dtype)
    img = nib.Nifti1Image(stored, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = bytearray(img.to_bytes())
    if slope != 1.0:
        hdr = nib.Nifti1Header(binaryblock=bytes(raw[:348]), endianness=img.header.endianness)
        hdr.set_slope_inter(slope, 0.0)
        raw[:348] = hdr.binaryblock
    return bytes(raw)


def _write_bytes(path: Path, payload: bytes) -> None:
    """Write, gzip-compressing with mtime 0 so equal seeds give byte-identical files."""
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    except OSError as exc:
        raise OutputIOError(f"cannot write {path}: {exc}") from exc


def _write_json(path: Path, content: object) -> None:
    """Stable, human-readable JSON."""
    _write_bytes(path, (json.dumps(content, indent=2) + "\n").encode())


def _stem(label: str, session: str | None, contrast: str) -> str:
    """BIDS file stem, e.g. ``sub-01_ses-A_T2w``."""
    ses = f"_ses-{session}" if session else ""
    return f"sub-{label}{ses}_{contrast}"


def _anat_dir(root: Path, label: str, session: str | None) -> Path:
    """``sub-XX[/ses-YY]/anat`` under ``root``."""
    base = root / f"sub-{label}"
    return (base / f"ses-{session}" if session else base) / "anat"


@dataclass(frozen=True)
class ParticipantRow:
    """One line of participants.tsv; ``lesion_type`` is None for a healthy participant."""

    label: str
    age: int
    sex: str
    lesion_type: str | None
    acquisition: str

    @property
    def pathology(self) -> str:
        return HEALTHY if self.lesion_type is None else PATHOLOGY[self.lesion_type]


def write_top_level(root: Path, rows: list[ParticipantRow], seed: int) -> None:
    """Dataset description, README and participants files of the raw and label datasets."""
    _write_json(root / "dataset_description.json", {
        "Name": "counterseg synthetic spinal-cord phantom",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["counterseg developers", "bids_app.synthetic (generator)"],
        "GeneratedBy": [{"Name": GENERATOR_NAME, "Description": f"bids_app.synthetic, seed {seed}"}],
    })
    _write_bytes(root / "README.md", (
        "# counterseg synthetic spinal-cord phantom\n\n"
        f"Generated by `bids_app.synthetic` with seed {seed}. Images are simulated, not acquired.\n"
        "Ground-truth cord and lesion masks are in `derivatives/labels`.\n").encode())
    lines = ["participant_id\tage\tsex\tpathology\tlesion_type\tacquisition"]
    lines += [f"sub-{r.label}\t{r.age}\t{r.sex}\t{r.pathology}\t{r.lesion_type or 'n/a'}\t{r.acquisition}"
              for r in rows]
    _write_bytes(root / "participants.tsv", ("\n".join(lines) + "\n").encode())
    _write_json(root / "participants.json", {
        "participant_id": {"Description": "Unique participant identifier"},
        "age": {"Description": "Age of the simulated participant", "Units": "year"},
        "sex": {"Description": "Sex of the simulated participant",
                "Levels": {"M": "male", "F": "female"}},
        "pathology": {"Description": "Spinal-cord pathology",
                      "Levels": {HEALTHY: "healthy control", "MS": "multiple sclerosis (lesions)",
                                 "SCI": "spinal-cord injury (lesion)"}},
        "lesion_type": {"Description": "Kind of simulated lesions (n/a: healthy)",
                        "Levels": dict(LESION_TYPE_DESCRIPTIONS)},
        "acquisition": {"Description": "Simulated acquisition of the participant's images",
                        "Levels": dict(ACQUISITION_DESCRIPTIONS)},
    })
    labels = root / "derivatives" / "labels"
    _write_json(labels / "dataset_description.json", {
        "Name": "counterseg synthetic ground-truth labels",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": GENERATOR_NAME}],
        "DatasetLinks": {"raw": "../../"},
    })


def _sidecar(contrast: str, geom: Geometry, acquired_shape: tuple[int, ...]) -> dict[str, object]:
    """Acquisition metadata; 2D acquisitions get their slice thickness and SliceTiming along the stored
    slice axis (a thick-slice acquisition's thick axis, else inferior-superior)."""
    meta: dict[str, object] = {**COMMON_SIDECAR, **SIDECARS[contrast]}
    acquisition = geom.acquisition
    if acquisition.is_2d:
        meta["MRAcquisitionType"] = "2D"
        meta["SliceThickness"] = acquisition.slice_thickness
    if meta["MRAcquisitionType"] == "2D":
        ras_axis = acquisition.thick_axis if acquisition.is_2d else 2
        axis = next(i for i, c in enumerate(geom.axcodes) if c in ("LR", "PA", "IS")[ras_axis])
        n_slices, tr = acquired_shape[ras_axis], float(meta["RepetitionTime"])
        order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))  # interleaved
        timing = [0.0] * n_slices
        for rank, index in enumerate(order):
            timing[index] = round(rank * tr / n_slices, 6)
        meta["SliceEncodingDirection"] = "ijk"[axis]
        meta["SliceTiming"] = timing
    return meta


def write_image_set(root: Path, label: str, session: str | None, contrast: str, anat: Anatomy,
                     geom: Geometry, scale: float, rng: np.random.Generator) -> tuple[Path, Path, Path | None]:
    """Write one image, its cord mask and (for lesion participants) its lesion mask."""
    stem = _stem(label, session, contrast)
    image = _anat_dir(root, label, session) / f"{stem}.nii.gz"
    signal = render(anat, contrast, scale, rng)
    data, affine = _reorient(signal, anat.affine, geom.axcodes)
    _write_bytes(image, _nifti_bytes(data, affine, geom.dtype, geom.slope))
    _write_json(image.with_name(f"{stem}.json"), _sidecar(contrast, geom, signal.shape))
    rel_image = image.relative_to(root).as_posix()
    deriv = _anat_dir(root / "derivatives" / "labels", label, session)
    masks: list[Path | None] = []
    for kind, volume, desc in (("SC", anat.acquired_cord, "spinal cord"), ("lesion", anat.acquired_lesions, "lesion")):
        if kind == "lesion" and not volume.any():
            masks.append(None)
            continue
        mask = deriv / f"{stem}_label-{kind}_seg.nii.gz"
        mdata, maffine = _reorient(volume.astype(np.uint8), anat.affine, geom.axcodes)
        _write_bytes(mask, _nifti_bytes(mdata, maffine, "uint8", 1.0))
        _write_json(mask.with_name(mask.name.replace(".nii.gz", ".json")), {
            "Type": kind, "Description": f"Ground-truth {desc} mask of the synthetic phantom",
            "Sources": [f"bids:raw:{rel_image}"], "SpatialReference": f"bids:raw:{rel_image}"})
        masks.append(mask)
    logger.info("wrote %s (%s, %s %s mm, %s)", rel_image, geom.axcodes, geom.acquisition.name,
                geom.acquisition.spacing, geom.dtype)
    return image, masks[0], masks[1]  # type: ignore[return-value]
