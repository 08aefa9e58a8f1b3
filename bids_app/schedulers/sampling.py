"""The sampling loops: a reverse chain, and many img2img chains denoised together.

Counterfactuals at several strengths, noise samples and sliding windows are independent chains of
one model. Run one after another, every reverse step is a batch-1 forward, which on CPU also falls
off the fast convolution path (torch picks ``slow_conv3d`` for a batch of one).
:func:`denoise_chains` stacks the running chains into batches of at most ``max_batch``, calls the
model once per batch and lets each chain's own scheduler step with its own generator, so every
chain draws exactly the noise it would draw alone and the result equals separate runs up to the
rounding of batched kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from bids_app.schedulers.base import ModelFn, Scheduler, draw_noise

__all__ = ["KnownRegion", "Chain", "BatchedModelFn", "start_chain", "denoise_chains", "denoise"]

BatchedModelFn = Callable[[Tensor, Tensor, Sequence[Any]], Tensor]
"""``model_fn(samples, t, conditions) -> outputs``: one condition per chain in the batch, in order."""


@dataclass(frozen=True)
class KnownRegion:
    """Where the sample must stay the original (``editable`` 0).

    At the start and after every reverse step the voxels outside ``editable`` are reset to the
    clean original ``x0``, so only the editable patch is regenerated and the model sees its true,
    clean surroundings, as it was trained to (:mod:`bids_app.schedulers.patches`).
    """

    x0: Tensor
    editable: Tensor  # float, broadcastable to x0, 1 = regenerate

    def apply(self, sample: Tensor) -> Tensor:
        return self.editable * sample + (1 - self.editable) * self.x0


@dataclass
class Chain:
    """One reverse chain in progress: its own scheduler (respaced for it), timesteps, generator.

    ``condition`` is handed to the model function untouched (e.g. the adapter features of the
    chain's window); ``start`` is the timestep the chain was noised to (None: nothing to do).
    """

    scheduler: Scheduler
    timesteps: Tensor  # descending, on the sample's device
    sample: Tensor
    generator: torch.Generator | None = None
    known: KnownRegion | None = None
    condition: Any = None
    start: int | None = None
    position: int = 0

    @property
    def done(self) -> bool:
        return self.position >= len(self.timesteps)

    @property
    def timestep(self) -> Tensor:
        return self.timesteps[self.position]

    def advance(self, model_output: Tensor) -> None:
        """Take the reverse step at the current timestep with the model's output for this chain."""
        t = self.timestep
        sample = self.scheduler.step(model_output, t, self.sample, self.generator).prev_sample
        self.position += 1
        if self.known is not None:
            sample = self.known.apply(sample)
        self.sample = sample


def start_chain(scheduler: Scheduler, x0: Tensor, timesteps: Sequence[int],
                generator: torch.Generator | None = None, editable: Tensor | None = None,
                condition: Any = None) -> Chain:
    """Noise x0 to the first of ``timesteps`` (descending; :meth:`Scheduler.img2img_timesteps`): a
    chain ready for :func:`denoise_chains` that runs exactly those steps.

    The scheduler is set to these timesteps, so each chain needs a scheduler of its own. The noise
    is drawn with the generator. No timesteps give a finished chain holding x0 itself.
    ``editable`` (1 = may change) keeps the rest on the clean original (:class:`KnownRegion`).
    """
    if not len(timesteps):
        return Chain(scheduler, torch.zeros(0, dtype=torch.long, device=x0.device), x0, generator, None, condition)
    scheduler.set_timesteps_from(timesteps)
    steps = scheduler.timesteps.to(x0.device)
    noise = draw_noise(x0, generator)
    t = steps[0].expand(x0.shape[0])
    noisy = scheduler.add_noise(x0, noise, t)
    known = KnownRegion(x0, editable.to(x0.dtype)) if editable is not None else None
    if known is not None:
        noisy = known.apply(noisy)
    return Chain(scheduler, steps, noisy, generator, known, condition, int(steps[0]))


def denoise_chains(model_fn: BatchedModelFn, chains: Sequence[Chain], max_batch: int | None = None) -> list[Tensor]:
    """Run every chain to its end, one model call per step for up to ``max_batch`` running chains.

    Chains may differ in length and timesteps (each batch element gets its own t); a chain that
    has finished leaves the batch. Returns the final samples, in the order of ``chains``.
    """
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    while True:
        running = [chain for chain in chains if not chain.done]
        if not running:
            return [chain.sample for chain in chains]
        size = max_batch or len(running)
        for first in range(0, len(running), size):
            group = running[first:first + size]
            sizes = [chain.sample.shape[0] for chain in group]
            samples = torch.cat([chain.sample for chain in group]) if len(group) > 1 else group[0].sample
            t = torch.cat([chain.timestep.expand(n) for chain, n in zip(group, sizes)])
            outputs = model_fn(samples, t, [chain.condition for chain in group])
            for chain, output in zip(group, outputs.split(sizes)):
                chain.advance(output)


def denoise(model_fn: ModelFn, scheduler: Scheduler, sample: Tensor, timesteps: Tensor,
            generator: torch.Generator | None = None, known: KnownRegion | None = None) -> Tensor:
    """Run the reverse chain over ``timesteps`` (descending); no timesteps returns sample as is.

    The timesteps are moved to the sample's device once, so the loop never syncs with the host.
    """
    chain = Chain(scheduler, timesteps.to(sample.device), sample, generator, known)
    return denoise_chains(lambda x, t, _: model_fn(x, t), [chain])[0]
