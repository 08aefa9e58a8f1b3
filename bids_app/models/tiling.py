"""Tiled decoding: split a latent into overlapping tiles, decode each, blend into the full output.

Why: decoding a whole 3D latent at full resolution is what runs out of GPU memory at inference. The seed's
``decoding_diviser`` cut the latent into equal chunks and dropped the remainder slices; here every axis is
split into any number of tiles (counts need not divide the shape), and

* each tile owns a *core* ``[b_i, b_{i+1})`` of a base partition; neighbouring cores are widened into each
  other by ``overlap`` latent voxels and blended there with a cosine ramp ``r`` and ``1 - r``, so the
  separable product of the per-axis weights is a partition of unity (and the sum, separable too, is divided
  out anyway, axis by axis);
* each tile is decoded with at least ``halo`` extra latent voxels of context on every side that is not the
  volume border (all tiles of an axis are decoded with the same extent: border tiles take more context
  inwards), and the context is cropped off the decoded output. With a halo at least the decoder's receptive
  radius and a decoder whose normalisation is per voxel, every kept output voxel is computed from exactly
  the same inputs as in a whole-volume decode: tiled decoding is exact up to float rounding.

Output voxel ``o`` along an axis with upsampling factor ``f`` belongs to latent voxel ``o // f``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Triple = tuple[int, int, int]


class AxisTile(NamedTuple):
    """One tile along one axis; latent ranges are half-open ``(start, stop)``."""

    decode: tuple[int, int]  # latent range fed to the decoder (core + overlap + halo, clipped to the volume)
    keep: tuple[int, int]  # latent range whose decoded output is kept (core + overlap)
    weight: Tensor  # (len(keep) * f,) blending weight of the kept output voxels, float64


class Tile(NamedTuple):
    """A 3D tile: where to read the latent, what to crop from its decoded output, where it goes."""

    latent: tuple[slice, slice, slice]  # slices of the latent's spatial axes to decode
    crop: tuple[slice, slice, slice]  # slices of the tile's decoded output to keep
    output: tuple[slice, slice, slice]  # slices of the full output the kept part lands on
    weights: tuple[Tensor, Tensor, Tensor]  # per-axis 1D weights of the kept part

    def weight(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """The separable 3D weight (X, Y, Z) of the kept part."""
        wx, wy, wz = (w.to(device=device, dtype=dtype) for w in self.weights)
        return wx[:, None, None] * wy[None, :, None] * wz[None, None, :]


def _as_triple(value: int | Sequence[int], name: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    return values  # type: ignore[return-value]


def _ramp(length: int) -> Tensor:
    """Cosine ramp rising from ~0 to ~1 over ``length`` voxels with ``r[t] + r[length - 1 - t] == 1``."""
    t = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return torch.sin(0.5 * math.pi * t) ** 2


def split_axis(n: int, count: int, overlap: int = 2, halo: int = 0, factor: int = 1) -> list[AxisTile]:
    """Split an axis of ``n`` latent voxels into ``count`` tiles (see the module docstring).

    The overlap is shrunk to the shortest core when cores are shorter than it, so that no voxel is ever
    blended between more than two tiles along an axis.
    """
    if n < 1 or factor < 1:
        raise ValueError(f"axis length and factor must be >= 1, got {n}, {factor}")
    if not 1 <= count <= n:
        raise ValueError(f"cannot split an axis of {n} latent voxels into {count} tiles")
    if overlap < 0 or halo < 0:
        raise ValueError(f"overlap and halo must be >= 0, got {overlap}, {halo}")
    bounds = [(i * n) // count for i in range(count + 1)]
    overlap = min(overlap, min(b - a for a, b in zip(bounds, bounds[1:]))) if count > 1 else 0
    lo, hi = overlap // 2, overlap - overlap // 2
    ramp = _ramp(overlap * factor)
    tiles = []
    for i in range(count):
        keep = (bounds[i] - lo if i > 0 else 0, bounds[i + 1] + hi if i < count - 1 else n)
        weight = torch.ones((keep[1] - keep[0]) * factor, dtype=torch.float64)
        if i > 0 and overlap:
            weight[: ramp.numel()] = ramp
        if i < count - 1 and overlap:
            weight[weight.numel() - ramp.numel() :] = 1.0 - ramp
        decode = (max(0, keep[0] - halo), min(n, keep[1] + halo))
        tiles.append(AxisTile(decode, keep, weight))
    return _equal_extents(tiles, n)


def _equal_extents(tiles: list[AxisTile], n: int) -> list[AxisTile]:
    """Widen every tile's decode range to the longest one's (inwards from the border): more context
    never changes a kept voxel, and tiles of one shape let the memory of one tile be reused by the
    next (tiles of many sizes fragment the CPU heap, whose resident size then grows with the number
    of tiles) and the convolutions reuse their kernels."""
    length = max(t.decode[1] - t.decode[0] for t in tiles)
    widened = []
    for t in tiles:
        start = min(t.decode[0], n - length)
        widened.append(AxisTile((start, start + length), t.keep, t.weight))
    return widened


def _tile_extent(n: int, count: int, overlap: int, halo: int) -> int:
    """Largest decode range (latent voxels) of any tile when splitting ``n`` into ``count``."""
    return max(t.decode[1] - t.decode[0] for t in split_axis(n, count, overlap, halo))


def choose_tile_counts(
    latent_shape: Sequence[int], max_latent_voxels: int, overlap: int = 2, halo: int | Sequence[int] = 0
) -> Triple:
    """Fewest-ish tiles per axis such that every tile's decode range has at most ``max_latent_voxels`` voxels.

    Greedy: repeatedly add a tile along the axis whose split shrinks the largest tile most (ties: the
    longest axis). Raises ValueError when even one-voxel cores do not fit the budget (the halo is too big).
    """
    shape = _as_triple(tuple(latent_shape), "latent_shape")
    halos = _as_triple(halo, "halo")
    counts = [1, 1, 1]

    def volume(c: Sequence[int]) -> int:
        return math.prod(_tile_extent(n, k, overlap, h) for n, k, h in zip(shape, c, halos))

    while volume(counts) > max_latent_voxels:
        candidates = []
        for axis in range(3):
            if counts[axis] < shape[axis]:
                trial = list(counts)
                trial[axis] += 1
                candidates.append((volume(trial), -shape[axis] / counts[axis], axis))
        if not candidates:
            raise ValueError(
                f"no tiling of latent {shape} keeps tiles under {max_latent_voxels} latent voxels "
                f"(halo {halos}, overlap {overlap}); raise max_latent_voxels"
            )
        counts[min(candidates)[2]] += 1
    return tuple(counts)  # type: ignore[return-value]


def plan_tiles(
    latent_shape: Sequence[int],
    tiles: Sequence[int] | None = None,
    max_latent_voxels: int | None = None,
    overlap: int = 2,
    halo: int | Sequence[int] = 0,
    factors: Sequence[int] = (1, 1, 1),
) -> list[Tile]:
    """Tiles covering a latent of spatial shape ``latent_shape`` whose decoder upsamples by ``factors``.

    ``tiles`` gives the count per axis; when None it is chosen from ``max_latent_voxels`` (one tile when
    both are None). ``overlap`` is in latent voxels; ``halo`` (per axis or one int) is the cropped context.
    """
    shape = _as_triple(tuple(latent_shape), "latent_shape")
    factor = _as_triple(tuple(factors), "factors")
    halos = _as_triple(halo, "halo")
    if tiles is None:
        counts = choose_tile_counts(shape, max_latent_voxels, overlap, halos) if max_latent_voxels else (1, 1, 1)
    else:
        counts = _as_triple(tuple(tiles), "tiles")
    axes = [split_axis(n, k, overlap, h, f) for n, k, h, f in zip(shape, counts, halos, factor)]
    plan = []
    for tx in axes[0]:
        for ty in axes[1]:
            for tz in axes[2]:
                parts = (tx, ty, tz)
                plan.append(
                    Tile(
                        latent=tuple(slice(*t.decode) for t in parts),
                        crop=tuple(
                            slice((t.keep[0] - t.decode[0]) * f, (t.keep[1] - t.decode[0]) * f)
                            for t, f in zip(parts, factor)
                        ),
                        output=tuple(slice(t.keep[0] * f, t.keep[1] * f) for t, f in zip(parts, factor)),
                        weights=tuple(t.weight for t in parts),
                    )
                )
    logger.debug("tiled decoding of latent %s: %s tiles (%d in all)", shape, counts, len(plan))
    return plan


def decode_with_tiles(
    decode: Callable[[Tensor], Tensor], latent: Tensor, plan: Sequence[Tile], factors: Sequence[int]
) -> Tensor:
    """Decode ``latent`` (B, C, X, Y, Z) tile by tile with ``decode`` and blend the tiles by ``plan``.

    Besides the output itself only one tile's decoded output (and its weight) is alive at a time: the
    blended sum is accumulated in the output, and the sum of the weights is divided out in place, one
    axis at a time, because a plan from :func:`plan_tiles` is a product of per-axis tilings and its
    weight sum is therefore a product of per-axis sums (no full-size weight volume is ever built; one
    in float64, as before, took twice the output's memory and made the peak grow with the volume).
    """
    factor = _as_triple(tuple(factors), "factors")
    out_spatial = tuple(n * f for n, f in zip(latent.shape[2:], factor))
    totals = _axis_weight_sums(plan, out_spatial)
    output: Tensor | None = None
    for tile in plan:
        piece = decode(latent[(slice(None), slice(None), *tile.latent)])
        piece = piece[(slice(None), slice(None), *tile.crop)]
        if output is None:  # accumulate in at least float32 even when the decoder runs in half precision
            dtype = torch.promote_types(piece.dtype, torch.float32)
            output = torch.zeros(*piece.shape[:2], *out_spatial, dtype=dtype, device=piece.device)
        weight = tile.weight(dtype=torch.float64, device=piece.device).to(output.dtype)
        output[(slice(None), slice(None), *tile.output)].addcmul_(piece, weight)
        del piece, weight
    if output is None:
        raise ValueError("empty tile plan")
    for axis, total in enumerate(totals):
        shape = [1] * output.dim()
        shape[2 + axis] = -1
        output.div_(total.to(device=output.device, dtype=output.dtype).view(shape))
    return output


def _axis_weight_sums(plan: Sequence[Tile], out_spatial: Sequence[int]) -> list[Tensor]:
    """Per axis, the sum of the per-axis weights of the plan's distinct tiles along it (float64).

    Raises ValueError when the plan is not the product of its per-axis tilings (the weight sum would
    then not be separable) or when it leaves output voxels uncovered.
    """
    axis_tiles: list[dict[tuple[int, int], Tensor]] = [{}, {}, {}]
    for tile in plan:
        for axis in range(3):
            axis_tiles[axis].setdefault((tile.output[axis].start, tile.output[axis].stop), tile.weights[axis])
    if len(plan) != math.prod(len(tiles) for tiles in axis_tiles) or len({tuple((o.start, o.stop) for o in t.output) for t in plan}) != len(plan):
        raise ValueError("tile plan is not a product of per-axis tilings (use plan_tiles)")
    totals = []
    for axis, tiles in enumerate(axis_tiles):
        total = torch.zeros(out_spatial[axis], dtype=torch.float64)
        for (start, stop), weight in tiles.items():
            total[start:stop] += weight
        if bool((total <= 0).any()):
            raise ValueError("tile plan leaves output voxels uncovered")
        totals.append(total)
    return totals
