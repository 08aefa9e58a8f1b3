"""Lesion mask post-processing (threshold, size filter, growth) and the per-lesion table."""
from __future__ import annotations

import numpy as np
import pytest

from bids_app.segmentation.lesions import (LESION_COLUMNS, label_components, lesion_free_threshold, lesion_mask,
                                           lesion_table, write_lesion_tsv)


def blobs() -> np.ndarray:
    """Residual map with a 2x2x2 (8 voxel) and a 3x3x3 (27 voxel) bright cube."""
    res = np.zeros((16, 16, 16), np.float32)
    res[2:4, 2:4, 2:4] = 1.0
    res[9:12, 9:12, 9:12] = 1.0
    return res


def test_threshold_is_strict_and_inside_the_region() -> None:
    res = blobs()
    region = np.ones(res.shape, bool)
    assert not lesion_mask(res, region, 1.0, (1, 1, 1), 0.0).any()  # > threshold, not >=
    region[:8] = False
    mask = lesion_mask(res, region, 0.5, (1, 1, 1), 0.0)
    assert mask.dtype == np.uint8 and mask.sum() == 27


@pytest.mark.parametrize("spacing, expected", [
    ((1.0, 1.0, 1.0), 27),        # 8 mm^3 < 10 mm^3 removed, 27 mm^3 kept
    ((0.5, 0.5, 0.5), 0),         # 1 and 3.375 mm^3: both below 10
    ((1.25, 1.0, 1.0), 35),       # 8 x 1.25 = 10 mm^3: equal is kept
])
def test_small_components_depend_on_voxel_volume(spacing, expected) -> None:
    res = blobs()
    mask = lesion_mask(res, np.ones(res.shape, bool), 0.5, spacing, min_lesion_mm3=10.0)
    assert mask.sum() == expected


def test_components_are_26_connected() -> None:
    res = np.zeros((8, 8, 8), np.float32)
    res[2, 2, 2] = res[3, 3, 3] = res[4, 4, 4] = 1.0  # touching only at corners: one lesion
    mask = lesion_mask(res, np.ones(res.shape, bool), 0.5, (1, 1, 1), min_lesion_mm3=3.0)
    assert mask.sum() == 3
    assert label_components(mask)[1] == 1


def test_the_mask_is_the_voxels_above_the_threshold_unsmoothed() -> None:
    """No smoothing of the binary mask: a one-voxel hole stays a hole and, without a size filter, a
    single voxel is a lesion."""
    res = np.zeros((12, 12, 12), np.float32)
    res[2:7, 2:7, 2:7] = 1.0
    res[4, 4, 4] = 0.0  # one-voxel hole
    res[10, 10, 10] = 1.0  # isolated voxel
    plain = lesion_mask(res, np.ones(res.shape, bool), 0.5, (1, 1, 1), 0.0)
    assert plain[4, 4, 4] == 0 and plain[10, 10, 10] == 1
    np.testing.assert_array_equal(plain, res > 0.5)


def centroid(row: dict) -> tuple[float, float, float]:
    return row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]


def test_lesion_table_with_non_identity_affine() -> None:
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1:3, 1:2, 1:2] = 1        # 2 voxels, centre (1.5, 1, 1)
    mask[5:8, 5:8, 5:7] = 1        # 18 voxels, centre (6, 6, 5.5)
    scores = np.zeros(mask.shape, np.float32)
    scores[1, 1, 1], scores[2, 1, 1] = 0.2, 0.6
    scores[5:8, 5:8, 5:7] = 0.5
    scores[6, 6, 6] = 0.95
    # Oblique-ish affine: permuted axes, a flip, anisotropic spacing and an offset.
    affine = np.array([[0.0, -0.5, 0.0, 10.0],
                       [2.0, 0.0, 0.0, -5.0],
                       [0.0, 0.0, 1.5, 30.0],
                       [0.0, 0.0, 0.0, 1.0]])
    rows = lesion_table(mask, scores, affine)
    assert [r["index"] for r in rows] == [1, 2]
    big, small = rows
    assert big["n_voxels"] == 18 and small["n_voxels"] == 2
    assert big["volume_mm3"] == pytest.approx(18 * 1.5) and small["volume_mm3"] == pytest.approx(3.0)
    expect = affine @ np.array([6.0, 6.0, 5.5, 1.0])
    assert centroid(big) == pytest.approx(tuple(expect[:3]))
    expect = affine @ np.array([1.5, 1.0, 1.0, 1.0])
    assert centroid(small) == pytest.approx(tuple(expect[:3]))
    assert big["max_score"] == pytest.approx(0.95)
    assert big["mean_score"] == pytest.approx((17 * 0.5 + 0.95) / 18)
    assert small["max_score"] == pytest.approx(0.6) and small["mean_score"] == pytest.approx(0.4)
    assert set(big) == set(LESION_COLUMNS)
    no_scores = lesion_table(mask, None, affine)
    assert np.isnan(no_scores[0]["max_score"])


def test_lesion_tsv(tmp_path) -> None:
    path = write_lesion_tsv(tmp_path / "empty.tsv", [])
    assert path.read_text() == "\t".join(LESION_COLUMNS) + "\n"
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    rows = lesion_table(mask, None, np.eye(4))
    lines = write_lesion_tsv(tmp_path / "one.tsv", rows).read_text().splitlines()
    assert len(lines) == 2
    cells = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    assert cells["index"] == "1" and cells["n_voxels"] == "8" and float(cells["volume_mm3"]) == 8.0
    assert cells["max_score"] == "n/a" and float(cells["centroid_x_mm"]) == 1.5


