"""Patch discriminators, slice sampling and GAN losses."""
from __future__ import annotations

import json

import pytest
import torch

from bids_app.models.discriminators import (
    DiscriminatorConfig,
    PatchDiscriminator2D,
    PatchDiscriminator3D,
    build_discriminators,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    random_slices,
)


def test_2d_output_shapes() -> None:
    d = PatchDiscriminator2D(in_channels=1, base=4, n_layers=3)
    logits, features = d(torch.randn(5, 1, 16, 32))
    assert logits.shape == (5, 1, 2, 4)
    assert [f.shape[1:] for f in features] == [(4, 8, 16), (8, 4, 8), (16, 2, 4), (32, 2, 4)]


def test_3d_output_shapes() -> None:
    d = PatchDiscriminator3D(in_channels=2, base=4, n_layers=2)
    logits, features = d(torch.randn(2, 2, 16, 16, 32))
    assert logits.shape == (2, 1, 4, 4, 8)
    assert len(features) == 3 and features[-1].shape == (2, 16, 4, 4, 8)


def test_too_small_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator3D(base=4, n_layers=3)(torch.randn(1, 1, 4, 16, 16))


def test_config_round_trip_and_build() -> None:
    config = DiscriminatorConfig(base=4, n_layers=2, kind="3d")
    assert DiscriminatorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="bogus"):
        DiscriminatorConfig.from_dict({"bogus": 1})
    d2, d3 = build_discriminators(config)
    assert d2 is None and isinstance(d3, PatchDiscriminator3D)
    d2, d3 = build_discriminators(DiscriminatorConfig(kind="both"))
    assert isinstance(d2, PatchDiscriminator2D) and isinstance(d3, PatchDiscriminator3D)


def test_hinge_losses_closed_form() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    assert torch.allclose(hinge_g_loss(fake), torch.tensor(1.0 / 3.0))
    assert float(hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0))) == 0.0


def test_feature_matching() -> None:
    d = PatchDiscriminator2D(base=4, n_layers=2)
    x = torch.randn(2, 1, 16, 16)
    _, feats = d(x)
    _, same = d(x.clone())
    assert float(feature_matching_loss(feats, same).detach()) == 0.0
    fake = x.clone().requires_grad_(True)
    _, fake_feats = d(fake + 1.0)
    loss = feature_matching_loss(feats, fake_feats)
    loss.backward()
    assert float(loss.detach()) > 0 and fake.grad is not None
    expected = torch.stack([(a - b).abs().mean() for a, b in zip(feats, fake_feats)]).mean()
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError):
        feature_matching_loss(feats, fake_feats[:-1])


def test_random_slices_deterministic_and_reusable() -> None:
    volume = torch.arange(2 * 1 * 4 * 5 * 6, dtype=torch.float32).view(2, 1, 4, 5, 6)
    a, sel_a = random_slices(volume, 3, torch.Generator().manual_seed(7))
    b, sel_b = random_slices(volume, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and sel_a.axis == sel_b.axis and torch.equal(sel_a.indices, sel_b.indices)
    # the same selection cuts the same positions from another volume (real vs fake)
    fake = -volume
    c, sel_c = random_slices(fake, 3, selection=sel_a)
    assert sel_c is sel_a and torch.equal(c, -a)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_random_slices_pick_the_stated_slices(axis: int) -> None:
    volume = torch.randn(2, 3, 4, 5, 6)
    slices, sel = random_slices(volume, 4, torch.Generator().manual_seed(0), axis=axis)
    plane = [s for i, s in enumerate((4, 5, 6)) if i != axis]
    assert slices.shape == (8, 3, *plane) and sel.axis == axis
    for b in range(2):
        for k in range(4):
            expected = volume[b].select(1 + axis, int(sel.indices[b, k]))
            assert torch.equal(slices[b * 4 + k], expected)
    with pytest.raises(ValueError, match="axis"):
        random_slices(volume, 1, axis=3)
