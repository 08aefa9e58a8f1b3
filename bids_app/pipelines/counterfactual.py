"""VQ-GAN + latent UNet (+ T2I-Adapter) + DDIM -> pseudo-healthy counterfactual of a model-space volume.

The image is encoded; its cord is cut into small latent patches, each noised on its own to the
strength while everything around it stays clean, and the UNet reads the clean latent off in one
step; the patches' predictions (averaged over shifted grids) are decoded. The model's edit
``D(z) - D(E(x))`` is transferred onto the input, so the autoencoder's own blur cancels out of the
residual; the raw decoding ``D(z)`` is kept too, for the agreement residual
(:func:`bids_app.segmentation.residuals.agreement_residual`).

Every (window, strength, sample, patch set) is a chain of its own with its own seeded generator;
all chains of an image are denoised together, up to ``batch_size`` per UNet forward. The result
equals running the chains one by one up to float rounding (tested).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from bids_app.compute import amp_dtype
from bids_app.pipelines.batching import (
    batched,
    channels_last,
    conditioned_model,
    decode,
    encode,
    full_resolution_width,
    prepare_for_inference,
)
from bids_app.pipelines.windows import slide, windows
from bids_app.schedulers import Chain, DDIMScheduler, SchedulerConfig, denoise_chains, patch_sets, start_chain
from bids_app.settings import ComputeSettings
from bids_app.settings.segmentation import CounterfactualSettings

log = logging.getLogger(__name__)

#: Denoising steps below the strength: one, the clean latent read off the noised one (DDIM's x0).
STEPS = 1


@dataclass(frozen=True)
class Counterfactual:
    """One counterfactual of a volume (model space, normalised intensities)."""

    strength: float
    sample: int
    start_timestep: int | None
    image: np.ndarray  # the input with the model's edit transferred: x + D(z) - D(E(x))
    decoded: np.ndarray  # the raw decoding D(z) (the reconstruction D(E(x)) when no step was taken)


@dataclass(frozen=True)
class Window:
    """One model-sized input: the image, its adapter features, its editable region, its index."""

    image: np.ndarray
    features: Sequence[torch.Tensor] | None = None
    editable: np.ndarray | None = None
    index: int = 0  # seeds the window's noise draws


def chain_seed(seed: int, window_index: int, strength_index: int, sample: int) -> int:
    """The seed of one (window, strength, sample): distinct for each."""
    return seed * 1_000_003 + window_index * 100_003 + strength_index * 1009 + sample


def patch_seed(seed: int, patch_set: int) -> int:
    """The seed of one patch set's chain within a (window, strength, sample) seeded ``seed``."""
    return seed * 131 + patch_set


@dataclass
class _Job:
    """One (window, strength, sample) counterfactual: one chain per patch set."""

    window: int
    strength: float
    sample: int
    z0: torch.Tensor
    chains: list[Chain]
    patches: list[torch.Tensor]

    @property
    def start(self) -> int | None:
        return self.chains[0].start if self.chains else None

    def latent(self) -> torch.Tensor:
        """Each patch's prediction averaged over the grids that noised it; voxels no patch covers
        keep the input's latent."""
        total = torch.zeros_like(self.z0)
        count = torch.zeros_like(self.z0[:, :1])
        for chain, mask in zip(self.chains, self.patches):
            total += chain.sample * mask
            count += mask
        return torch.where(count > 0, total / count.clamp(min=1), self.z0)