def test_lesion_free_threshold_is_where_the_last_large_enough_blob_disappears() -> None:
    from bids_app.segmentation.lesions import lesion_free_threshold, lesion_mask

    residual = np.zeros((12, 12, 12), np.float32)
    residual[2:4, 2:4, 2:4] = 0.5  # 8 voxels
    residual[2, 2, 2] = 0.9  # its peak voxel
    residual[8:10, 8:10, 8:10] = 0.7  # a second blob of 8 voxels
    residual[6, 6, 6] = 2.0  # a single voxel: below the size filter
    region = np.ones_like(residual, bool)
    t = lesion_free_threshold(residual, region, (1.0, 1.0, 1.0), min_lesion_mm3=4.0)
    assert t == pytest.approx(0.7)  # above 0.7 only specks of 1 voxel are left
    assert not lesion_mask(residual, region, t, (1.0, 1.0, 1.0), 4.0).any()
    assert lesion_mask(residual, region, t - 1e-3, (1.0, 1.0, 1.0), 4.0).any()
    assert lesion_free_threshold(residual, region, (1.0, 1.0, 1.0), min_lesion_mm3=5000.0) < residual.min()
    assert lesion_free_threshold(residual, np.zeros_like(region), (1.0, 1.0, 1.0), 4.0) == float("-inf")


def faint_margin() -> np.ndarray:
    """A bright 3x3x3 core inside a faint 5x5x5 margin, and a faint 3x3x3 blob on its own."""
    res = np.zeros((16, 16, 16), np.float32)
    res[1:6, 1:6, 1:6] = 0.4
    res[2:5, 2:5, 2:5] = 1.0
    res[10:13, 10:13, 10:13] = 0.4
    return res


def test_growth_extends_found_lesions_only() -> None:
    res, region = faint_margin(), np.ones((16, 16, 16), bool)
    core = lesion_mask(res, region, 0.5, (1, 1, 1), 5.0)
    assert core.sum() == 27
    grown = lesion_mask(res, region, 0.5, (1, 1, 1), 5.0, grow_threshold=0.3)
    assert grown.dtype == np.uint8 and grown.sum() == 125, "the core reaches its whole margin"
    assert grown[10:13, 10:13, 10:13].sum() == 0, "a faint blob without a core is no lesion"
    # Growth stays inside the region, and a grow threshold at or above the threshold changes nothing.
    region[:, :, 5] = False
    assert lesion_mask(res, region, 0.5, (1, 1, 1), 5.0, grow_threshold=0.3).sum() == 100
    np.testing.assert_array_equal(lesion_mask(faint_margin(), np.ones_like(region), 0.5, (1, 1, 1), 5.0,
                                              grow_threshold=0.5), core)


def test_growth_never_creates_a_lesion() -> None:
    """The size filter decides on the seeds: a 2-voxel core below 5 mm3 stays removed, however
    large its faint margin, so an image has a lesion with growth exactly when it has one without."""
    res = np.zeros((12, 12, 12), np.float32)
    res[2:9, 2:9, 2:9] = 0.4
    res[5, 5, 5:7] = 1.0
    region = np.ones(res.shape, bool)
    assert not lesion_mask(res, region, 0.5, (1, 1, 1), 5.0).any()
    assert not lesion_mask(res, region, 0.5, (1, 1, 1), 5.0, grow_threshold=0.3).any()
    assert lesion_free_threshold(res, region, (1, 1, 1), 5.0) == pytest.approx(0.4)


def test_growth_over_another_map_extends_the_lesions_found_on_the_thresholded_one() -> None:
    """Found on the smoothed map, grown over the sharp one: its threshold is on the sharp map's scale
    (here above the detection threshold) and it still never creates a lesion."""
    smoothed = np.zeros((16, 16, 16), np.float32)
    smoothed[4:7, 4:7, 4:7] = 0.5  # the core, found at 0.4
    sharp = np.zeros_like(smoothed)
    sharp[3:8, 3:8, 3:9] = 0.9  # the lesion's true, larger extent on the unsmoothed map
    sharp[11:14, 11:14, 11:14] = 0.9  # a sharp speck the smoothed map did not find
    region = np.ones(smoothed.shape, bool)
    grown = lesion_mask(smoothed, region, 0.4, (1, 1, 1), 5.0, grow_threshold=0.6, grow_residual=sharp)
    assert grown.sum() == 5 * 5 * 6 and grown[3:8, 3:8, 3:9].all()
    assert not grown[11:14, 11:14, 11:14].any(), "growth creates no lesion"
    assert lesion_mask(smoothed, region, 0.4, (1, 1, 1), 5.0, grow_residual=sharp).sum() == 27, "no threshold, no growth"
    with pytest.raises(ValueError, match="grow_residual"):
        lesion_mask(smoothed, region, 0.4, (1, 1, 1), 5.0, grow_threshold=0.6, grow_residual=sharp[:8])


def test_lesions_are_found_only_in_the_detection_region_and_grow_over_the_whole_region() -> None:
    region = np.ones((12, 12, 12), bool)
    inner = np.zeros_like(region)
    inner[2:10, 2:10, 2:10] = True
    residual = np.zeros((12, 12, 12), np.float32)
    residual[0:2, 5:8, 5:8] = 0.9  # only in the surface layer: never a lesion
    residual[4:7, 4:7, 0:5] = 0.9  # deeper, reaching the surface: found, and grown back into it
    mask = lesion_mask(residual, region, 0.5, (1.0, 1.0, 1.0), 1.0, grow_threshold=0.5, grow_residual=residual,
                       detection_region=inner)
    assert not mask[0:2, 5:8, 5:8].any()
    assert mask[4:7, 4:7, 0:5].all() and mask.sum() == 45
    # Without the detection region both are lesions.
    assert lesion_mask(residual, region, 0.5, (1.0, 1.0, 1.0), 1.0)[0:2, 5:8, 5:8].all()
