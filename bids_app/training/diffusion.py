"""Stage ``diffusion``: the 3D latent diffusion UNet, trained on latents of the frozen VQ-GAN.

Latents are the quantised VQ-GAN codes' embeddings, multiplied by a scale factor decided once from
the training latents (1 / their standard deviation, as latent diffusion does) so the diffusion sees
unit-variance data; the factor is saved with the stage and in the model card. An EMA of the UNet
weights is kept and is what inference samples with.

Patched noising (``patch_fraction`` of the samples): the noise is confined to a random box centred
in the cord, the rest of the latent is shown clean, and the loss is taken on the box only, so the
UNet learns to fill a patch from its real surroundings, which is how inference uses it
(:mod:`bids_app.schedulers.patches`). The other samples keep the plain objective, which sampling
from pure noise, whole-region noising and the adapter stage rely on.

Latent pool (``latent_pool_epochs`` P > 0): encoding through the frozen VQ-GAN is most of a step's
cost (83-88% of the FLOPs of the tiny preset, docs/benchmarks.md "Training step"), so the latent
of an augmented item (epoch e, index i) is encoded once and reused for every epoch congruent to e
modulo P: the data order is unchanged, the augmentations repeat after P epochs. Memory: P x
(training images) latents, so it is on for the tiny preset and off (0) by default.

Distributed: the UNet is wrapped in DDP; each rank encodes its shard of the micro-batch, draws noise and
timesteps for the whole micro-batch and keeps its rows (so the draws do not depend on the number of
processes), and keeps its own, identical, EMA.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from bids_app.errors import BadDataError
from bids_app.models.unet3d import UNet3D, UNet3DConfig
from bids_app.models.vqgan import VQGAN
from bids_app.schedulers import DDIMScheduler, SchedulerConfig, denoise, draw_noise, random_patches
from bids_app.settings import DiffusionStageSettings
from bids_app.training import loop
from bids_app.training.checkpoint import restore_rng_state, rng_state
from bids_app.distributed import SINGLE, Distributed
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
def latent_scale(vqgan: VQGAN, dataset: Any, device: str, dist: Distributed = SINGLE) -> float:
    """1 / std of the (un-augmented) training latents; each rank encodes every ``world_size``-th volume
    and the sums are all-reduced (float64), so every rank gets the same factor."""
    sums = torch.zeros(3, dtype=torch.float64)
    for i in range(dist.rank, len(dataset), dist.world_size):
        z = encode_latent(vqgan, dataset[i]["image"][None].to(device)).double().cpu()
        sums += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64), z.sum(), z.pow(2).sum()])
    if dist.backend == "nccl":
        sums = dist.all_reduce_sum_(sums.to(device)).cpu()
    else:
        dist.all_reduce_sum_(sums)
    n, total, squares = sums.tolist()
    variance = (squares - total * total / n) / max(n - 1, 1) if n else 0.0
    std = math.sqrt(max(variance, 0.0))
    if not std > 0:
        raise BadDataError("the VQ-GAN latents of the training images are constant: the autoencoder did not train")
    return 1.0 / std


def noisy_batch(scheduler: Any, x0: torch.Tensor, generator: torch.Generator, size: int | None = None,
                shard: slice | None = None):
    """(noisy latents, timesteps, training target) for one batch, drawn from ``generator``.

    Distributed: ``x0`` is this rank's ``shard`` of a micro-batch of ``size`` items; the draws are made for
    all ``size`` and the shard kept, so the generator advances alike on every rank.
    """
    size = x0.shape[0] if size is None else size
    shard = slice(0, size) if shard is None else shard
    noise = draw_noise(x0.new_empty((size, *x0.shape[1:])), generator)[shard]
    t = torch.randint(0, scheduler.num_train_timesteps, (size,),
                      generator=generator, device=generator.device)[shard].to(x0.device)
    return scheduler.add_noise(x0, noise, t), t, scheduler.training_target(x0, noise, t)


def patch_weights(latent: torch.Tensor, cord: torch.Tensor | None, generator: torch.Generator, fraction: float,
                  max_size: tuple[int, ...], size: int | None = None, shard: slice | None = None) -> torch.Tensor:
    """Where each sample is noised (B, 1, D, H, W): a random box in the cord (bool, on the latent
    grid: :class:`LatentPool` gives it so) for ``fraction`` of the samples, everywhere for the rest.
    Drawn for the whole micro-batch of ``size`` and sharded like :func:`noisy_batch`."""
    size = latent.shape[0] if size is None else size
    shard = slice(0, size) if shard is None else shard
    draws = torch.rand((size, 5), generator=generator, device=generator.device)[shard].to(latent.device)
    if cord is None:
        cord = torch.ones((latent.shape[0], 1, *latent.shape[2:]), dtype=torch.bool, device=latent.device)
    boxes = random_patches(cord, draws[:, 1:], max_size)
    patched = (draws[:, 0] < fraction).float()[:, None, None, None, None]
    return patched * boxes + (1 - patched)


def masked_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean squared (``l2``) or absolute (``l1``) error over the voxels where ``weights`` is 1, per
    sample, then averaged over samples: so the mean of equal rank shards' losses (DDP) is the
    single-process loss."""
    error = (prediction - target).pow(2) if kind == "l2" else (prediction - target).abs()
    per_sample = (error * weights).flatten(1).sum(1) / (weights.flatten(1).sum(1) * prediction.shape[1]).clamp(min=1.0)
    return per_sample.mean()


