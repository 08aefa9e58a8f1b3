"""PatchGAN discriminators (2D on random slices, 3D on volumes) and the GAN losses that use them.

Why both: the 2D discriminator sees many slices cheaply and judges in-plane texture; the 3D one judges
through-plane consistency. Normalisation is GroupNorm rather than the pix2pix BatchNorm, so results do not
depend on the (tiny) per-GPU batch and DDP needs no SyncBatchNorm. Layers: ``n_layers`` strided 4-kernel
convs (halving every spatial axis), then two size-preserving 3-kernel convs, the last giving one logit per
patch. Every block's activation is returned as a feature for feature matching.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from bids_app.models.vqgan import group_count

logger = logging.getLogger(__name__)

DISCRIMINATOR_KINDS = ("2d", "3d", "both")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Discriminator hyperparameters, saved with the weights. ``kind`` says which ones a run trains."""

    in_channels: int = 1
    base: int = 16
    n_layers: int = 3
    norm_groups: int = 8
    kind: str = "both"
    slices_per_volume: int = 4

    def __post_init__(self) -> None:
        if self.kind not in DISCRIMINATOR_KINDS:
            raise ValueError(f"kind must be one of {DISCRIMINATOR_KINDS}, got {self.kind!r}")
        for name in ("in_channels", "base", "n_layers", "norm_groups", "slices_per_volume"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DiscriminatorConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown DiscriminatorConfig keys: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**dict(values))


class _PatchDiscriminator(nn.Module):
    """Shared body of the 2D and 3D discriminators; ``dims`` picks the conv type."""

    dims = 2

    def __init__(self, in_channels: int = 1, base: int = 16, n_layers: int = 3, norm_groups: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d if self.dims == 2 else nn.Conv3d
        self.n_layers = n_layers
        blocks: list[nn.Module] = [nn.Sequential(conv(in_channels, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2))]
        width = base
        for layer in range(1, n_layers + 1):
            out = base * 2 ** min(layer, 3)
            stride = 2 if layer < n_layers else 1
            kernel, padding = (4, 1) if stride == 2 else (3, 1)
            blocks.append(
                nn.Sequential(
                    conv(width, out, kernel, stride=stride, padding=padding),
                    nn.GroupNorm(group_count(out, norm_groups), out),
                    nn.LeakyReLU(0.2),
                )
            )
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = conv(width, 1, 3, stride=1, padding=1)

    @property
    def min_size(self) -> int:
        """Smallest spatial size that survives the strided layers."""
        return 2 ** self.n_layers

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Patch logits and the activation of every block (for feature matching)."""
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected a {self.dims + 2}D tensor (B, C, ...), got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"input spatial shape {tuple(x.shape[2:])} is too small for {self.n_layers} strided layers "
                f"(each side must be >= {self.min_size}); lower n_layers"
            )
        features = []
        h = x
        for block in self.blocks:
            h = block(h)
            features.append(h)
        return self.head(h), features


class PatchDiscriminator2D(_PatchDiscriminator):
    """PatchGAN on 2D slices (B, C, H, W); ``n_layers`` strided convs (``n_layers - 1`` after the first)."""

    dims = 2


class PatchDiscriminator3D(_PatchDiscriminator):
    """PatchGAN on volumes (B, C, X, Y, Z)."""

    dims = 3


def build_discriminators(
    config: DiscriminatorConfig,
) -> tuple[PatchDiscriminator2D | None, PatchDiscriminator3D | None]:
    """The discriminators ``config.kind`` asks for (None for the other)."""
    args = dict(
        in_channels=config.in_channels, base=config.base, n_layers=config.n_layers, norm_groups=config.norm_groups
    )
    d2 = PatchDiscriminator2D(**args) if config.kind in ("2d", "both") else None
    d3 = PatchDiscriminator3D(**args) if config.kind in ("3d", "both") else None
    return d2, d3


class SliceSelection(NamedTuple):
    """Which slices :func:`random_slices` took: the spatial axis (0, 1, 2) and (B, n) indices along it."""

    axis: int
    indices: Tensor


def draw_slices(
    shape: torch.Size | tuple[int, ...], n: int, generator: torch.Generator | None = None, axis: int | None = None
) -> SliceSelection:
    """Draw ``n`` slice positions per volume of a (B, C, X, Y, Z) shape; axis drawn too when None.

    One axis per call so that all slices of a batch share a shape; over training all orientations are seen.
    """
    if len(shape) != 5:
        raise ValueError(f"expected a (B, C, X, Y, Z) shape, got {tuple(shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = generator.device if generator is not None else torch.device("cpu")
    if axis is None:
        axis = int(torch.randint(0, 3, (1,), generator=generator, device=device))
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis), got {axis}")
    indices = torch.randint(0, shape[2 + axis], (shape[0], n), generator=generator, device=device)
    return SliceSelection(axis, indices)


def take_slices(volume: Tensor, selection: SliceSelection) -> Tensor:
    """The selected slices of ``volume`` (B, C, X, Y, Z) as a (B * n, C, H, W) batch, volume-major."""
    b, c = volume.shape[:2]
    if selection.indices.shape[0] != b:
        raise ValueError(f"selection is for {selection.indices.shape[0]} volumes, got {b}")
    moved = volume.movedim(2 + selection.axis, 2)  # (B, C, S, H, W)
    h, w = moved.shape[3:]
    index = repeat(selection.indices.to(volume.device), "b n -> b c n h w", c=c, h=h, w=w)
    picked = torch.gather(moved, 2, index)
    return rearrange(picked, "b c n h w -> (b n) c h w")


def random_slices(
    volume: Tensor,
    n: int,
    generator: torch.Generator | None = None,
    axis: int | None = None,
    selection: SliceSelection | None = None,
) -> tuple[Tensor, SliceSelection]:
    """``n`` random 2D slices per volume as (B * n, C, H, W), and the selection used.

    Pass the returned selection back (``selection=``) to cut the same slices from the reconstruction.
    """
    if selection is None:
        selection = draw_slices(volume.shape, n, generator, axis)
    return take_slices(volume, selection), selection


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))`` (taming convention)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss ``-mean(fake)``."""
    return -fake_logits.mean()


def feature_matching_loss(real_feats: list[Tensor], fake_feats: list[Tensor]) -> Tensor:
    """Mean over layers of the L1 distance between detached real features and fake features."""
    if len(real_feats) != len(fake_feats) or not real_feats:
        raise ValueError(f"need matching non-empty feature lists, got {len(real_feats)} and {len(fake_feats)}")
    losses = [F.l1_loss(fake, real.detach()) for real, fake in zip(real_feats, fake_feats)]
    return torch.stack(losses).mean()
