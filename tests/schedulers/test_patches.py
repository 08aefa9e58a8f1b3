"""Patch masks of patched noising: coverage at inference, random boxes at training."""
from __future__ import annotations

import pytest
import torch

from bids_app.schedulers import patch_sets, random_patches


def _region() -> torch.Tensor:
    region = torch.zeros(8, 10, 12, dtype=torch.bool)
    region[2:7, 3:8, 1:11] = True
    region[0, 0, 0] = True
    return region


@pytest.mark.parametrize("size, period, offsets", [((2, 2, 2), 3, 2), ((1, 2, 3), 2, 1), ((2, 2, 2), 1, 2)])
def test_every_editable_voxel_is_noised_once_per_offset(size, period, offsets) -> None:
    region = _region()
    masks = patch_sets(region, size, period, offsets)
    coverage = torch.stack(masks).sum(0)
    assert torch.equal(coverage[region], torch.full((int(region.sum()),), float(offsets)))
    assert coverage[~region].sum() == 0
    assert len(masks) <= period ** 3 * offsets
    assert all(m.any() for m in masks)


def test_boxes_of_one_set_are_a_period_apart() -> None:
    """Two voxels of one mask lie in boxes whose indices agree modulo the period on every axis,
    so between two boxes of a chain there are period - 1 clean boxes."""
    size, period = (2, 2, 2), 3
    for mask in patch_sets(torch.ones(12, 12, 12, dtype=torch.bool), size, period, offsets=1):
        voxels = torch.nonzero(mask)
        boxes = voxels // torch.tensor(size)
        assert (boxes % period == boxes[0] % period).all()


def test_empty_region_gives_no_patches() -> None:
    assert patch_sets(torch.zeros(4, 4, 4, dtype=torch.bool), (2, 2, 2), 3, 2) == []


@pytest.mark.parametrize("kwargs", [{"size": (0, 2, 2)}, {"period": 0}, {"offsets": 0}, {"size": (2, 2)}])
def test_bad_layouts_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        patch_sets(torch.ones(4, 4, 4, dtype=torch.bool), **{"size": (2, 2, 2), "period": 3, "offsets": 2, **kwargs})


def test_random_boxes_sit_in_the_region_within_the_size_limit() -> None:
    regions = torch.zeros(6, 1, 8, 8, 8, dtype=torch.bool)
    regions[:, :, 5:7, 1:3, 2:6] = True
    regions[5] = False  # no region: the box goes anywhere
    draws = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    masks = random_patches(regions, draws, (3, 3, 4))
    assert masks.shape == regions.shape
    for i in range(6):
        voxels = torch.nonzero(masks[i, 0])
        extent = voxels.max(0).values - voxels.min(0).values + 1
        assert (extent <= torch.tensor([3, 3, 4])).all()
        if i < 5:
            assert (masks[i, 0].bool() & regions[i, 0]).any()  # centred on a region voxel
        assert len(voxels) == int(extent.prod())  # one solid box
    assert torch.equal(masks, random_patches(regions, draws, (3, 3, 4)))


def test_random_boxes_need_matching_draws() -> None:
    with pytest.raises(ValueError):
        random_patches(torch.ones(2, 1, 4, 4, 4, dtype=torch.bool), torch.rand(3, 4), (2, 2, 2))
