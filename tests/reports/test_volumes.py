"""What the mosaics show: RAS display order whatever the image's orientation, the cord crop, the slices."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.reports.outputs import ImageOutputs
from bids_app.reports.volumes import axial, choose_slices, crop_box, load_volumes, sagittal


@pytest.mark.parametrize("low, high, count, wanted", [(0, 63, 10, []), (5, 40, 8, [6, 7, 39]), (3, 5, 10, [4]),
                                                        (0, 99, 4, [10, 11, 12, 50, 51, 90])])
def test_slices_cover_the_cord_and_every_wanted_slice(low: int, high: int, count: int, wanted: list[int]) -> None:
    chosen = choose_slices(low, high, count, wanted)
    assert chosen == sorted(set(chosen)) and all(low <= c <= high for c in chosen)
    assert len(chosen) == min(count, high - low + 1)
    if len(wanted) <= count:
        assert set(wanted) <= set(chosen)
    else:
        assert set(chosen) <= set(wanted)
    if not wanted and count < high - low + 1:
        assert chosen[0] - low <= (high - low) / count and high - chosen[-1] <= (high - low) / count


def test_crop_is_the_cord_extent_plus_a_margin_in_mm() -> None:
    cord = np.zeros((40, 40, 20), bool)
    cord[18:22, 10:14, 2:18] = True
    box, source = crop_box(cord, np.ones_like(cord), zooms=(0.5, 1.0, 2.0), margin_mm=(2.0, 2.0, 10.0))
    assert source == "cord mask"
    assert box == (slice(14, 26), slice(8, 16), slice(0, 20)), "4, 2 and 5 voxels of margin, clipped at 0/20"
    region = np.zeros_like(cord)
    region[5, 5, 5] = True
    assert crop_box(None, region, (1, 1, 1), (0, 0, 0)) == ((slice(5, 6),) * 3, "analysis region")
    assert crop_box(None, np.zeros_like(cord), (1, 1, 1))[1] == "whole image"


def test_every_orientation_is_shown_the_same_way(tmp_path: Path) -> None:
    """A marker superior-anterior-right in world space lands at the top right of the sagittal
    slice and the top of the axial one, for an RAS and an LPI/PSR-stored image alike."""
    world = np.zeros((12, 10, 16), np.float32)
    world[8, 7, 13] = 1.0  # right, anterior, superior
    cord = np.zeros_like(world)
    cord[4:9, 3:8, :] = 1
    shown = []
    for codes in ("RAS", "LPI", "PSR"):
        ornt = nib.orientations.axcodes2ornt(codes)
        transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
        affine = np.diag([1.0, 1.0, 1.0, 1.0]) @ nib.orientations.inv_ornt_aff(transform, world.shape)
        paths = {}
        for name, data in (("probseg", world), ("mask", world), ("image", world * 100), ("cord", cord)):
            stored = nib.orientations.apply_orientation(data, transform)
            paths[name] = tmp_path / f"{codes}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(stored, affine), paths[name])
        assert nib.aff2axcodes(nib.load(paths["mask"]).affine) == tuple(codes)
        image = ImageOutputs(source="sub-01/anat/sub-01_T2w.nii.gz", stem="sub-01_T2w", subject="01", session=None,
                             mask=paths["mask"], probseg=paths["probseg"], counterfactual=tmp_path / "none.nii.gz",
                             lesions_tsv=tmp_path / "none.tsv", evaluation_json=tmp_path / "none.json", sidecar={},
                             image=paths["image"], cord_mask=paths["cord"], truth=None)
        volumes = load_volumes(image)
        assert volumes.crop_source == "cord mask" and volumes.counterfactual is None
        assert np.array_equal(volumes.mask, volumes.original > 50)
        x, y, z = np.argwhere(volumes.mask)[0]
        shown.append((np.argwhere(sagittal(volumes.mask, x))[0].tolist(), np.argwhere(axial(volumes.mask, z))[0].tolist(),
                      volumes.mask.shape))
    assert shown[0] == shown[1] == shown[2]
    (sag_row, sag_col), (ax_row, _), shape = shown[0]
    assert sag_row < shape[2] // 2 and sag_col > shape[1] // 2, "superior up, anterior right"
    assert ax_row < shape[1] // 2, "anterior up"
