"""The real training stages: an interrupted and resumed run equals an uninterrupted one."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import torch

from bids_app.models.discriminators import DiscriminatorConfig
from bids_app.models.unet3d import UNet3DConfig
from bids_app.models.vqgan import VQGAN, tiny_config
from bids_app.schedulers import SchedulerConfig
from bids_app.settings import DiffusionStageSettings, StageSettings, VQGANStageSettings
from bids_app.training import loop
from bids_app.training.diffusion import DiffusionStage
from bids_app.training.vqgan import VQGANStage


class TensorVolumes:
    """In-memory stand-in for TrainingVolumes (same item layout, epoch-aware)."""

    def __init__(self, n: int = 3, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(1, size, size, size, generator=g) * 2 - 1 for _ in range(n)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "valid": torch.ones_like(self.images[index], dtype=torch.bool)}


VQ_SETTINGS = VQGANStageSettings(max_steps=6, batch_size=2, learning_rate=1e-3, disc_start=2, figure_every=0)
DISC = DiscriminatorConfig(base=4, n_layers=2, norm_groups=2, slices_per_volume=2)


def vq_stage() -> VQGANStage:
    data = TensorVolumes()
    return VQGANStage(tiny_config(), DISC, VQ_SETTINGS, data, data, loop.StageContext("cpu", seed=5))


def diffusion_stage() -> DiffusionStage:
    torch.manual_seed(0)
    vqgan = VQGAN(tiny_config()).eval()
    unet = UNet3DConfig.tiny(tiny_config().embedding_dim, channel_mults=(1,), attention_levels=(True,))
    settings = DiffusionStageSettings(max_steps=6, batch_size=2, learning_rate=1e-3, ema_decay=0.5, figure_every=0)
    return DiffusionStage(vqgan, unet, SchedulerConfig(num_train_timesteps=100), settings, TensorVolumes(), 2.0,
                          loop.StageContext("cpu", seed=7))


def _resume_matches(make_stage, tmp_path: Path) -> None:
    straight = make_stage()
    loop.run_stage(straight, StageSettings(max_steps=6, checkpoint_every=3), tmp_path / "a")
    first = make_stage()
    loop.run_stage(first, StageSettings(max_steps=3, checkpoint_every=3), tmp_path / "b")
    torch.manual_seed(999)
    resumed = make_stage()
    loop.run_stage(resumed, StageSettings(max_steps=6, checkpoint_every=3), tmp_path / "b")
    a, b = straight.state_dict(), resumed.state_dict()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_vqgan_stage_resumes_bitwise(tmp_path: Path) -> None:
    _resume_matches(vq_stage, tmp_path)


def test_diffusion_stage_resumes_bitwise(tmp_path: Path) -> None:
    _resume_matches(diffusion_stage, tmp_path)


def test_vqgan_adversarial_terms_start_after_warm_up() -> None:
    stage = vq_stage()
    assert "d_loss" not in stage.train_step(0)
    assert "d_loss" in stage.train_step(2)


class SliceFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = torch.nn.functional.avg_pool2d(x, 2)
        return [first, torch.nn.functional.avg_pool2d(first, 2)]


def test_perceptual_loss_only_with_a_local_feature_extractor(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="bids_app")
    assert "perceptual" not in vq_stage().train_step(0)
    assert "perceptual loss off" in caplog.text
    path = tmp_path / "features.pt"
    torch.jit.script(SliceFeatures()).save(str(path))
    data = TensorVolumes()
    settings = VQGANStageSettings(max_steps=2, batch_size=2, disc_start=5, figure_every=0, perceptual_weights=path)
    metrics = VQGANStage(tiny_config(), DISC, settings, data, data, loop.StageContext("cpu", seed=5)).train_step(0)
    assert metrics["perceptual"] > 0


def test_a_bad_perceptual_file_is_refused(tmp_path: Path) -> None:
    from bids_app.errors import BadDataError

    path = tmp_path / "features.pt"
    path.write_bytes(b"not torchscript")
    settings = VQGANStageSettings(max_steps=2, perceptual_weights=path)
    with pytest.raises(BadDataError, match="TorchScript"):
        VQGANStage(tiny_config(), DISC, settings, TensorVolumes(), TensorVolumes(), loop.StageContext("cpu", seed=5))


def test_vqgan_stage_checkpoints_activations_unless_switched_off() -> None:
    assert VQGANStageSettings().activation_checkpointing
    assert vq_stage().model.decoder.checkpointing
    data = TensorVolumes()
    settings = VQGANStageSettings(max_steps=2, batch_size=2, figure_every=0, activation_checkpointing=False)
    stage = VQGANStage(tiny_config(), DISC, settings, data, data, loop.StageContext("cpu", seed=5))
    assert not stage.model.encoder.checkpointing and not stage.model.decoder.checkpointing


def test_diffusion_cosine_schedule_decays_the_learning_rate() -> None:
    torch.manual_seed(0)
    vqgan = VQGAN(tiny_config()).eval()
    unet = UNet3DConfig.tiny(tiny_config().embedding_dim, channel_mults=(1,), attention_levels=(True,))

    def rates(schedule: str) -> list[float]:
        settings = DiffusionStageSettings(max_steps=4, batch_size=2, learning_rate=1e-3, figure_every=0,
                                          lr_schedule=schedule)
        stage = DiffusionStage(vqgan, unet, SchedulerConfig(num_train_timesteps=100), settings, TensorVolumes(), 2.0,
                               loop.StageContext("cpu", seed=7))
        values = []
        for step in range(4):
            stage.train_step(step)
            values.append(stage.optimizer.param_groups[0]["lr"])
        return values

    cosine = rates("cosine")
    assert cosine[0] == pytest.approx(1e-3) and cosine == sorted(cosine, reverse=True) and cosine[-1] < 2e-4
    assert rates("constant") == pytest.approx([1e-3] * 4)
