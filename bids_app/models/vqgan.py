"""3D VQ-GAN autoencoder: convolutional encoder, EMA vector quantiser, convolutional decoder (weights only).

The adversarial part lives in :mod:`bids_app.models.discriminators`; losses and the loop in
``bids_app.training``. Data is expected in [-1, 1]; the decoder output is *linear* (no tanh): a tanh
saturates exactly where lesions are brightest and flattens the gradient there, and the residual maps
downstream want an unsquashed reconstruction. Callers clamp to [-1, 1] if they need to.

Architecture (widths double per downsampling stage: ``n_hiddens * 2**stage``)::

    encoder: conv3 -> [res blocks, strided conv3]*stages -> res blocks -> norm, SiLU, conv3 -> embedding_dim
    decoder: conv3 -> res blocks -> [nearest upsample, conv3, res blocks]*stages -> norm, SiLU, conv3 -> in_ch

A stage strides (or upsamples) by 2 only on the axes that still need it, so ``downsample=(2, 2, 4)`` gives
two stages, the first halving all axes and the second only the last one.

Normalisation: the encoder uses GroupNorm. The decoder uses, by default (``decoder_norm="voxel"``), a
per-voxel LayerNorm over channels. GroupNorm statistics span the whole volume, so a tile decoded alone sees
different statistics than the whole volume and tiled decoding can only approximate whole-volume decoding;
with a per-voxel norm the decoder is a local operator of known receptive radius and
:meth:`VQGAN.decode_tiled` with a halo of that radius is exact up to float rounding. ``decoder_norm="group"``
is available for seed-like models and is tiled approximately (the overlap blending hides seams).

Activation checkpointing (:meth:`VQGAN.set_activation_checkpointing`, on in training by default): in a
training forward every residual block, upsampling and output head keeps only its input for the
backward and recomputes its inside there (only as far as the backward needs: 13% more FLOPs). At full
resolution the saved activations are what a training step's memory is: a 32x128x128 step of the default
model with discriminators peaks at 2.4 GB with it against 7.8 GB without it and the old voxel norm
(docs/benchmarks.md). A run-time switch, not architecture: it changes no weight or result.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bids_app.models.quantizer import QuantizerOutput, VectorQuantizer
from bids_app.models.tiling import decode_with_tiles, plan_tiles

logger = logging.getLogger(__name__)

DECODER_NORMS = ("voxel", "group")


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture and codebook hyperparameters, saved as JSON next to the weights."""

    in_channels: int = 1
    n_hiddens: int = 16
    downsample: tuple[int, int, int] = (4, 4, 4)
    embedding_dim: int = 8
    n_codes: int = 512
    n_res_blocks: int = 1
    norm_groups: int = 8
    decoder_norm: str = "voxel"
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0
    search_chunk_voxels: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "downsample", tuple(int(f) for f in self.downsample))
        if len(self.downsample) != 3 or any(f < 1 or f & (f - 1) for f in self.downsample):
            raise ValueError(f"downsample must be 3 powers of 2, got {self.downsample}")
        for name in ("in_channels", "n_hiddens", "embedding_dim", "n_codes", "norm_groups", "search_chunk_voxels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_res_blocks < 0:
            raise ValueError(f"n_res_blocks must be >= 0, got {self.n_res_blocks}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}")

    @property
    def n_stages(self) -> int:
        return max(int(math.log2(f)) for f in self.downsample)

    def stage_strides(self) -> list[tuple[int, int, int]]:
        """Per-stage stride per axis, finest stage first: 2 while an axis still needs downsampling."""
        logs = [int(math.log2(f)) for f in self.downsample]
        return [tuple(2 if stage < n else 1 for n in logs) for stage in range(self.n_stages)]  # type: ignore[misc]

    def widths(self) -> list[int]:
        """Channel width at each resolution, full resolution first."""
        return [self.n_hiddens * 2**stage for stage in range(self.n_stages + 1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        values = dataclasses.asdict(self)
        values["downsample"] = list(self.downsample)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VQGANConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not silently use a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**dict(values))


def tiny_config() -> VQGANConfig:
    """CPU preset for tests and demos: widths 8/16/32, 4x4x4 downsampling, 4-d latent, 64 codes."""
    return VQGANConfig(n_hiddens=8, downsample=(4, 4, 4), embedding_dim=4, n_codes=64, norm_groups=4)


def default_config() -> VQGANConfig:
    """GPU preset close to the seed's 3D VQ-GAN: widths 64/128/256, 4x4x4 downsampling (a 32x128x128
    volume becomes an 8x32x32x8 latent for the diffusion model), 8-d latent, 2048 EMA codes, 2 res blocks."""
    return VQGANConfig(n_hiddens=64, downsample=(4, 4, 4), embedding_dim=8, n_codes=2048, n_res_blocks=2)


PRESETS = {"tiny": tiny_config, "default": default_config}


def group_count(channels: int, groups: int) -> int:
    """Largest group count <= ``groups`` (and <= channels) that divides ``channels``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


def _voxel_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x - mean) / std over the channel axis (float32 at least), the mean and 1 / std."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = h.mean(dim=1, keepdim=True)
    centred = h - mean
    rstd = torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)
    return centred.mul_(rstd), mean, rstd


class _VoxelNormFunction(torch.autograd.Function):
    """Voxel norm keeping only its input and the per-voxel mean and 1 / std for the backward.

    Autograd through the plain formula keeps two more full-size tensors per norm (the centred and the
    normalised input); at full resolution they are a large part of a training step's memory. The
    normalised input is recomputed in the backward from the saved statistics instead.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        normalised, mean, rstd = _voxel_statistics(x, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return normalised.mul_(weight.view(shape)).add_(bias.view(shape)).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        grad = grad.to(mean.dtype)
        normalised = (x.to(mean.dtype) - mean).mul_(rstd)
        dims = [0, *range(2, x.dim())]
        grad_weight = (grad * normalised).sum(dim=dims) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=dims) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad * weight.view((1, -1) + (1,) * (x.dim() - 2))
            # d/dx of (x - mean) * rstd: rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
            projection = (g * normalised).mean(dim=1, keepdim=True)
            grad_x = g.sub_(g.mean(dim=1, keepdim=True)).sub_(normalised.mul_(projection)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None


class VoxelNorm(nn.Module):
    """LayerNorm over the channels of each voxel: like GroupNorm(1) without spatial statistics, hence local."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _VoxelNormFunction.apply(x, self.weight, self.bias, self.eps)
        normalised, _, _ = _voxel_statistics(x, self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return normalised.mul_(self.weight.view(shape)).add_(self.bias.view(shape)).to(x.dtype)


def make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """``"group"``: GroupNorm with :func:`group_count` groups; ``"voxel"``: :class:`VoxelNorm`."""
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels, eps=1e-6)
    if kind == "voxel":
        return VoxelNorm(channels)
    raise ValueError(f"unknown norm {kind!r}")


class ResBlock3D(nn.Module):
    """Pre-activation residual block: (norm, SiLU, conv3) x 2, 1x1x1 skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, groups: int) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(norm, out_channels, groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample3D(nn.Module):
    """Nearest upsampling by a per-axis factor, then conv3 (no checkerboard, unlike transposed conv)."""

    def __init__(self, in_channels: int, out_channels: int, factor: tuple[int, int, int]) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.factor != (1, 1, 1):
            x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return self.conv(x)


class _Checkpointed(nn.Module):
    """Base of the encoder and decoder: ``_run`` applies a layer, recomputing it in the backward
    (keeping only its input) when ``checkpointing`` is on and a gradient is being recorded."""

    checkpointing = False

    def _run(self, layer: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled() and h.requires_grad:
            return checkpoint(layer, h, use_reentrant=False)
        return layer(h)

    def _run_stage(self, stage: nn.Sequential, h: Tensor) -> Tensor:
        """A stage layer by layer: residual blocks and upsamplings checkpointed, strided convs not
        (a strided conv keeps its input either way, which is the previous block's output)."""
        for layer in stage:
            h = self._run(layer, h) if isinstance(layer, (ResBlock3D, Upsample3D)) else layer(h)
        return h


class Encoder3D(_Checkpointed):
    """Volume (B, C, X, Y, Z) -> continuous latent (B, embedding_dim, X/fx, Y/fy, Z/fz)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths, groups, n_res = config.widths(), config.norm_groups, config.n_res_blocks
        self.conv_in = nn.Conv3d(config.in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for stage, stride in enumerate(config.stage_strides()):
            blocks = [ResBlock3D(widths[stage], widths[stage], "group", groups) for _ in range(n_res)]
            blocks.append(nn.Conv3d(widths[stage], widths[stage + 1], 3, stride=stride, padding=1))
            self.stages.append(nn.Sequential(*blocks))
        self.mid = nn.Sequential(*[ResBlock3D(widths[-1], widths[-1], "group", groups) for _ in range(n_res)])
        self.norm_out = make_norm("group", widths[-1], groups)
        self.conv_out = nn.Conv3d(widths[-1], config.embedding_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            h = self._run_stage(stage, h)
        return self._run(self._head, self._run_stage(self.mid, h))

    def _head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder3D(_Checkpointed):
    """Latent (B, embedding_dim, x, y, z) -> volume (B, C, x*fx, y*fy, z*fz), linear output."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths, groups, n_res, norm = config.widths(), config.norm_groups, config.n_res_blocks, config.decoder_norm
        self.n_res_blocks = n_res
        self.strides = config.stage_strides()
        self.conv_in = nn.Conv3d(config.embedding_dim, widths[-1], 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock3D(widths[-1], widths[-1], norm, groups) for _ in range(n_res)])
        self.stages = nn.ModuleList()
        for stage in reversed(range(config.n_stages)):
            blocks: list[nn.Module] = [Upsample3D(widths[stage + 1], widths[stage], self.strides[stage])]
            blocks += [ResBlock3D(widths[stage], widths[stage], norm, groups) for _ in range(n_res)]
            self.stages.append(nn.Sequential(*blocks))
        self.norm_out = make_norm(norm, widths[0], groups)
        self.conv_out = nn.Conv3d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self._run_stage(self.mid, self.conv_in(z))
        for stage in self.stages:
            h = self._run_stage(stage, h)
        return self._run(self._head, h)

    def _head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def receptive_radius(self) -> tuple[int, int, int]:
        """Per axis, how many latent voxels either side of its own latent voxel an output voxel depends on.

        Walks the decoder backwards: every conv3 adds 1 voxel at its resolution; going through a nearest
        upsampling by ``u`` turns a radius ``a`` into ``ceil(a / u)``. Exact only for the local (voxel) norm.
        """
        radius = []
        for axis in range(3):
            a = 1  # conv_out
            for stride in self.strides:  # finest stage first, as the walk goes backwards
                a = math.ceil((a + 2 * self.n_res_blocks + 1) / stride[axis])
            radius.append(a + 2 * self.n_res_blocks + 1)  # mid blocks + conv_in
        return tuple(radius)  # type: ignore[return-value]


class VQGANOutput(NamedTuple):
    """Everything a VQ-GAN training step needs from one forward pass."""

    reconstruction: Tensor  # (B, C, X, Y, Z), linear decoder output
    quantized: Tensor  # (B, D, x, y, z), straight-through quantised latent
    codes: Tensor  # (B, x, y, z) long
    commitment_loss: Tensor
    perplexity: Tensor
    dead_codes: Tensor


class VQGAN(nn.Module):
    """Encoder + EMA vector quantiser + decoder. Inputs must be divisible by ``config.downsample``."""

    def __init__(self, config: VQGANConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VQGANConfig()
        self.encoder = Encoder3D(self.config)
        self.quantizer = VectorQuantizer(
            n_codes=self.config.n_codes,
            embedding_dim=self.config.embedding_dim,
            commitment_weight=self.config.commitment_weight,
            ema_decay=self.config.ema_decay,
            dead_code_threshold=self.config.dead_code_threshold,
            search_chunk_voxels=self.config.search_chunk_voxels,
        )
        self.decoder = Decoder3D(self.config)

    def set_activation_checkpointing(self, enabled: bool = True) -> "VQGAN":
        """Recompute the encoder's and decoder's blocks in the backward instead of keeping their
        activations (see the module docstring); affects only forwards that record gradients."""
        self.encoder.checkpointing = self.decoder.checkpointing = bool(enabled)
        return self

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Latent spatial shape for an input spatial shape; ValueError when it does not divide."""
        spatial = tuple(int(s) for s in spatial_shape)
        factors = self.config.downsample
        if len(spatial) != 3 or any(s < f or s % f for s, f in zip(spatial, factors)):
            multiples = tuple(math.ceil(s / f) * f for s, f in zip(spatial, factors)) if len(spatial) == 3 else ()
            raise ValueError(
                f"input spatial shape {spatial} is not divisible by the downsampling factors {factors}; "
                f"pad or crop it to multiples of them (e.g. {multiples})"
            )
        return tuple(s // f for s, f in zip(spatial, factors))  # type: ignore[return-value]

    def encode(self, x: Tensor) -> Tensor:
        """Continuous (pre-quantisation) latent (B, embedding_dim, X/fx, Y/fy, Z/fz)."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected (B, {self.config.in_channels}, X, Y, Z) input, got {tuple(x.shape)}")
        self.latent_shape(x.shape[2:])
        return self.encoder(x)

    def quantize(self, z: Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        """Quantise a continuous latent; updates the codebook in training mode (see VectorQuantizer)."""
        return self.quantizer(z, generator)

    def decode(self, zq: Tensor) -> Tensor:
        """Decode a (quantised) latent to a volume of the input's shape; linear output, data range [-1, 1]."""
        self._check_latent(zq)
        return self.decoder(zq)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Decode integer codes (B, x, y, z)."""
        return self.decode(self.quantizer.lookup(codes))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> VQGANOutput:
        """Encode, quantise (straight-through) and decode; ``generator`` drives codebook init/restarts."""
        q = self.quantize(self.encode(x), generator)
        reconstruction = self.decoder(q.quantized)
        return VQGANOutput(reconstruction, q.quantized, q.codes, q.commitment_loss, q.perplexity, q.dead_codes)

    def decode_tiled(
        self,
        zq: Tensor,
        tiles: tuple[int, int, int] | None = None,
        max_latent_voxels: int | None = None,
        overlap: int = 2,
    ) -> Tensor:
        """Decode tile by tile to bound memory; see :mod:`bids_app.models.tiling`.

        ``tiles`` is the count per axis; if None, counts are chosen so each decoded tile (with its halo)
        has at most ``max_latent_voxels`` latent voxels (one tile if both are None). Tiles get a halo of
        the decoder's receptive radius, so with ``decoder_norm="voxel"`` the result equals :meth:`decode`
        up to float rounding; with ``"group"`` it approximates it.
        """
        self._check_latent(zq)
        halo = self.decoder.receptive_radius()
        plan = plan_tiles(zq.shape[2:], tiles, max_latent_voxels, overlap, halo, self.config.downsample)
        return decode_with_tiles(self.decoder, zq, plan, self.config.downsample)

    def _check_latent(self, zq: Tensor) -> None:
        if zq.dim() != 5 or zq.shape[1] != self.config.embedding_dim:
            raise ValueError(f"expected (B, {self.config.embedding_dim}, x, y, z) latent, got {tuple(zq.shape)}")
