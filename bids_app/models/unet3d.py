"""The 3D denoising UNet over VQ-GAN latents: weights only, no schedule maths.

Layout (as diffusers' UNet2DModel / ADM, in 3D): conv_in, then per encoder level ``n_res_blocks``
residual blocks (self-attention after each at flagged levels) and a strided-conv downsample
between levels; a middle block (res, attention if the coarsest level has it, res); a decoder that
mirrors the encoder with ``n_res_blocks + 1`` blocks per level, each eating one skip, and
nearest-neighbour upsampling + conv; GroupNorm, SiLU and a final conv.

Time enters every residual block as a scale-shift of its second GroupNorm (ADM's
``use_scale_shift_norm``), from a sinusoidal embedding through a two-layer MLP.

Adapter features (T2I-Adapter style): one tensor per encoder level, shaped as
``encoder_feature_shapes`` says, added to the level's activations after its residual blocks and
before its downsample; the sum is also the skip that block hands the decoder.

``downsample`` gives the per-axis factors between levels: one (d, h, w) triple for every
transition, or one triple per transition (``len(channel_mults) - 1`` of them), e.g.
``((1, 2, 2), (2, 2, 2))`` to keep a thin axis at full resolution on the first level. Inputs must
be divisible by the product of the factors along each axis.

``zero_init_output`` (default on) zeroes the final conv, so an untrained model outputs 0: the
network starts as "predict no noise" and early training is not thrown around by random outputs.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["UNET_PRESETS", "UNet3DConfig", "UNet3D"]

Triple = tuple[int, int, int]


def _triple(value: Sequence[int]) -> Triple:
    items = tuple(int(v) for v in value)
    if len(items) != 3 or min(items) < 1:
        raise ValueError(f"a downsampling factor must be 3 positive integers, got {value}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class UNet3DConfig:
    """Architecture hyperparameters, saved next to the weights (``to_dict``/``from_dict``).

    The width (``base_channels``) is its own setting, independent of the latent size.
    ``out_channels`` defaults to ``in_channels``; ``time_embed_dim`` to 4 * base_channels.
    GroupNorm uses the largest group count <= ``norm_groups`` that divides the channels.
    ``downsample`` is normalised to one triple per level transition (see the module docstring).
    """

    in_channels: int
    out_channels: int | None = None
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4)
    n_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_heads: int = 4
    norm_groups: int = 8
    dropout: float = 0.0
    downsample: tuple[int, int, int] | tuple[tuple[int, int, int], ...] = (2, 2, 2)
    time_embed_dim: int | None = None
    zero_init_output: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        set_(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if self.out_channels is None:
            set_(self, "out_channels", self.in_channels)
        if self.time_embed_dim is None:
            set_(self, "time_embed_dim", 4 * self.base_channels)
        n_levels = len(self.channel_mults)
        if min(self.in_channels, self.out_channels, self.base_channels, self.n_res_blocks,  # type: ignore[type-var]
               self.num_heads, self.norm_groups, self.time_embed_dim) < 1:  # type: ignore[type-var]
            raise ValueError("channel counts, n_res_blocks, num_heads, norm_groups and time_embed_dim must be >= 1")
        if n_levels < 1 or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if len(self.attention_levels) != n_levels:
            raise ValueError(f"attention_levels needs one flag per level ({n_levels}), got {self.attention_levels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        set_(self, "downsample", self._normalise_downsample(self.downsample, n_levels - 1))
        for level, (channels, attention) in enumerate(zip(self.encoder_channels, self.attention_levels)):
            if attention and channels % self.num_heads:
                raise ValueError(f"level {level} has {channels} channels, "
                                 f"not divisible by num_heads={self.num_heads}")

    @staticmethod
    def _normalise_downsample(value: Any, n_transitions: int) -> tuple[Triple, ...]:
        items = tuple(value)
        if len(items) == 3 and all(isinstance(v, numbers.Integral) for v in items):
            return tuple(_triple(items) for _ in range(n_transitions))
        if len(items) != n_transitions:
            raise ValueError(f"downsample needs one (d, h, w) triple or {n_transitions} of them "
                             f"(one per level transition), got {value}")
        return tuple(_triple(v) for v in items)

    # -- derived shapes ------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.channel_mults)

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        """Channels of each encoder level (what an adapter's features must have)."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def total_downsample(self) -> Triple:
        """Per-axis product of all downsampling factors: inputs must be divisible by it."""
        total = [1, 1, 1]
        for factors in self.downsample:
            total = [a * f for a, f in zip(total, factors)]
        return tuple(total)  # type: ignore[return-value]

    def check_spatial_shape(self, spatial: Sequence[int]) -> Triple:
        """The (D, H, W) shape as a tuple; ValueError if the downsampling cannot divide it."""
        spatial = tuple(int(s) for s in spatial)
        total = self.total_downsample
        if len(spatial) != 3 or any(s < 1 or s % f for s, f in zip(spatial, total)):
            raise ValueError(f"UNet3D needs a spatial shape divisible by {total} (the product of the "
                             f"per-level downsampling {list(self.downsample)}), got {spatial}")
        return spatial  # type: ignore[return-value]

    def encoder_feature_shapes(self, latent_shape: Sequence[int]) -> list[tuple[int, Triple]]:
        """(channels, (D, H, W)) of every encoder level for a latent; its last 3 entries are spatial."""
        spatial = self.check_spatial_shape(tuple(latent_shape)[-3:])
        shapes = []
        for level, channels in enumerate(self.encoder_channels):
            shapes.append((channels, spatial))
            if level < len(self.downsample):
                spatial = tuple(s // f for s, f in zip(spatial, self.downsample[level]))  # type: ignore[assignment]
        return shapes

    # -- persistence and presets --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("channel_mults", "attention_levels"):
            data[key] = list(data[key])
        data["downsample"] = [list(f) for f in self.downsample]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNet3DConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UNet3D config field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    @classmethod
    def tiny(cls, in_channels: int, **overrides: Any) -> "UNet3DConfig":
        """CPU tests and demos: two levels, 16 base channels, attention at the coarse one."""
        values = dict(base_channels=16, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2)
        return cls(in_channels=in_channels, **{**values, **overrides})

    @classmethod
    def default(cls, in_channels: int, **overrides: Any) -> "UNet3DConfig":
        """The GPU model: three levels of 64/128/256 channels, two blocks each, attention coarse."""
        values = dict(base_channels=64, channel_mults=(1, 2, 4), n_res_blocks=2,
                      attention_levels=(False, True, True), num_heads=4)
        return cls(in_channels=in_channels, **{**values, **overrides})


# -- building blocks --------------------------------------------------------------------------
def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style timestep features (B, dim): sin and cos at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time as scale-shift of the second norm, 1x1 skip if widths differ."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.time(F.silu(temb)), "b c -> b c 1 1 1").chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention3D(nn.Module):
    """Multi-head self-attention over all voxels of a (coarse) level, via fused SDPA."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        qkv = rearrange(self.qkv(self.norm(x)), "b (qkv heads c) d h w -> qkv b heads (d h w) c", qkv=3,
                        heads=self.num_heads)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))  # q, k, v each (B, heads, voxels, head_dim)
        d, h, w = x.shape[2:]
        return x + self.proj(rearrange(out, "b heads (d h w) c -> b (heads c) d h w", d=d, h=h, w=w))


class Downsample(nn.Module):
    """Strided conv with per-axis factors; kernel 3 on unsampled axes, 2 (f // 2) + 1 otherwise."""

    def __init__(self, channels: int, factors: Triple) -> None:
        super().__init__()
        kernel = tuple(3 if f == 1 else 2 * (f // 2) + 1 for f in factors)
        self.conv = nn.Conv3d(channels, channels, kernel, stride=factors, padding=tuple(k // 2 for k in kernel))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, then a 3x3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class Level(nn.Module):
    """The residual blocks of one resolution, each optionally followed by self-attention."""

    def __init__(self, channels_in: Sequence[int], out_ch: int, attention: bool, cfg: UNet3DConfig) -> None:
        super().__init__()
        temb = int(cfg.time_embed_dim)  # type: ignore[arg-type]
        self.res = nn.ModuleList(ResBlock(c, out_ch, temb, cfg.norm_groups, cfg.dropout) for c in channels_in)
        self.attn = nn.ModuleList(
            SelfAttention3D(out_ch, cfg.num_heads, cfg.norm_groups) if attention else nn.Identity()
            for _ in channels_in)


# -- the network ------------------------------------------------------------------------------
class UNet3D(nn.Module):
    """Predicts the noise (or v) of a noisy latent at timestep t; same shape in and out."""

    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = cfg = config
        base, temb = cfg.base_channels, int(cfg.time_embed_dim)  # type: ignore[arg-type]
        chans = cfg.encoder_channels
        self.conv_in = nn.Conv3d(cfg.in_channels, base, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))

        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [base]
        ch = base
        for level, out_ch in enumerate(chans):
            ins = [ch] + [out_ch] * (cfg.n_res_blocks - 1)
            self.down.append(Level(ins, out_ch, cfg.attention_levels[level], cfg))
            ch = out_ch
            skip_channels += [out_ch] * cfg.n_res_blocks
            if level < cfg.n_levels - 1:
                self.downsamplers.append(Downsample(ch, cfg.downsample[level]))
                skip_channels.append(ch)

        self.mid_res1 = ResBlock(ch, ch, temb, cfg.norm_groups, cfg.dropout)
        self.mid_attn = (SelfAttention3D(ch, cfg.num_heads, cfg.norm_groups)
                         if cfg.attention_levels[-1] else nn.Identity())
        self.mid_res2 = ResBlock(ch, ch, temb, cfg.norm_groups, cfg.dropout)

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(cfg.n_levels)):
            out_ch = chans[level]
            ins = []
            for _ in range(cfg.n_res_blocks + 1):
                ins.append(ch + skip_channels.pop())
                ch = out_ch
            self.up.append(Level(ins, out_ch, cfg.attention_levels[level], cfg))
            if level > 0:
                self.upsamplers.append(Upsample(ch))

        self.norm_out = _group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv3d(ch, int(cfg.out_channels), 3, padding=1)  # type: ignore[arg-type]
        if cfg.zero_init_output:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def encoder_feature_shapes(self, latent_shape: Sequence[int]) -> list[tuple[int, Triple]]:
        """(channels, (D, H, W)) that ``adapter_features`` must have at each encoder level."""
        return self.config.encoder_feature_shapes(latent_shape)

    def _check_inputs(self, x: Tensor, t: Tensor | float, adapter_features: Sequence[Tensor | None] | None) -> Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet3D expects (B, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        shapes = self.config.encoder_feature_shapes(x.shape)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if adapter_features is not None:
            if len(adapter_features) != len(shapes):
                raise ValueError(f"adapter_features needs one tensor per encoder level ({len(shapes)}), "
                                 f"got {len(adapter_features)}")
            for level, (feature, (channels, spatial)) in enumerate(zip(adapter_features, shapes)):
                expected = (x.shape[0], channels, *spatial)
                if feature is not None and tuple(feature.shape) != expected:
                    raise ValueError(f"adapter feature {level} must have shape {expected}, "
                                     f"got {tuple(feature.shape)}")
        return t

    def forward(self, x: Tensor, t: Tensor | float,
                adapter_features: Sequence[Tensor | None] | None = None) -> Tensor:
        """x (B, C, D, H, W), t (B,) or a scalar (long or float); adapter features per level or None."""
        t = self._check_inputs(x, t, adapter_features)
        temb = self.time_mlp(sinusoidal_embedding(t, self.config.base_channels).to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for level, block in enumerate(self.down):
            for res, attn in zip(block.res, block.attn):
                h = attn(res(h, temb))
                skips.append(h)
            if adapter_features is not None and adapter_features[level] is not None:
                h = h + adapter_features[level]
                skips[-1] = h
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)

        for i, block in enumerate(self.up):
            for res, attn in zip(block.res, block.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), temb))
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h, skips[-1].shape[2:])

        return self.conv_out(F.silu(self.norm_out(h)))


UNET_PRESETS = {"tiny": UNet3DConfig.tiny, "default": UNet3DConfig.default}
"""Preset name -> ``factory(in_channels, **overrides)``."""
