"""Patched noising at training time: which voxels are noised and where the loss counts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bids_app.training.diffusion import masked_loss, patch_weights


def _cord(batch: int) -> torch.Tensor:
    """A cord on the 8^3 latent grid (x, y 3:5, every z)."""
    cord = torch.zeros(batch, 1, 8, 8, 8, dtype=torch.bool)
    cord[:, :, 3:5, 3:5, :] = True
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


class _FakeVQGAN:
    """Counts encodes; the latent is the image's mean per 2x2x2 block."""

    def __init__(self) -> None:
        self.encodes = 0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.encodes += image.shape[0]
        return F.avg_pool3d(image, 2)

    def quantize(self, z: torch.Tensor):
        return type("Quantized", (), {"quantized": z})()


class _AugmentedData:
    """Items whose content depends on the epoch (as augmentation does)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        image = torch.full((1, 4, 4, 4), float(10 * self.epoch + index))
        cord = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
        cord[:, 1:3, 1:3] = True
        return {"image": image, "cord": cord}


def test_the_latent_pool_encodes_each_augmentation_once_and_recycles_them() -> None:
    from bids_app.training.diffusion import LatentPool

    vqgan = _FakeVQGAN()
    pool = LatentPool(vqgan, _AugmentedData(), scale=2.0, epochs=2, device="cpu")
    first, cord = pool.batch([(0, 0), (1, 2)])
    assert vqgan.encodes == 2 and len(pool) == 2
    assert first[:, 0, 0, 0, 0].tolist() == [0.0, 2 * 12.0]  # scaled latents of epoch 0 item 0, epoch 1 item 2
    assert cord.shape == (2, 1, 2, 2, 2) and cord.all()
    again, _ = pool.batch([(2, 0), (3, 2), (0, 1)])  # epochs 2 and 3 reuse epochs 0 and 1
    assert vqgan.encodes == 3
    assert torch.equal(again[:2], first)
    plain = LatentPool(vqgan, _AugmentedData(), scale=2.0, epochs=0, device="cpu")
    latest, _ = plain.batch([(2, 0)])
    assert latest[0, 0, 0, 0, 0] == 2 * 20.0 and vqgan.encodes == 4 and len(plain) == 0


def test_cosine_learning_rate_decays_from_the_base_to_zero() -> None:
    import pytest

    from bids_app.training.loop import learning_rate_at

    assert learning_rate_at(500, 1e-3, 1000, "constant") == 1e-3
    values = [learning_rate_at(s, 1e-3, 1000, "cosine") for s in (0, 250, 500, 1000, 1200)]
    assert values[0] == 1e-3 and abs(values[2] - 5e-4) < 1e-12 and values[3] == values[4] == 0.0
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError):
        learning_rate_at(0, 1e-3, 10, "step")


def test_flip_augmentation_keeps_only_windows_and_flips() -> None:
    from bids_app.data import AugmentationSettings
    from bids_app.training.stages import diffusion_augmentation

    full = AugmentationSettings()
    flip = diffusion_augmentation(full, "flip")
    assert (flip.rotation_degrees, flip.intensity_scale, flip.intensity_shift, flip.gamma) == (0.0, 0.0, 0.0, 0.0)
    assert flip.flip_left_right == full.flip_left_right
    assert flip.thick_slice_probability == full.thick_slice_probability > 0  # every stage sees thick slices
    assert diffusion_augmentation(full, "full") is full and diffusion_augmentation(None, "flip") is None


class _RecordingUNet(torch.nn.Module):
    """Predicts the adapter's first feature map (so the adapter gets a gradient); keeps its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # frozen by the stage; present like a real UNet's
        self.inputs: list[torch.Tensor] = []

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, features: list) -> torch.Tensor:
        self.inputs.append(noisy.detach().clone())
        return features[0][:, :noisy.shape[1]] + 0 * noisy


def _adapter_stage(fraction: float):
    from bids_app.models.adapter import AdapterConfig
    from bids_app.schedulers import SchedulerConfig
    from bids_app.settings import StageSettings
    from bids_app.training.adapter import AdapterStage
    from bids_app.training.loop import StageContext

    class VQGAN(torch.nn.Module, _FakeVQGAN):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            _FakeVQGAN.__init__(self)

    class Data(_AugmentedData):
        """One item: an 8^3 image (a 4^3 latent) with a cord through its middle."""

        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> dict:
            control = torch.zeros(1, 8, 8, 8)
            control[:, 2:6, 2:6] = 1.0
            return {"image": torch.arange(512.0).reshape(1, 8, 8, 8) / 512, "control": control}

    config = AdapterConfig(in_channels=1, hidden=4, input_downsample=(2, 2, 2), level_channels=(4,), level_downsample=())
    unet = _RecordingUNet()
    settings = StageSettings(max_steps=1, batch_size=2, learning_rate=1e-3)
    stage = AdapterStage(VQGAN(), unet, SchedulerConfig(num_train_timesteps=100), config, settings, Data(),
                         1.0, StageContext("cpu", 0), patch_fraction=fraction, patch_max_size=(1, 1, 1))
    return stage, unet


def test_the_adapter_learns_under_the_patched_objective() -> None:
    """With patch_fraction 1 the UNet sees each latent clean except one box in the cord (as at inference);
    with 0 it sees the whole latent noised."""
    cord = torch.zeros(4, 4, 4, dtype=torch.bool)
    cord[1:3, 1:3] = True
    for fraction, expected_noised in ((1.0, 1), (0.0, 64)):
        stage, unet = _adapter_stage(fraction)
        before = [p.detach().clone() for p in stage.adapter.parameters()]
        metrics = stage.train_step(0)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        assert any(not torch.equal(a, p) for a, p in zip(before, stage.adapter.parameters())), "the adapter learns"
        x0 = F.avg_pool3d(stage.train_data[0]["image"][None], 2)[0]
        for noisy in unet.inputs[0]:
            changed = (noisy - x0).abs().amax(0) > 1e-6
            assert int(changed.sum()) == expected_noised
            if fraction:
                assert (changed & cord).any(), "the box lies in the cord"