class LatentPool:
    """Latents (scaled) and latent-grid cord masks of augmented training items, keyed by
    (epoch mod ``epochs``, index) and encoded on first use; ``epochs`` 0 encodes every time."""

    def __init__(self, vqgan: VQGAN, data: Any, scale: float, epochs: int, device: str) -> None:
        self.vqgan, self.data, self.scale, self.epochs, self.device = vqgan, data, scale, epochs, device
        self._latents: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._latents)

    def batch(self, items: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents (B, C, D, H, W), cord masks on the latent grid (B, 1, D, H, W) or None)."""
        if not self.epochs:
            batch = loop.load_items(self.data, items, self.device)
            x0 = encode_latent(self.vqgan, batch["image"]) * self.scale
            return x0, latent_grid(batch.get("cord"), x0)
        keys = [(epoch % self.epochs, index) for epoch, index in items]
        missing = sorted({k for k in keys if k not in self._latents})
        if missing:
            batch = loop.load_items(self.data, missing, self.device)
            x0 = encode_latent(self.vqgan, batch["image"]) * self.scale
            cord = latent_grid(batch.get("cord"), x0)
            for n, key in enumerate(missing):
                self._latents[key] = (x0[n:n + 1], None if cord is None else cord[n:n + 1])
        latents = torch.cat([self._latents[k][0] for k in keys])
        cords = [self._latents[k][1] for k in keys]
        return latents, None if any(c is None for c in cords) else torch.cat(cords)  # type: ignore[arg-type]


def latent_grid(mask: torch.Tensor | None, latent: torch.Tensor) -> torch.Tensor | None:
    """A mask on the image grid -> bool on the latent's grid (a latent voxel touching it is in)."""
    return None if mask is None else F.adaptive_max_pool3d(mask.float(), latent.shape[2:]) > 0


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
        context: loop.StageContext = loop.StageContext(),
    ) -> None:
        device, seed, dist = context.device, context.seed, context.dist
        figures_dir = context.figures
        torch.manual_seed(seed)
        self.dist = dist
        self.vqgan = vqgan.to(device).eval().requires_grad_(False)
        self.config, self.scheduler_config, self.settings = config, scheduler_config, settings
        self.train_data, self.scale, self.device, self.seed = train_data, scale, device, seed
        self.figures_dir = figures_dir
        self.model = UNet3D(config).to(device)
        self.model_ddp = dist.wrap(self.model)
        self.ema = EMA(self.model, settings.ema_decay)
        self.scheduler = DDIMScheduler(scheduler_config)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
        self.scaler = loop.make_scaler(device, settings.precision)
        self.pool = LatentPool(self.vqgan, train_data, scale, settings.latent_pool_epochs, device)

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        loop.set_learning_rate(self.optimizer, loop.learning_rate_at(
            step, self.settings.learning_rate, self.settings.max_steps, self.settings.lr_schedule))
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in loop.micro_batches(step, self.settings.batch_size, self.settings.accumulation_steps,
                                        len(self.train_data), self.seed, self.dist):
            x0, cord = self.pool.batch(micro.items)
            noisy, t, target = noisy_batch(self.scheduler, x0, self.generator, micro.size, micro.shard)
            weights = torch.ones_like(x0[:, :1])
            if self.settings.patch_fraction > 0:
                weights = patch_weights(x0, cord, self.generator, self.settings.patch_fraction,
                                        tuple(self.settings.patch_max_size), micro.size, micro.shard)
                noisy = weights * noisy + (1 - weights) * x0
            with loop.sync_gradients([self.model_ddp], micro.last):
                with loop.autocast(self.device, self.settings.precision):
                    prediction = self.model_ddp(noisy, t).float()
                loss = masked_loss(prediction, target, weights, self.settings.loss)
                loop.backward(loss / micro.count, self.scaler, "diffusion loss")
            loop.add_metrics(totals, {"loss": float(loss.detach())}, 1.0 / micro.count)
        if loop.apply_gradients(self.optimizer, self.model.parameters(), self.scaler, self.settings.clip_norm,
                                "diffusion loss"):
            self.ema.update(self.model)
        metrics = self.dist.mean_metrics(totals, self.device)
        if self.settings.figure_every and (step + 1) % self.settings.figure_every == 0 and self.dist.is_main:
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
