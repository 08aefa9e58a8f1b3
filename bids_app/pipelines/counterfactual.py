"""VQ-GAN + latent UNet + scheduler -> pseudo-healthy counterfactual of a model-space volume.

Encode, noise the latent to a strength ``s`` (the fraction of the diffusion chain), denoise it back
and decode. ``steps`` is the number of denoising steps actually run below ``s`` (the chain is
respaced to ``round(steps / s)`` steps over the whole range, of which the last ``steps`` are used),
so the cost does not depend on the strength. Every draw comes from a generator seeded by (seed,
window, strength index, sample index): deterministic.

``reference="reconstruction"`` (the default) transfers the model's edit onto the input: the
counterfactual is ``x + (D(z_s) - D(E(x)))``, the input changed only where the denoising changed its
decoding. The autoencoder's own reconstruction error (blur, codebook snapping of fine anatomy) then
cancels out of the residual ``x - x_hat = D(E(x)) - D(z_s)`` instead of burying the lesions in it
(measured: oracle Dice 0.10 -> 0.16 with the same model, docs/benchmarks.md). ``reference="image"``
returns the raw decoding, and strength 0 the autoencoder reconstruction (the baseline).

``edit_region="cord"``: only the latent voxels touching the analysis region (the cord) are
regenerated; everything else is held on the input's latent at every step (RePaint-style), so the
bright CSF around the cord is never redrawn and the cord is denoised consistently with its real
surroundings (measured: oracle Dice 0.21 -> 0.30 with the same model and strengths).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from bids_app.pipelines.windows import slide
from bids_app.schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfig, img2img

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")
REFERENCES = ("reconstruction", "image")
EDIT_REGIONS = ("cord", "all")


@dataclass(frozen=True)
class CounterfactualSettings:
    strengths: tuple[float, ...] = (0.5,)
    n_samples: int = 1
    steps: int = 20
    sampler: str = "ddim"
    eta: float = 0.0
    max_latent_voxels: int | None = None
    seed: int = 0
    reference: str = "reconstruction"
    window_overlap: float = 0.5
    edit_region: str = "cord"

    def __post_init__(self) -> None:
        if self.edit_region not in EDIT_REGIONS:
            raise ValueError(f"edit_region must be one of {EDIT_REGIONS}, got {self.edit_region!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not 0 <= self.window_overlap < 1:
            raise ValueError(f"window_overlap must be in [0, 1), got {self.window_overlap}")
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
    window_index: int = 0,
    editable: np.ndarray | None = None,
) -> list[Counterfactual]:
    """Counterfactuals of one model-sized volume for every strength and sample.

    ``editable`` (image grid, bool): when given, only the latent voxels it touches are regenerated
    (:class:`~bids_app.schedulers.base.KnownRegion`); the rest stays the input's own latent.
    """
    vqgan.eval()
    unet.eval()
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    z0 = encode(vqgan, x, latent_scale)
    latent_editable = None
    if editable is not None:
        mask = torch.from_numpy(np.ascontiguousarray(editable, dtype=np.float32))[None, None].to(device)
        latent_editable = torch.nn.functional.adaptive_max_pool3d(mask, z0.shape[2:])
    reconstruction = None
    if settings.reference == "reconstruction":
        reconstruction = decode(vqgan, z0, latent_scale, settings.max_latent_voxels)[0, 0].float().cpu().numpy()
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        (lambda z, t: unet(z, t, adapter_features)) if adapter_features is not None else (lambda z, t: unet(z, t))
    )
    results = []
    for s_index, strength in enumerate(settings.strengths):
        for k in range(settings.n_samples if strength > 0 else 1):
            generator = torch.Generator(device=device).manual_seed(
                settings.seed * 1_000_003 + window_index * 100_003 + s_index * 1009 + k)
            scheduler = make_scheduler(scheduler_config, settings.sampler, settings.eta)
            latent, start = img2img(model_fn, scheduler, z0, strength, respaced_steps(settings.steps, strength),
                                    generator, latent_editable)
            decoded = decode(vqgan, latent, latent_scale, settings.max_latent_voxels)[0, 0].float().cpu().numpy()
            if reconstruction is not None:
                decoded = np.asarray(image, dtype=np.float32) + (decoded - reconstruction)
            results.append(Counterfactual(strength, k, start, decoded))
            log.debug("counterfactual at strength %.2f (sample %d) from timestep %s", strength, k, start)
    return results


def windowed_counterfactuals(
    vqgan: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler_config: SchedulerConfig,
    latent_scale: float,
    image: np.ndarray,
    settings: CounterfactualSettings,
    window_shape: Sequence[int],
    device: str = "cpu",
    features_for: Callable[[tuple[slice, ...]], Sequence[torch.Tensor] | None] | None = None,
    editable: np.ndarray | None = None,
) -> list[Counterfactual]:
    """:func:`counterfactuals` of a volume at least ``window_shape`` large, by sliding windows.

    Each window gets its own noise draws and (through ``features_for(window)``) its own adapter
    features; the decoded windows are blended (:func:`bids_app.pipelines.windows.slide`).
    """
    meta: list[Counterfactual] = []

    def apply(index: int, window: tuple[slice, ...]) -> list[np.ndarray]:
        features = features_for(window) if features_for is not None else None
        results = counterfactuals(vqgan, unet, scheduler_config, latent_scale, image[window], settings,
                                  device, features, window_index=index,
                                  editable=editable[window] if editable is not None else None)
        if not meta:
            meta.extend(results)
        return [r.image for r in results]

    blended = slide(image.shape, tuple(int(w) for w in window_shape), apply, settings.window_overlap)
    log.debug("%d counterfactual(s) blended from windows of %s over %s", len(blended), tuple(window_shape), image.shape)
    return [Counterfactual(m.strength, m.sample, m.start_timestep, b) for m, b in zip(meta, blended)]
