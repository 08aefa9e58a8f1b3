"""Stage ``diffusion``: the 3D latent diffusion UNet, trained on latents of the frozen VQ-GAN.

Latents are the quantised VQ-GAN codes' embeddings, multiplied by a scale factor decided once from
the training latents (1 / their standard deviation, as latent diffusion does) so the diffusion sees
unit-variance data; the factor is saved with the stage and in the model card. An EMA of the UNet
weights is kept and is what inference samples with.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from bids_app.errors import BadDataError
from bids_app.models.unet3d import UNet3D, UNet3DConfig
from bids_app.models.vqgan import VQGAN
from bids_app.schedulers import DDIMScheduler, SchedulerConfig, denoise, draw_noise
from bids_app.settings import DiffusionStageSettings
from bids_app.training import loop
from bids_app.training.checkpoint import restore_rng_state, rng_state
from bids_app.training.ema import EMA
from bids_app.training.figures import save_volume_figure

log = logging.getLogger(__name__)


def unet_config(preset: str, latent_channels: int, overrides: Mapping[str, Any]) -> UNet3DConfig:
    base = (UNet3DConfig.tiny if preset == "tiny" else UNet3DConfig.default)(latent_channels).to_dict()
    return UNet3DConfig.from_dict({**base, **overrides})


@torch.no_grad()
def encode_latent(vqgan: VQGAN, image: torch.Tensor) -> torch.Tensor:
    """The latent the diffusion model works on: quantised embeddings (before scaling)."""
    return vqgan.quantize(vqgan.encode(image)).quantized


@torch.no_grad()
def latent_scale(vqgan: VQGAN, dataset: Any, device: str) -> float:
    """1 / std of the (un-augmented) training latents."""
    latents = [encode_latent(vqgan, dataset[i]["image"][None].to(device)) for i in range(len(dataset))]
    std = float(torch.cat([z.flatten() for z in latents]).std())
    if not std > 0:
        raise BadDataError("the VQ-GAN latents of the training images are constant: the autoencoder did not train")
    return 1.0 / std


def noisy_batch(scheduler: Any, x0: torch.Tensor, generator: torch.Generator):
    """(noisy latents, timesteps, training target) for one batch, drawn from ``generator``."""
    noise = draw_noise(x0, generator)
    t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],),
                      generator=generator, device=generator.device).to(x0.device)
    return scheduler.add_noise(x0, noise, t), t, scheduler.training_target(x0, noise, t)


class DiffusionStage:
    """One UNet optimisation step per ``train_step``; the VQ-GAN is frozen."""

    name = "diffusion"

    def __init__(
        self,
        vqgan: VQGAN,
        config: UNet3DConfig,
        scheduler_config: SchedulerConfig,
        settings: DiffusionStageSettings,
        train_data: Any,
        scale: float,
        device: str,
        seed: int,
        figures_dir: Path | None = None,
    ) -> None:
        torch.manual_seed(seed)
        self.vqgan = vqgan.to(device).eval().requires_grad_(False)
        self.config, self.scheduler_config, self.settings = config, scheduler_config, settings
        self.train_data, self.scale, self.device, self.seed = train_data, scale, device, seed
        self.figures_dir = figures_dir
        self.model = UNet3D(config).to(device)
        self.ema = EMA(self.model, settings.ema_decay)
        self.scheduler = DDIMScheduler(scheduler_config)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        self.scaler = loop.make_scaler(device, settings.precision)
        if settings.loss not in ("l1", "l2"):
            raise BadDataError(f"training.diffusion.loss must be l1 or l2, got {settings.loss!r}")

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        batch = loop.load_batch(self.train_data, step, self.settings.batch_size, self.seed, self.device)
        x0 = encode_latent(self.vqgan, batch["image"]) * self.scale
        noisy, t, target = noisy_batch(self.scheduler, x0, self.generator)
        with loop.autocast(self.device, self.settings.precision):
            prediction = self.model(noisy, t).float()
        loss = F.mse_loss(prediction, target) if self.settings.loss == "l2" else F.l1_loss(prediction, target)
        if loop.optimizer_step(loss, self.optimizer, self.model.parameters(), self.scaler,
                               self.settings.clip_norm, "diffusion loss"):
            self.ema.update(self.model)
        metrics = {"loss": float(loss.detach())}
        if self.settings.figure_every and (step + 1) % self.settings.figure_every == 0:
            self.sample_figure(step + 1)
        return metrics

    @torch.no_grad()
    def sample_figure(self, step: int, n_steps: int = 10) -> None:
        """An unconditional sample from pure noise with the EMA weights (DDIM), decoded."""
        if self.figures_dir is None:
            return
        image = self.train_data[0]["image"][None].to(self.device)
        shape = encode_latent(self.vqgan, image).shape
        generator = torch.Generator(device=self.device).manual_seed(self.seed + step)
        sample = draw_noise(torch.empty(shape, device=self.device), generator)
        self.scheduler.set_timesteps(n_steps)
        latent = denoise(lambda x, t: self.ema.shadow(x, t), self.scheduler, sample, self.scheduler.timesteps, generator)
        decoded = self.vqgan.decode(self.vqgan.quantize(latent / self.scale).quantized)
        save_volume_figure(self.figures_dir / f"diffusion_sample_step-{step:06d}.png", [image[0, 0], decoded[0, 0]])

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.generator),
            "config": self.config.to_dict(),
            "scale": self.scale,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["config"] != self.config.to_dict():
            raise BadDataError("the diffusion checkpoint in the work dir was made with another architecture: "
                               "delete it or use --retrain")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.scale = float(state["scale"])
        restore_rng_state(state["rng"], self.generator)

    def inference_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()
