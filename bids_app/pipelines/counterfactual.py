"""VQ-GAN + latent UNet + scheduler -> pseudo-healthy counterfactual of a model-space volume.

Encode, noise the latent to a strength ``s`` (the fraction of the diffusion chain), denoise it back
and decode. ``steps`` is the number of denoising steps actually run: evenly spaced from ``s * T``
down (:func:`strength_timesteps`), so the chain starts exactly at the strength and the cost does
not depend on it. Every draw comes from a generator seeded by (seed,
window, strength index, sample index): deterministic.

``reference="reconstruction"`` (the default) transfers the model's edit onto the input: the
counterfactual is ``x + (D(z_s) - D(E(x)))``, the input changed only where the denoising changed its
decoding. The autoencoder's own reconstruction error (blur, codebook snapping of fine anatomy) then
cancels out of the residual ``x - x_hat = D(E(x)) - D(z_s)`` instead of burying the lesions in it
(measured: oracle Dice 0.10 -> 0.16 with the same model, docs/benchmarks.md). ``reference="image"``
returns the raw decoding, and strength 0 the autoencoder reconstruction (the baseline).
``reference="both"`` returns the transferred counterfactual as ``image`` and the raw decoding as
``decoded``, for the agreement residual (:func:`bids_app.segmentation.residuals.agreement_residual`).

``edit_region="cord"``: only the latent voxels touching the analysis region (the cord) are
regenerated; everything else is held on the input's latent at every step (RePaint-style), so the
bright CSF around the cord is never redrawn and the cord is denoised consistently with its real
surroundings (measured: oracle Dice 0.21 -> 0.30 with the same model and strengths).

``noising="patch"`` (the default): instead of noising the whole editable region at once, the
region is cut into small latent patches; each patch is noised on its own while everything around
it stays clean, and the counterfactual latent is assembled from the patches' predictions
(averaged over ``patch_offsets`` shifted grids). A model trained with patched noising
(:mod:`bids_app.schedulers.patches`) then fills each patch from its real surroundings: measured
mean oracle Dice 0.40 -> 0.50 on phantom lesion images with the demo-budget model, 0.55 with a
fine-tuned one (docs/benchmarks.md, "Patched noising"). Patches
of one lattice class share a chain (they are ``patch_period`` patches apart), so an image costs
``patch_period**3 * patch_offsets`` chains per window and strength, whatever the cord's size.

Fast path (docs/benchmarks.md, "Counterfactual cost"): every (window, strength, sample) is a chain
of its own, and all chains of an image are denoised together (:func:`denoise_chains`): one UNet
forward per step for up to ``batch_size`` chains; each window is encoded once for all its strengths
and samples; encoding and decoding are batched too; everything runs under ``torch.inference_mode``,
channels-last on CPU (:func:`prepare_for_inference`), with autocast on CUDA (``precision``,
:func:`bids_app.compute.amp_dtype`: the training rule). The
result equals running the chains one by one up to float rounding (tested).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bids_app.compute import amp_dtype
from bids_app.pipelines.windows import slide, windows
from bids_app.schedulers import (
    Chain,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerConfig,
    denoise_chains,
    patch_sets,
    start_chain,
)

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")
REFERENCES = ("reconstruction", "image", "both")
EDIT_REGIONS = ("cord", "all")
NOISINGS = ("patch", "region")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    batch_size: int = 16
    precision: str = "auto"
    #: Respace the whole chain to this many steps instead (the seed's procedure: 300, so a strength
    #: s runs 300 s steps); None: ``steps`` below every strength.
    chain_steps: int | None = None
    #: "patch": one latent patch noised at a time, the rest clean; "region": the whole edit region.
    noising: str = "patch"
    patch_size: tuple[int, int, int] = (2, 2, 2)
    patch_period: int = 3
    patch_offsets: int = 2

    def __post_init__(self) -> None:
        if self.noising not in NOISINGS:
            raise ValueError(f"noising must be one of {NOISINGS}, got {self.noising!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1 or self.patch_period < 1 or self.patch_offsets < 1:
            raise ValueError(f"bad patch layout: size {self.patch_size}, period {self.patch_period}, "
                             f"offsets {self.patch_offsets}")
        if self.chain_steps is not None and self.chain_steps < 1:
            raise ValueError(f"chain_steps must be at least 1, got {self.chain_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
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
    #: The raw decoding D(z) (``reference="both"`` only; otherwise None): the residual then needs both.
    decoded: np.ndarray | None = None


def strength_timesteps(num_train_timesteps: int, strength: float, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``strength * T`` down (descending): the chain starts
    exactly at the strength whatever the number of steps.

    diffusers' img2img rule (respace to n steps, run the last ``int(n * strength)``) quantises the
    start to the respaced grid: with one step, strengths 0.5 to 0.99 all started at t = T/2.
    A strength below one training timestep gives no steps (the input comes back unchanged).
    """
    top = int(round(strength * num_train_timesteps)) - 1
    if top < 0 or steps < 1:
        return []
    return sorted({int(round(top * (steps - j) / steps)) for j in range(steps)}, reverse=True)


