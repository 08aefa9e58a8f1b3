"""VQ-GAN + latent UNet + scheduler -> pseudo-healthy counterfactual of a model-space volume.

Encode, noise the latent to a strength ``s`` (the fraction of the diffusion chain), denoise it back
and decode. ``steps`` is the number of denoising steps actually run below ``s`` (the chain is
respaced to ``round(steps / s)`` steps over the whole range, of which the last ``steps`` are used),
so the cost does not depend on the strength. Strength 0 returns the autoencoder reconstruction.
Every draw comes from a generator seeded by (seed, strength index, sample index): deterministic.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from bids_app.schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfig, img2img

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class CounterfactualSettings:
    strengths: tuple[float, ...] = (0.5,)
    n_samples: int = 1
    steps: int = 20
    sampler: str = "ddim"
    eta: float = 0.0
    max_latent_voxels: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.strengths or any(not 0 <= s <= 1 for s in self.strengths):
            raise ValueError(f"strengths must be in [0, 1], got {self.strengths}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.n_samples < 1 or self.steps < 1:
            raise ValueError("n_samples and steps must be at least 1")


@dataclass(frozen=True)
class Counterfactual:
    strength: float
    sample: int
    start_timestep: int | None
    image: np.ndarray  # model space, normalised intensities


def respaced_steps(steps: int, strength: float) -> int:
    """Total respaced chain length so that about ``steps`` of it lie below ``strength``."""
    if strength <= 0:
        return steps
    return max(steps, int(round(steps / strength)))


def make_scheduler(config: SchedulerConfig, sampler: str, eta: float = 0.0):
    return DDIMScheduler(config, eta=eta) if sampler == "ddim" else DDPMScheduler(config)


@torch.no_grad()
def encode(vqgan: torch.nn.Module, image: torch.Tensor, scale: float) -> torch.Tensor:
    return vqgan.quantize(vqgan.encode(image)).quantized * scale


@torch.no_grad()
def decode(vqgan: torch.nn.Module, latent: torch.Tensor, scale: float, max_latent_voxels: int | None) -> torch.Tensor:
    """Snap the denoised latent to the codebook, then decode (tiled when a voxel budget is set)."""
    quantized = vqgan.quantize(latent / scale).quantized
    if max_latent_voxels is None:
        return vqgan.decode(quantized)
    return vqgan.decode_tiled(quantized, max_latent_voxels=max_latent_voxels)


@torch.no_grad()
def counterfactuals(
    vqgan: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler_config: SchedulerConfig,
    latent_scale: float,
    image: np.ndarray,
    settings: CounterfactualSettings,
    device: str = "cpu",
    adapter_features: Sequence[torch.Tensor] | None = None,
) -> list[Counterfactual]:
    """Counterfactuals of one model-space volume for every strength and sample."""
    vqgan.eval()
    unet.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    z0 = encode(vqgan, x, latent_scale)
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        (lambda z, t: unet(z, t, adapter_features)) if adapter_features is not None else (lambda z, t: unet(z, t))
    )
    results = []
    for s_index, strength in enumerate(settings.strengths):
        for k in range(settings.n_samples if strength > 0 else 1):
            generator = torch.Generator(device=device).manual_seed(
                settings.seed * 1_000_003 + s_index * 1009 + k)
            scheduler = make_scheduler(scheduler_config, settings.sampler, settings.eta)
            latent, start = img2img(model_fn, scheduler, z0, strength, respaced_steps(settings.steps, strength), generator)
            decoded = decode(vqgan, latent, latent_scale, settings.max_latent_voxels)
            results.append(Counterfactual(strength, k, start, decoded[0, 0].float().cpu().numpy()))
            log.debug("counterfactual at strength %.2f (sample %d) from timestep %s", strength, k, start)
    return results
