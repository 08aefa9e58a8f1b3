"""Vertebral levels of lesions from small synthetic disc-label and level-label images."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.bids import layout as L
from bids_app.segmentation.lesions import lesion_table
from bids_app.segmentation.vertebrae import add_vertebral_levels, level_at, read_vertebral_labels
from bids_app.settings import SelectionSettings

#: A sagittal-like grid: 1 mm in x and y, 2 mm in z (inferior-superior), shifted.
AFFINE = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, -10.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
SHAPE = (20, 20, 40)
#: Disc label value -> voxel (i, j, k): C2/C3 (3) at the top down to C6/C7 (7), 8 slices (16 mm) apart;
#: the spine bends forward (i grows) going down, as a cervical lordosis does.
DISCS = {3: (10, 10, 36), 4: (11, 10, 28), 5: (12, 10, 20), 6: (12, 10, 12), 7: (11, 10, 4)}


def save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def disc_labels(path: Path, discs: dict[int, tuple[int, int, int]] = DISCS) -> Path:
    data = np.zeros(SHAPE, np.uint8)
    for value, ijk in discs.items():
        data[ijk] = value
    data[0, 0, 0] = 50  # SCT's pontomedullary junction label: not a disc, ignored
    return save(data, path)


def world(ijk: tuple[float, float, float], affine: np.ndarray = AFFINE) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def test_discs_bound_each_vertebra(tmp_path: Path) -> None:
    labels = read_vertebral_labels(disc_labels(tmp_path / "discs.nii.gz"))
    assert labels.are_discs and sorted(labels.discs) == [3, 4, 5, 6, 7]
    assert level_at(labels, world((10.5, 10, 32))) == 3, "between C2/C3 and C3/C4: C3"
    assert level_at(labels, world((12, 10, 13))) == 5, "between C4/C5 and C5/C6: C5"
    assert level_at(labels, world((11.5, 12, 6))) == 6, "off the midline, between C6/C7's discs: C6"
    assert level_at(labels, world((10, 10, 38))) is None, "above the highest disc: C2 cannot be bounded"
    assert level_at(labels, world((11, 10, 2))) is None, "below the lowest disc"
    assert level_at(labels, (np.nan, 0.0, 0.0)) is None


def test_a_missing_disc_leaves_its_two_vertebrae_unknown(tmp_path: Path) -> None:
    discs = {k: v for k, v in DISCS.items() if k != 5}
    labels = read_vertebral_labels(disc_labels(tmp_path / "discs.nii.gz", discs))
    assert level_at(labels, world((11.5, 10, 24))) is None and level_at(labels, world((12, 10, 16))) is None
    assert level_at(labels, world((10.5, 10, 32))) == 3


def test_levels_follow_the_discs_not_the_grid_axes(tmp_path: Path) -> None:
    """An oblique affine (rotated 30 degrees about x): the same voxels, the same levels."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[c, -s], [s, c]]
    oblique = rotation @ AFFINE
    data = np.asanyarray(nib.load(disc_labels(tmp_path / "a.nii.gz")).dataobj)
    labels = read_vertebral_labels(save(data, tmp_path / "oblique.nii.gz", oblique))
    assert level_at(labels, world((10.5, 10, 32), oblique)) == 3
    assert level_at(labels, world((12, 10, 16), oblique)) == 5


def test_labels_with_a_level_in_every_cord_voxel(tmp_path: Path) -> None:
    data = np.zeros(SHAPE, np.int16)
    for level, (low, high) in {2: (30, 40), 3: (22, 30), 4: (14, 22)}.items():
        data[8:12, 8:12, low:high] = level
    labels = read_vertebral_labels(save(data, tmp_path / "labeled.nii.gz"))
    assert not labels.are_discs
    assert level_at(labels, world((10, 10, 25))) == 3
    assert level_at(labels, world((9, 9, 35))) == 2
    assert level_at(labels, world((10, 10, 5))) is None, "far below the labelled cord"


def test_lesion_rows_get_their_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:12, 9:11, 30:34] = 1  # around slice 32: C3
    mask[11:13, 9:11, 14:18] = 1  # around slice 16: C5
    rows = lesion_table(mask, None, AFFINE)
    assert [row["vertebral_level"] for row in rows] == [None, None], "unknown until disc labels are read"
    assert add_vertebral_levels(rows, None) is rows
    levelled = add_vertebral_levels(rows, disc_labels(tmp_path / "discs.nii.gz"))
    assert sorted(row["vertebral_level"] for row in levelled) == [3, 5]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with caplog.at_level(logging.WARNING):
        rows = add_vertebral_levels(lesion_table(mask, None, AFFINE), broken)
    assert [row["vertebral_level"] for row in rows] == [None, None]
    assert "cannot read the disc labels" in caplog.text and "broken.nii.gz" in caplog.text


@pytest.mark.parametrize("name", ["sub-01_T2w_labels-disc-manual", "sub-01_T2w_label-disc",
                                  "sub-01_T2w_label-discs_dlabel"])
def test_disc_labels_are_found_beside_the_cord_masks(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "labels" / "sub-01" / "anat"
    disc_labels(folder / f"{name}.nii.gz")
    found = L.match_derivative("sub-01/anat/sub-01_T2w.nii.gz", [tmp_path / "labels"], SelectionSettings().disc_names)
    assert found == folder / f"{name}.nii.gz"
    assert L.required_templates("disc", SelectionSettings()) == SelectionSettings().disc_names
