"""Stage ``adapter``: a T2I-Adapter that steers the frozen latent diffusion with the cord mask.

The UNet and the VQ-GAN are frozen (their parameters get no gradient, so memory stays low); only
the adapter learns, with the diffusion loss of the UNet given the adapter's features. Trained on
the training participants that have the control derivative. Distributed: the adapter alone is
wrapped in DDP; batches and draws as in :mod:`bids_app.training.diffusion`.

The adapter learns under the UNet's own objective: with ``patch_fraction`` > 0 (the diffusion
stage's), that share of the samples is noised only inside a random box of the cord, the loss on
the box, as inference's patched noising uses it: trained on whole-latent noise only, the adapter
steered patched read-outs away from their clean context (docs/benchmarks.md, "The adapter").
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from bids_app.errors import BadDataError
from bids_app.models.adapter import AdapterConfig, T2IAdapter
from bids_app.schedulers import DDIMScheduler, SchedulerConfig
from bids_app.settings import StageSettings
from bids_app.training import loop
from bids_app.training.checkpoint import restore_rng_state, rng_state
from bids_app.training.diffusion import encode_latent, latent_grid, masked_loss, noisy_batch, patch_weights

log = logging.getLogger(__name__)


class AdapterStage:
    name = "adapter"

    def __init__(self, vqgan: Any, unet: Any, scheduler_config: SchedulerConfig, config: AdapterConfig,
                 settings: StageSettings, train_data: Any, scale: float,
                 context: loop.StageContext = loop.StageContext(), *, patch_fraction: float = 0.0,
                 patch_max_size: tuple[int, int, int] = (3, 3, 4)) -> None:
        device, seed, dist = context.device, context.seed, context.dist
        torch.manual_seed(seed)
        self.patch_fraction, self.patch_max_size = patch_fraction, tuple(patch_max_size)
        self.dist = dist
        self.vqgan = vqgan.to(device).eval().requires_grad_(False)
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.config, self.settings, self.train_data = config, settings, train_data
        self.scale, self.device, self.seed = scale, device, seed
        self.adapter = T2IAdapter(config).to(device)
        self.adapter_ddp = dist.wrap(self.adapter)
        self.scheduler = DDIMScheduler(scheduler_config)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        self.scaler = loop.make_scaler(device, settings.precision)

    def train_step(self, step: int) -> dict[str, float]:
        self.adapter.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in loop.micro_batches(step, self.settings.batch_size, self.settings.accumulation_steps,
                                        len(self.train_data), self.seed, self.dist):
            batch = loop.load_items(self.train_data, micro.items, self.device)
            if "control" not in batch:
                raise BadDataError("the adapter stage needs the control derivative for its training images")
            x0 = encode_latent(self.vqgan, batch["image"]) * self.scale
            noisy, t, target = noisy_batch(self.scheduler, x0, self.generator, micro.size, micro.shard)
            weights = torch.ones_like(x0[:, :1])
            if self.patch_fraction > 0:
                weights = patch_weights(x0, latent_grid(batch["control"] > 0, x0), self.generator,
                                        self.patch_fraction, self.patch_max_size, micro.size, micro.shard)
                noisy = weights * noisy + (1 - weights) * x0
            with loop.sync_gradients([self.adapter_ddp], micro.last):
                with loop.autocast(self.device, self.settings.precision):
                    features = self.adapter_ddp(batch["control"].float())
                    prediction = self.unet(noisy, t, features).float()
                loss = masked_loss(prediction, target, weights, "l2")
                loop.backward(loss / micro.count, self.scaler, "adapter loss")
            loop.add_metrics(totals, {"loss": float(loss.detach())}, 1.0 / micro.count)
        loop.apply_gradients(self.optimizer, self.adapter.parameters(), self.scaler, self.settings.clip_norm,
                             "adapter loss")
        return self.dist.mean_metrics(totals, self.device)

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