class CounterfactualPipeline:
    """The loaded components and how to run them; call it on a model-space volume.

    ``window_shape``: the models' input shape (the plan's); larger volumes are covered by
    overlapping windows. ``compute`` (inference batch size, precision, tiled decoding) changes
    speed and memory, never the result beyond float rounding.
    """

    def __init__(self, vqgan: torch.nn.Module, unet: torch.nn.Module, scheduler_config: SchedulerConfig,
                 latent_scale: float, adapter: torch.nn.Module | None = None, *,
                 window_shape: Sequence[int], device: str = "cpu", compute: ComputeSettings = ComputeSettings()) -> None:
        prepare_for_inference(vqgan, unet, adapter)
        self.vqgan, self.unet, self.adapter = vqgan, unet, adapter
        self.scheduler_config, self.latent_scale = scheduler_config, float(latent_scale)
        self.window_shape = tuple(int(n) for n in window_shape)
        self.device, self.batch_size, self.precision = device, compute.inference_batch_size, compute.precision
        self.max_latent_voxels = compute.max_latent_voxels

    @classmethod
    def from_models(cls, models: Any, device: str, compute: ComputeSettings) -> CounterfactualPipeline:
        """From loaded :class:`~bids_app.model_store.TrainedModels` and the run's ``compute`` settings."""
        return cls(models.vqgan, models.unet, models.scheduler_config, models.latent_scale, models.adapter,
                   window_shape=models.plan.target_shape, device=device, compute=compute)

    def steers(self, control: np.ndarray | None, settings: CounterfactualSettings) -> bool:
        """Whether the adapter steers the denoising of an image with this control mask."""
        return (self.adapter is not None and settings.adapter_scale > 0 and control is not None
                and bool(np.any(control)))

    def __call__(self, image: np.ndarray, settings: CounterfactualSettings, seed: int,
                 editable: np.ndarray | None = None, control: np.ndarray | None = None) -> list[Counterfactual]:
        """Counterfactuals of a volume at least a window large, for every strength and sample.

        ``editable`` (image grid, bool): only the latent voxels it touches are regenerated (None:
        all). ``control``: the adapter's control mask on the image grid. Windows are blended
        (:func:`bids_app.pipelines.windows.slide`).
        """
        shape, overlap = self.window_shape, settings.window_overlap
        steer = self.steers(control, settings)
        inputs = [Window(image[window], self._features(control[window], settings) if steer else None,
                         editable[window] if editable is not None else None, index)
                  for index, window in enumerate(windows(image.shape, shape, overlap))]
        per_window = self.run_windows(inputs, settings, seed)
        images = slide(image.shape, shape, lambda index, _: [r.image for r in per_window[index]], overlap)
        decoded = slide(image.shape, shape, lambda index, _: [r.decoded for r in per_window[index]], overlap)
        log.debug("%d counterfactual(s) blended from %d windows of %s over %s", len(images), len(inputs), shape,
                  image.shape)
        return [Counterfactual(m.strength, m.sample, m.start_timestep, b, raw)
                for m, b, raw in zip(per_window[0], images, decoded)]

    @torch.inference_mode()
    def _features(self, control: np.ndarray, settings: CounterfactualSettings) -> list[torch.Tensor]:
        """The adapter's features of one window (computed once, added at every step)."""
        mask = torch.from_numpy(np.ascontiguousarray(control, dtype=np.float32))[None, None].to(self.device)
        return self.adapter(mask, settings.adapter_scale)

    @torch.inference_mode()
    def run_windows(self, inputs: Sequence[Window], settings: CounterfactualSettings, seed: int) -> list[list[Counterfactual]]:
        """Counterfactuals of model-sized windows, per window for every strength and sample, all
        chains denoised together."""
        images = [torch.from_numpy(np.ascontiguousarray(w.image, dtype=np.float32))[None, None].to(self.device)
                  for w in inputs]
        latents = batched(images, self.batch_size, lambda x: encode(self.vqgan, channels_last(x), self.latent_scale),
                          lambda x: full_resolution_width(self.vqgan, x.shape[2:]))
        jobs = [job for w, (window, z0) in enumerate(zip(inputs, latents))
                for job in self._jobs(w, window, z0, settings, seed)]
        model_fn = conditioned_model(self.unet, amp_dtype(self.device, self.precision))
        denoise_chains(model_fn, [c for job in jobs for c in job.chains], self.batch_size)
        moved = [i for i, job in enumerate(jobs) if job.start is not None]
        # The reconstructions D(E(x)) and the counterfactuals in one batched decode.
        decoded = self._decode([*latents, *(jobs[i].latent() for i in moved)])
        reconstructions = [d[0, 0].float().cpu().numpy() for d in decoded[:len(latents)]]
        decoded_by_job = dict(zip(moved, decoded[len(latents):]))
        results: list[list[Counterfactual]] = [[] for _ in inputs]
        for i, job in enumerate(jobs):
            x = np.asarray(inputs[job.window].image, dtype=np.float32)
            reconstruction = reconstructions[job.window]
            if i in decoded_by_job:
                raw = decoded_by_job[i][0, 0].float().cpu().numpy()
                image = x + (raw - reconstruction)
            else:  # no step taken: the input itself, exactly
                image, raw = x.copy(), reconstruction
            results[job.window].append(Counterfactual(job.strength, job.sample, job.start, image, raw))
            log.debug("counterfactual at strength %.2f (sample %d) from timestep %s", job.strength, job.sample,
                      job.start)
        return results

    def _jobs(self, w: int, window: Window, z0: torch.Tensor, settings: CounterfactualSettings,
              seed: int) -> list[_Job]:
        """One job per (strength, sample) of a window, one chain per patch set of its editable region."""
        if window.editable is not None:
            mask = torch.from_numpy(np.ascontiguousarray(window.editable, dtype=np.float32))[None, None]
            region = torch.nn.functional.adaptive_max_pool3d(mask.to(self.device), z0.shape[2:])[0, 0] > 0
        else:
            region = torch.ones(z0.shape[2:], dtype=torch.bool, device=z0.device)
        patches = [m[None, None] for m in patch_sets(region, settings.patch_size, settings.patch_period,
                                                     settings.patch_offsets)]
        jobs = []
        for s_index, strength in enumerate(settings.strengths):
            for k in range(settings.n_samples if strength > 0 else 1):
                job_seed = chain_seed(seed, window.index, s_index, k)
                chains = [self._chain(z0, strength, patch_seed(job_seed, j), p, window.features)
                          for j, p in enumerate(patches)]
                jobs.append(_Job(w, strength, k, z0, chains, patches))
        return jobs

    def _chain(self, z0: torch.Tensor, strength: float, seed: int, patch: torch.Tensor, features: Any) -> Chain:
        scheduler = DDIMScheduler(self.scheduler_config)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return start_chain(scheduler, z0.contiguous(), scheduler.img2img_timesteps(strength, STEPS), generator,
                           patch, features)

    def _decode(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decode latents in batches; one at a time when tiled decoding bounds the memory."""
        size = 1 if self.max_latent_voxels is not None else self.batch_size
        factors = self.vqgan.config.downsample
        return batched([channels_last(z) for z in latents], size,
                       lambda z: decode(self.vqgan, z, self.latent_scale, self.max_latent_voxels),
                       lambda z: full_resolution_width(self.vqgan, [n * f for n, f in zip(z.shape[2:], factors)]))
