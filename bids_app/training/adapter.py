"""Stage ``adapter``: a T2I-Adapter that steers the frozen latent diffusion with the cord mask.

The UNet and the VQ-GAN are frozen (their parameters get no gradient, so memory stays low); only
the adapter learns, with the diffusion loss of the UNet given the adapter's features. Trained on
the training participants that have the control derivative.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from bids_app.errors import BadDataError
from bids_app.models.adapter import AdapterConfig, T2IAdapter
from bids_app.schedulers import DDIMScheduler, SchedulerConfig
from bids_app.settings import StageSettings
from bids_app.training import loop
from bids_app.training.checkpoint import restore_rng_state, rng_state
from bids_app.training.diffusion import encode_latent, noisy_batch

log = logging.getLogger(__name__)


class AdapterStage:
    name = "adapter"

    def __init__(self, vqgan: Any, unet: Any, scheduler_config: SchedulerConfig, config: AdapterConfig,
                 settings: StageSettings, train_data: Any, scale: float, device: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.vqgan = vqgan.to(device).eval().requires_grad_(False)
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.config, self.settings, self.train_data = config, settings, train_data
        self.scale, self.device, self.seed = scale, device, seed
        self.adapter = T2IAdapter(config).to(device)
        self.scheduler = DDIMScheduler(scheduler_config)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        self.scaler = loop.make_scaler(device, settings.precision)

    def train_step(self, step: int) -> dict[str, float]:
        self.adapter.train()
        batch = loop.load_batch(self.train_data, step, self.settings.batch_size, self.seed, self.device)
        if "control" not in batch:
            raise BadDataError("the adapter stage needs the control derivative for its training images")
        x0 = encode_latent(self.vqgan, batch["image"]) * self.scale
        noisy, t, target = noisy_batch(self.scheduler, x0, self.generator)
        with loop.autocast(self.device, self.settings.precision):
            features = self.adapter(batch["control"].float())
            prediction = self.unet(noisy, t, features).float()
        loss = F.mse_loss(prediction, target)
        loop.optimizer_step(loss, self.optimizer, self.adapter.parameters(), self.scaler,
                            self.settings.clip_norm, "adapter loss")
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": rng_state(self.generator), "config": self.config.to_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.adapter.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"], self.generator)

    def inference_weights(self) -> dict[str, torch.Tensor]:
        return self.adapter.state_dict()