def make_scheduler(config: SchedulerConfig, sampler: str, eta: float = 0.0):
    return DDIMScheduler(config, eta=eta) if sampler == "ddim" else DDPMScheduler(config)


@torch.inference_mode()
def encode(vqgan: torch.nn.Module, image: torch.Tensor, scale: float) -> torch.Tensor:
    return vqgan.quantize(vqgan.encode(image)).quantized * scale


@torch.inference_mode()
def decode(vqgan: torch.nn.Module, latent: torch.Tensor, scale: float, max_latent_voxels: int | None) -> torch.Tensor:
    """Snap the denoised latent to the codebook, then decode (tiled when a voxel budget is set)."""
    quantized = vqgan.quantize(latent / scale).quantized
    if max_latent_voxels is None:
        return vqgan.decode(quantized)
    return vqgan.decode_tiled(quantized, max_latent_voxels=max_latent_voxels)


def prepare_for_inference(*modules: torch.nn.Module | None) -> None:
    """Evaluation mode, and channels-last 3D weights on CPU (measured 2.4x faster for a batch of
    nine tiny-UNet forwards on 2 cores; on CUDA the layout is left alone, as it is unmeasured)."""
    for module in modules:
        if module is None:
            continue
        module.eval()
        if next(module.parameters()).device.type == "cpu":
            module.to(memory_format=torch.channels_last_3d)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last for 5-D CPU tensors (to match :func:`prepare_for_inference`)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.device.type == "cpu" and x.dim() == 5 else x


#: torch's CPU convolution takes oneDNN for a batch of one only when N*C*D*H exceeds this (any
#: 3x3x3 kernel; the last axis is not counted); below it, the reference ``slow_conv3d``.
SLOW_CONV_LIMIT = 20480


def avoid_single_batch(fn: Callable[..., torch.Tensor], x: torch.Tensor, *rest: Any, width: int) -> torch.Tensor:
    """``fn(x, *rest)``; a single CPU volume whose main layers would take torch's slow path runs as
    two copies (the first kept).

    ``width`` is C*D*H of the model's full-resolution layers for one sample (where its cost is).
    Measured on 2 cores: a 16x64x64 one-window counterfactual with the tiny models took 1.5 s alone,
    96% of it in ``slow_conv3d``, and 0.18 s as pairs; the default VQ-GAN (64 channels at full
    resolution) is past the limit and would only pay twice. Per-sample tensors in ``rest``
    (timesteps, lists of adapter features) are doubled alike.
    """
    if x.device.type != "cpu" or x.shape[0] != 1 or width > SLOW_CONV_LIMIT:
        return fn(x, *rest)
    twice = [torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1 else a for a in rest]
    twice = [[torch.cat([f, f]) for f in a] if isinstance(a, list) else a for a in twice]
    return fn(torch.cat([x, x]), *twice)[:1]


def _batched(tensors: Sequence[torch.Tensor], size: int, fn: Callable[[torch.Tensor], torch.Tensor],
             width: Callable[[torch.Tensor], int]) -> list[torch.Tensor]:
    """``fn`` over the tensors (batch 1 each) in concatenated batches of at most ``size``; split back.
    ``width(x)``: see :func:`avoid_single_batch`."""
    results: list[torch.Tensor] = []
    for first in range(0, len(tensors), size):
        group = torch.cat(list(tensors[first:first + size]))
        results.extend(avoid_single_batch(fn, group, width=width(group)).split(1))
    return results


def _full_resolution_width(vqgan: torch.nn.Module, image_shape: Sequence[int]) -> int:
    return int(vqgan.config.n_hiddens * image_shape[0] * image_shape[1])


