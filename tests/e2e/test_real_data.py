"""The participant level on a real spinal-cord scan with painted lesions.

Real data: one healthy participant of the spine-generic multi-subject dataset (Cohen-Adad et al.,
Scientific Data 2021), as redistributed by ivadomed/data-testing, in ``../shared/realdata`` (see its
README). It has no lesions: the phantom's ``ms`` and ``sci`` lesions are painted into its T2w slab
(``bids_app.synthetic.paint``), wrapped as a BIDS dataset with its manual cord mask under the legacy
``_seg-manual`` name, and segmented by the tiny test model trained on phantoms.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_app import cli
from bids_app.bids.validate import run_validator
from bids_app.synthetic.paint import paint_lesions

from tests.conftest import participant_args

REPO = Path(__file__).resolve().parents[2]
REALDATA = next((p for p in (REPO.parent / "shared" / "realdata", REPO / "shared" / "realdata")
                 if (p / "spine-generic-unf01").is_dir()), None)
SOURCE = "spine-generic-unf01"
PAINTED = {"unf01ms": "ms", "unf01sci": "sci"}


def wrap_real_scan(target: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A BIDS dataset of the real T2w slab, once per lesion type painted into it; returns the lesion masks."""
    assert REALDATA is not None
    source = REALDATA / SOURCE
    image = nib.load(source / "sub-unf01" / "anat" / "sub-unf01_T2w.nii.gz")
    cord_img = nib.load(source / "derivatives" / "labels" / "sub-unf01" / "anat" / "sub-unf01_T2w_seg-manual.nii.gz")
    assert "".join(nib.aff2axcodes(image.affine)) == "RAS", "painting assumes the slab's RAS storage"
    data, cord = image.get_fdata(), cord_img.get_fdata() > 0.5
    (target / "derivatives" / "labels").mkdir(parents=True)
    (target / "dataset_description.json").write_text(json.dumps({
        "Name": "spine-generic sub-unf01 T2w slab with painted lesions", "BIDSVersion": "1.10.0",
        "DatasetType": "raw", "License": "CC-BY-4.0",
        "Authors": ["spine-generic (Cohen-Adad et al., Scientific Data 2021)"]}))
    (target / "derivatives" / "labels" / "dataset_description.json").write_text(json.dumps({
        "Name": "manual cord masks and painted lesions", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "spine-generic manual segmentation"}]}))
    rows = ["participant_id\tpathology"]
    masks = {}
    for index, (label, lesion_type) in enumerate(PAINTED.items()):
        rng = np.random.default_rng([seed, index])
        painted, lesion = paint_lesions(data, cord, image.header.get_zooms()[:3], lesion_type, "T2w", rng)
        anat = target / f"sub-{label}" / "anat"
        labels = target / "derivatives" / "labels" / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        labels.mkdir(parents=True)
        nib.save(nib.Nifti1Image(painted.astype(np.float32), image.affine, image.header), anat / f"sub-{label}_T2w.nii.gz")
        nib.save(nib.Nifti1Image(cord.astype(np.uint8), image.affine), labels / f"sub-{label}_T2w_seg-manual.nii.gz")
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), image.affine), labels / f"sub-{label}_T2w_label-lesion_seg.nii.gz")
        rows.append(f"sub-{label}\t{'SCI' if lesion_type == 'sci' else 'MS'}")
        masks[label] = lesion
    (target / "participants.tsv").write_text("\n".join(rows) + "\n")
    return masks


pytestmark = pytest.mark.skipif(REALDATA is None, reason="../shared/realdata is not present")


def test_painted_lesions_follow_their_type(tmp_path: Path) -> None:
    masks = wrap_real_scan(tmp_path / "bids")
    cord = nib.load(tmp_path / "bids" / "derivatives" / "labels" / "sub-unf01ms" / "anat"
                    / "sub-unf01ms_T2w_seg-manual.nii.gz").get_fdata() > 0
    depth = ndimage.distance_transform_edt(cord)  # 1 mm voxels
    assert masks["unf01ms"].any() and depth[masks["unf01ms"]].min() <= 1.5
    assert masks["unf01sci"].any() and not (masks["unf01sci"] & ~cord).any()
    sci_rows = np.flatnonzero(masks["unf01sci"].any(axis=(0, 1)))
    assert sci_rows.max() - sci_rows.min() + 1 >= 8  # at least 8 mm along the cord (the slab is 16 mm)
    image = nib.load(tmp_path / "bids" / "sub-unf01ms" / "anat" / "sub-unf01ms_T2w.nii.gz").get_fdata()
    assert image[masks["unf01ms"]].mean() > image[cord & ~masks["unf01ms"]].mean()  # T2-bright


@pytest.mark.slow
def test_participant_level_on_the_real_scan(tiny_model: Path, tmp_path: Path) -> None:
    bids, out = tmp_path / "bids", tmp_path / "out"
    wrap_real_scan(bids)
    assert cli.main([str(bids), str(out), "participant", *participant_args(tiny_model)]) == 0
    for label in PAINTED:
        source = nib.load(bids / f"sub-{label}" / "anat" / f"sub-{label}_T2w.nii.gz")
        folder = out / f"sub-{label}" / "anat"
        for name in ("label-lesion_mask", "label-lesion_probseg", "desc-counterfactual_T2w"):
            img = nib.load(folder / f"sub-{label}_{name}.nii.gz")
            assert img.shape == source.shape and np.allclose(img.affine, source.affine, atol=1e-5), name
            assert np.isfinite(np.asanyarray(img.dataobj)).all()
        evaluation = json.loads((folder / f"sub-{label}_T2w_evaluation.json").read_text())
        assert 0.0 <= evaluation["dice"] <= 1.0  # scored against the painted ground truth
    assert not run_validator(out).errors
