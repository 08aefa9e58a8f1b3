"""Patched noising at training time: which voxels are noised and where the loss counts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bids_app.training.diffusion import masked_loss, patch_weights


def _cord(batch: int) -> torch.Tensor:
    cord = torch.zeros(batch, 1, 16, 16, 16, dtype=torch.bool)
    cord[:, :, 6:10, 6:10, :] = True
    return cord


def test_fraction_zero_noises_everything_and_one_a_box_in_the_cord() -> None:
    latent = torch.zeros(4, 3, 8, 8, 8)
    everywhere = patch_weights(latent, _cord(4), torch.Generator().manual_seed(0), 0.0, (3, 3, 4))
    assert torch.equal(everywhere, torch.ones(4, 1, 8, 8, 8))
    boxes = patch_weights(latent, _cord(4), torch.Generator().manual_seed(0), 1.0, (3, 3, 4))
    cord_latent = torch.zeros(8, 8, 8, dtype=torch.bool)
    cord_latent[3:5, 3:5, :] = True
    for box in boxes[:, 0].bool():
        assert 1 <= box.sum() <= 3 * 3 * 4
        assert (box & cord_latent).any()


def test_the_draws_do_not_depend_on_the_shard() -> None:
    """A rank holding rows 2:4 of a micro-batch of 4 gets the masks a single process gives them."""
    latent = torch.zeros(4, 3, 8, 8, 8)
    whole = patch_weights(latent, _cord(4), torch.Generator().manual_seed(5), 0.5, (3, 3, 4))
    shard = patch_weights(latent[2:], _cord(2), torch.Generator().manual_seed(5), 0.5, (3, 3, 4), 4, slice(2, 4))
    assert torch.equal(whole[2:], shard)


def test_the_loss_counts_only_the_noised_voxels() -> None:
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 3, 4, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, 4, generator=generator)
    ones = torch.ones(2, 1, 4, 4, 4)
    assert torch.allclose(masked_loss(prediction, target, ones, "l2"), F.mse_loss(prediction, target))
    assert torch.allclose(masked_loss(prediction, target, ones, "l1"), F.l1_loss(prediction, target))
    box = torch.zeros(2, 1, 4, 4, 4)
    box[:, :, :2] = 1
    expected = F.mse_loss(prediction[:, :, :2], target[:, :, :2])
    assert torch.allclose(masked_loss(prediction, target, box, "l2"), expected)
    changed = target.clone()
    changed[:, :, 2:] += 100.0  # outside the box: no effect
    assert torch.allclose(masked_loss(prediction, changed, box, "l2"), expected)