def _conditioned_model(unet: torch.nn.Module, dtype: torch.dtype | None) -> Callable:
    """The batched model function of :func:`denoise_chains`: conditions are per-chain adapter
    features (a list per encoder level, or None), concatenated along the batch."""
    def model_fn(z: torch.Tensor, t: torch.Tensor, conditions: Sequence[Any]) -> torch.Tensor:
        features = None
        if any(c is not None for c in conditions):
            template = next(c for c in conditions if c is not None)
            # A chain without features adds zeros: exactly "no adapter" (the UNet adds them).
            filled = [c if c is not None else [torch.zeros_like(f) for f in template] for c in conditions]
            features = [_layout(torch.cat([c[level] for c in filled])) for level in range(len(template))]
        with torch.autocast(z.device.type, dtype=dtype, enabled=dtype is not None):
            width = int(unet.config.base_channels * z.shape[2] * z.shape[3])
            output = (avoid_single_batch(unet, _layout(z), t, features, width=width) if features is not None
                      else avoid_single_batch(unet, _layout(z), t, width=width))
        return output.float()
    return model_fn


@dataclass(frozen=True)
class Window:
    """One model-sized input of a batch: the image, its adapter features and editable region."""

    image: np.ndarray
    features: Sequence[torch.Tensor] | None = None
    editable: np.ndarray | None = None
    index: int = 0  # seeds the window's noise draws


def chain_seed(seed: int, window_index: int, strength_index: int, sample: int) -> int:
    """The seed of one chain's generator: distinct for every (window, strength, sample)."""
    return seed * 1_000_003 + window_index * 100_003 + strength_index * 1009 + sample


def patch_seed(seed: int, patch_set: int) -> int:
    """The seed of one patch set's chain within a (window, strength, sample) seeded ``seed``."""
    return seed * 131 + patch_set


def _patches(editable: torch.Tensor | None, z0: torch.Tensor, settings: CounterfactualSettings) -> list[torch.Tensor] | None:
    """The patch masks (1, 1, D, H, W) of one window, or None for whole-region noising. Without an
    editable region every latent voxel is patched."""
    if settings.noising != "patch":
        return None
    region = editable[0, 0] > 0 if editable is not None else torch.ones(z0.shape[2:], dtype=torch.bool, device=z0.device)
    return [m[None, None] for m in patch_sets(region, settings.patch_size, settings.patch_period,
                                              settings.patch_offsets)]


@dataclass
class _Job:
    """One (window, strength, sample) counterfactual: a single chain, or one chain per patch set."""

    window: int
    strength: float
    sample: int
    z0: torch.Tensor
    chains: list[Chain]
    patches: list[torch.Tensor] | None = None

    @property
    def start(self) -> int | None:
        return self.chains[0].start if self.chains else None

    def latent(self) -> torch.Tensor:
        """The denoised latent: the chain's sample, or each patch's prediction averaged over the
        grids that noised it (voxels no patch covers keep the input's latent)."""
        if self.patches is None:
            return self.chains[0].sample
        total = torch.zeros_like(self.z0)
        count = torch.zeros_like(self.z0[:, :1])
        for chain, mask in zip(self.chains, self.patches):
            total += chain.sample * mask
            count += mask
        return torch.where(count > 0, total / count.clamp(min=1), self.z0)


