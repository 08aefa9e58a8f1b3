"""Patched noising: one latent patch is noised while its surroundings stay clean.

Why: regenerating the whole cord from a noised latent redraws healthy anatomy the model can only
guess (the grey-matter shape, the local intensity), and those guesses differ from the input as
much as a faint lesion does. Noising one small patch at a time and showing the model the clean
rest lets the real surroundings decide what healthy tissue belongs there, so mostly what does not
fit them (a lesion) changes. The UNet learns this at training time: a fraction of its training
samples are noised only inside a random box (``training.diffusion.patch_fraction``), with the loss
on that box (patched diffusion, as in Behrendt et al. 2023, "Patched diffusion models for
unsupervised anomaly detection in brain MRI"; docs/benchmarks.md, "Patched noising").

Pure tensor functions: no weights, no schedules.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["patch_sets", "random_patches"]


def _box_classes(n: int, size: int, shift: int, period: int, device: torch.device) -> Tensor:
    """The lattice class (0..period-1) of the box each of ``n`` positions falls in."""
    return ((torch.arange(n, device=device) + shift) // size) % period


def patch_sets(editable: Tensor, size: Sequence[int], period: int, offsets: int) -> list[Tensor]:
    """Float masks (shape of ``editable``, 1 = noised) that cover every editable latent voxel once
    per grid offset.

    The latent grid is cut into boxes of ``size``; one mask holds the boxes of one lattice class
    (box indices equal modulo ``period`` on every axis), so each noised box is surrounded by
    ``period - 1`` clean boxes on every side. ``offsets`` grids, each shifted by ``size / offsets``,
    put every voxel once near the middle of a box. Empty masks are left out.
    """
    if editable.dim() != 3:
        raise ValueError(f"editable must be a 3-D latent mask, got shape {tuple(editable.shape)}")
    if len(size) != 3 or any(int(s) < 1 for s in size) or period < 1 or offsets < 1:
        raise ValueError(f"bad patch layout: size {tuple(size)}, period {period}, offsets {offsets}")
    region = editable.bool()
    masks: list[Tensor] = []
    for offset in range(offsets):
        classes = [_box_classes(n, int(s), offset * int(s) // offsets, period, region.device)
                   for n, s in zip(region.shape, size)]
        for a in range(period):
            for b in range(period):
                for c in range(period):
                    box = ((classes[0] == a)[:, None, None] & (classes[1] == b)[None, :, None]
                           & (classes[2] == c)[None, None, :])
                    mask = box & region
                    if mask.any():
                        masks.append(mask.float())
    return masks


def random_patches(regions: Tensor, draws: Tensor, max_size: Sequence[int]) -> Tensor:
    """One random box per sample, centred on a voxel of its region: float masks (B, 1, D, H, W).

    ``regions`` (B, 1, D, H, W) bool: where a box may be centred (the cord); a sample with an empty
    region gets its centre anywhere. ``draws`` (B, 4), uniform in [0, 1): the centre (which region
    voxel) and the three extents (1..max_size). The draws come from the caller's generator, so
    distributed ranks that draw for the whole batch and keep their rows stay in step.
    """
    if regions.dim() != 5 or draws.shape != (regions.shape[0], 4):
        raise ValueError(f"regions (B, 1, D, H, W) and draws (B, 4) expected, got {tuple(regions.shape)}, "
                         f"{tuple(draws.shape)}")
    shape = regions.shape[2:]
    masks = torch.zeros(regions.shape, dtype=torch.float32, device=regions.device)
    for i in range(regions.shape[0]):
        candidates = torch.nonzero(regions[i, 0])
        if len(candidates) == 0:
            candidates = torch.nonzero(torch.ones(shape, dtype=torch.bool, device=regions.device))
        centre = candidates[min(int(draws[i, 0] * len(candidates)), len(candidates) - 1)]
        extents = [1 + min(int(draws[i, 1 + a] * int(m)), int(m) - 1) for a, m in enumerate(max_size)]
        lo = [max(int(c) - e // 2, 0) for c, e in zip(centre, extents)]
        masks[i, 0, lo[0]:lo[0] + extents[0], lo[1]:lo[1] + extents[1], lo[2]:lo[2] + extents[2]] = 1.0
    return masks
