"""T2I-Adapter: a control map (the cord mask) -> one feature map per UNet encoder level.

Channels and resolutions are derived from the UNet's config and the VQ-GAN's downsampling (the
seed hard-coded them). Every output convolution is zero-initialised, so an untrained adapter adds
exactly nothing and training starts from the unconditioned diffusion model. Features are computed
once per control map and reused at every denoising step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AdapterConfig:
    """Saved with the adapter's weights; ``level_channels``/``level_downsample`` come from the UNet."""

    in_channels: int = 1
    hidden: int = 16
    input_downsample: tuple[int, int, int] = (4, 4, 4)
    level_channels: tuple[int, ...] = (16, 32)
    level_downsample: tuple[tuple[int, int, int], ...] = ((2, 2, 2),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_downsample", tuple(int(v) for v in self.input_downsample))
        object.__setattr__(self, "level_channels", tuple(int(v) for v in self.level_channels))
        object.__setattr__(self, "level_downsample", tuple(tuple(int(v) for v in f) for f in self.level_downsample))
        if len(self.level_downsample) != len(self.level_channels) - 1:
            raise ValueError("level_downsample needs one factor triple between consecutive levels")

    @classmethod
    def for_models(cls, unet_config: Any, vqgan_downsample: Sequence[int], hidden: int = 16) -> "AdapterConfig":
        """Channels and resolutions follow the UNet encoder; the input is pooled to the latent grid."""
        return cls(in_channels=1, hidden=hidden, input_downsample=tuple(vqgan_downsample),
                   level_channels=tuple(unet_config.encoder_channels),
                   level_downsample=tuple(tuple(f) for f in unet_config.downsample))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_downsample"] = list(self.input_downsample)
        data["level_channels"] = list(self.level_channels)
        data["level_downsample"] = [list(f) for f in self.level_downsample]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys: {', '.join(unknown)}")
        return cls(**dict(data))


def _block(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1))


class T2IAdapter(nn.Module):
    """Area-downsample the control map to the latent grid, then one residual stage per UNet level."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Conv3d(config.in_channels, config.hidden, 3, padding=1)
        self.blocks = nn.ModuleList(_block(config.hidden) for _ in config.level_channels)
        self.downs = nn.ModuleList(
            nn.Conv3d(config.hidden, config.hidden, kernel_size=f, stride=f) for f in config.level_downsample
        )
        self.outputs = nn.ModuleList(nn.Conv3d(config.hidden, c, 1) for c in config.level_channels)
        for conv in self.outputs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, control: Tensor, scale: float = 1.0) -> list[Tensor]:
        """Features for every encoder level, multiplied by ``scale`` (0 switches the adapter off)."""
        if control.dim() != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) control map, got {tuple(control.shape)}")
        h = F.avg_pool3d(control.float(), kernel_size=self.config.input_downsample)
        h = F.silu(self.stem(h))
        features = []
        for level, (block, out) in enumerate(zip(self.blocks, self.outputs)):
            h = h + block(h)
            features.append(out(h) * scale)
            if level < len(self.downs):
                h = self.downs[level](h)
        return features