@torch.inference_mode()
def batch_counterfactuals(
    vqgan: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler_config: SchedulerConfig,
    latent_scale: float,
    inputs: Sequence[Window],
    settings: CounterfactualSettings,
    device: str = "cpu",
) -> list[list[Counterfactual]]:
    """Counterfactuals of model-sized volumes, per input for every strength and sample, all chains
    denoised together (see the module docstring).

    An input's ``editable`` (image grid, bool), when given, restricts regeneration to the latent
    voxels it touches (:class:`~bids_app.schedulers.KnownRegion`); the rest stays the input's own latent.
    """
    size = settings.batch_size
    images = [torch.from_numpy(np.ascontiguousarray(w.image, dtype=np.float32))[None, None].to(device) for w in inputs]
    latents = _batched(images, size, lambda x: encode(vqgan, _layout(x), latent_scale),
                       lambda x: _full_resolution_width(vqgan, x.shape[2:]))
    jobs: list[_Job] = []
    for w, (window, z0) in enumerate(zip(inputs, latents)):
        editable = None
        if window.editable is not None:
            mask = torch.from_numpy(np.ascontiguousarray(window.editable, dtype=np.float32))[None, None].to(device)
            editable = torch.nn.functional.adaptive_max_pool3d(mask, z0.shape[2:])
        patches = _patches(editable, z0, settings)
        for s_index, strength in enumerate(settings.strengths):
            for k in range(settings.n_samples if strength > 0 else 1):
                seed = chain_seed(settings.seed, window.index, s_index, k)
                # The seed's rule (a fixed respaced chain, its last int(n s) steps) or exactly `steps` from s.
                n_steps = settings.chain_steps or 1
                timesteps = (None if settings.chain_steps else
                             strength_timesteps(scheduler_config.num_train_timesteps, strength, settings.steps))

                def chain(seed: int, region: torch.Tensor | None, clean: bool) -> Chain:
                    generator = torch.Generator(device=device).manual_seed(seed)
                    scheduler = make_scheduler(scheduler_config, settings.sampler, settings.eta)
                    return start_chain(scheduler, z0.contiguous(), strength, n_steps, generator, region,
                                       window.features, clean, timesteps)

                if patches is None:
                    jobs.append(_Job(w, strength, k, z0, [chain(seed, editable, False)]))
                else:
                    jobs.append(_Job(w, strength, k, z0, [chain(patch_seed(seed, j), p, True)
                                                          for j, p in enumerate(patches)], patches))
    model_fn = _conditioned_model(unet, amp_dtype(device, settings.precision))
    denoise_chains(model_fn, [c for job in jobs for c in job.chains], size)
    moved = [i for i, job in enumerate(jobs) if job.start is not None]
    # The references D(E(x)) and the counterfactuals in one batched decode.
    references = latents if settings.reference in ("reconstruction", "both") else []
    keep_decoded = settings.reference == "both"
    decoded = _decode_all(vqgan, [*references, *(jobs[i].latent() for i in moved)], latent_scale, settings)
    reconstructions: list[np.ndarray | None] = [d[0, 0].float().cpu().numpy() for d in decoded[:len(references)]]
    reconstructions += [None] * (len(inputs) - len(reconstructions))
    decoded_by_job = dict(zip(moved, decoded[len(references):]))
    results: list[list[Counterfactual]] = [[] for _ in inputs]
    for i, job in enumerate(jobs):
        w, strength, k = job.window, job.strength, job.sample
        reconstruction = reconstructions[w]
        raw = None
        if i in decoded_by_job:
            image = raw = decoded_by_job[i][0, 0].float().cpu().numpy()
            if reconstruction is not None:
                image = np.asarray(inputs[w].image, dtype=np.float32) + (raw - reconstruction)
        elif reconstruction is not None:  # no step taken: the input itself, exactly
            image, raw = np.asarray(inputs[w].image, dtype=np.float32).copy(), reconstruction
        else:
            image = _decode_all(vqgan, [job.latent()], latent_scale, settings)[0][0, 0].float().cpu().numpy()
        results[w].append(Counterfactual(strength, k, job.start, image, raw if keep_decoded else None))
        log.debug("counterfactual at strength %.2f (sample %d) from timestep %s", strength, k, job.start)
    return results


def _decode_all(vqgan: torch.nn.Module, latents: Sequence[torch.Tensor], scale: float,
                settings: CounterfactualSettings) -> list[torch.Tensor]:
    """Decode latents in batches; one at a time when tiled decoding bounds the memory."""
    size = 1 if settings.max_latent_voxels is not None else settings.batch_size
    factors = vqgan.config.downsample
    return _batched([_layout(z) for z in latents], size, lambda z: decode(vqgan, z, scale, settings.max_latent_voxels),
                    lambda z: _full_resolution_width(vqgan, [n * f for n, f in zip(z.shape[2:], factors)]))


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
    """Counterfactuals of one model-sized volume for every strength and sample."""
    window = Window(image, adapter_features, editable, window_index)
    return batch_counterfactuals(vqgan, unet, scheduler_config, latent_scale, [window], settings, device)[0]


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
    """Counterfactuals of a volume at least ``window_shape`` large, by sliding windows.

    Each window gets its own noise draws and (through ``features_for(window)``) its own adapter
    features; all windows are denoised together, and the decoded windows are blended
    (:func:`bids_app.pipelines.windows.slide`).
    """
    shape = tuple(int(w) for w in window_shape)
    slices = list(windows(image.shape, shape, settings.window_overlap))
    inputs = [Window(image[window], features_for(window) if features_for is not None else None,
                     editable[window] if editable is not None else None, index)
              for index, window in enumerate(slices)]
    per_window = batch_counterfactuals(vqgan, unet, scheduler_config, latent_scale, inputs, settings, device)
    blended = slide(image.shape, shape, lambda index, _: [r.image for r in per_window[index]], settings.window_overlap)
    decoded: list[np.ndarray | None] = [None] * len(blended)
    if settings.reference == "both":
        decoded = slide(image.shape, shape, lambda index, _: [r.decoded for r in per_window[index]],
                        settings.window_overlap)
    log.debug("%d counterfactual(s) blended from %d windows of %s over %s", len(blended), len(slices), shape, image.shape)
    return [Counterfactual(m.strength, m.sample, m.start_timestep, b, raw)
            for m, b, raw in zip(per_window[0], blended, decoded)]
